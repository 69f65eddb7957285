"""A real dispatcher op for the tests: ``tsan_test::paged_gather``, with a CPU kernel in torch.

It gathers each row's KV tokens through its page table, the way a paged kernel reads:
``out[b, t] = kv_pages[block_table[b, t // page_size], t % page_size]`` for ``t < seq_lens[b]``.
"""

import torch

from tsan_paged import checks
from tsan_paged.registry import Registry, rule

OP = "tsan_test::paged_gather"

_lib = torch.library.Library("tsan_test", "DEF")
_lib.define("paged_gather(Tensor kv_pages, Tensor block_table, Tensor seq_lens, int page_size) -> Tensor")


def paged_gather_cpu(kv_pages, block_table, seq_lens, page_size):
    batch, width = block_table.shape
    tokens = torch.arange(width * page_size)
    pages = block_table[:, tokens // page_size].long()  # [B, T]
    live = tokens < seq_lens.unsqueeze(1)
    gathered = kv_pages[pages.where(live, 0), tokens % page_size]  # IndexError on a bad live page
    return gathered * live.unsqueeze(-1)


_lib.impl("paged_gather", paged_gather_cpu, "CPU")


@torch.library.register_fake(OP)
def _paged_gather_fake(kv_pages, block_table, seq_lens, page_size):  # for torch.compile
    return kv_pages.new_empty(block_table.shape[0], block_table.shape[1] * page_size, *kv_pages.shape[2:])

registry = Registry()


@rule(OP, reads=("kv_pages", "block_table", "seq_lens", "page_size"), registry=registry)
def paged_gather_rule(call):
    table, lengths, page_size = call["block_table"], call["seq_lens"].long(), call["page_size"]
    def region():  # row b reads its first ceil(seq_lens[b] / page_size) pages
        return None, checks.ceil_div(lengths.clamp(min=0), page_size).clamp(max=table.shape[1])

    return (checks.check_lengths_fit(lengths, "seq_lens", checks.length_bounds(lengths), page_size,
                                     table.shape[1], "block_table")
            + checks.check_pages_in_range(table, "block_table", call["kv_pages"].shape[0], "kv_pages", region))
