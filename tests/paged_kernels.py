"""A Python kernel entry point for the tests, as a library of the user's would have one:
``paged_decode`` attends each row's query to the KV tokens its page table names, in torch (CPU), and
``PagedCache.write`` stores tokens through a slot mapping (a method of a library object)."""

import torch


def paged_decode(q, kv_cache, block_table, seq_lens):
    """``q [B, D]``; ``kv_cache [pages, page_size, D]``; row b reads ``block_table[b, j]`` for
    ``j < ceil(seq_lens[b] / page_size)``. A page past the cache is read as the nearest one:
    silently wrong, as FlashInfer's xqa reads the seed's one-past-the-end entry."""
    page_size = kv_cache.shape[1]
    tokens = torch.arange(block_table.shape[1] * page_size)
    live = tokens[None, :] < seq_lens[:, None]
    pages = torch.where(live, block_table[:, tokens // page_size].long(), 0).clamp(0, kv_cache.shape[0] - 1)
    keys = kv_cache[pages, tokens % page_size]  # [B, T, D]
    scores = torch.einsum("bd,btd->bt", q, keys).masked_fill(~live, float("-inf"))
    return torch.einsum("bt,btd->bd", scores.softmax(-1), keys)


class PagedCache:
    def __init__(self, slots: int, dim: int):
        self.buffer = torch.zeros(slots, dim)

    def write(self, loc, values):
        self.buffer[loc] = values


def paged_decode_scaled(q, kv_cache, block_table, seq_lens, scale=1.0):
    """An entry point that calls another (as FlashInfer's ``trtllm_batch_decode_with_kv_cache`` calls
    ``xqa_batch_decode_with_kv_cache``): checked once, at the call the program makes."""
    return paged_decode(q * scale, kv_cache, block_table, seq_lens)
