"""Built-in rule for FlashAttention 2 ``flash_attn_with_kvcache`` (flash-attn 2.8.3).

Target: the Python entry point ``flash_attn.flash_attn_interface:flash_attn_with_kvcache``
(the ``flash_attn`` re-export is the same object and is wrapped with it). It calls
``flash_attn_2_cuda.fwd_kvcache`` = ``mha_fwd_kvcache`` (``csrc/flash_attn/flash_api.cpp``);
what that and the kernel (``src/flash_fwd_kernel.h`` ``compute_attn_1rowblock_splitkv``,
``src/block_info.h``) read with a ``block_table``:

- ``k_cache`` / ``v_cache``: ``[num_blocks, page_block_size, nheads_k, headdim]``;
  ``page_block_size % 256 == 0`` (flash_api.cpp: "Paged KV cache block size must be divisible
  by 256"); ``block_table``: int32 ``[batch, max_num_blocks_per_seq]``, last dim contiguous
  (the row stride is honoured: ``block_table_batch_stride``); ``cache_batch_idx`` and
  ``cache_leftpad`` are refused with a block table.
- ``cache_seqlens`` (int or int32 ``[batch]``): row b's KV length is
  ``L_b = cache_seqlens[b] + seqlen_new`` (``k``/``v`` new tokens are written at positions
  ``cache_seqlens[b]..L_b-1``, through the same table); without ``cache_seqlens`` every row is
  ``max_num_blocks_per_seq * page_block_size`` long (the whole row is read).
- Blocks of ``kBlockN`` tokens are loaded up to ``ceil(L_b / kBlockN)``; ``kBlockN`` divides
  256, hence the page size, so the pages read are ``j < ceil(L_b / page_block_size)``.
  A local window (``window_size[0] >= 0``, below ``max_num_blocks * page_block_size``) starts
  at block ``max(0, (L_b - seqlen_q - window_left) / kBlockN)``: with the page size a multiple
  of ``kBlockN`` that is page ``floor(max(L_b - seqlen_q - window_left, 0) / page_block_size)``.
"""

from __future__ import annotations

import torch

from .. import checks, tracking
from ..access import Buffer, PageTable
from ..registry import rule
from ..report import Violation

FLASH_ATTN_WITH_KVCACHE = "flash_attn.flash_attn_interface:flash_attn_with_kvcache"
PAGE_BLOCK_MULTIPLE = 256  # flash_api.cpp mha_fwd_kvcache

_READS = ("q", "k_cache", "v_cache", "k", "cache_seqlens", "block_table", "window_size")


def paged_kv_access(*, device, batch, k_cache, v_cache, table, table_arg, lengths, lengths_arg="cache_seqlens",
                    new_tokens=0, q_len=1, window_left=-1, max_tile=0, writes=False,
                    cache_args=("k_cache", "v_cache"), call=None, cu_seqlens_q=None) -> list:
    """The findings and the :class:`PageTable` of a FlashAttention paged-KV call (FA2, FA3, FA4
    and the forks SGLang and vLLM ship: they read a page table the same way).

    ``k_cache`` / ``v_cache``: ``[num_pages, page_size, heads_k, dim]`` (``k_cache`` may be
    ``None``: FA3's ``only_qv``); ``table``: int32 ``[batch, W]``; row b reads pages
    ``[first_b, ceil((lengths[b] + new_tokens) / page_size))``; without ``lengths`` every
    column. A local window (``window_left >= 0``) skips ``S = L - q_len - window_left``
    tokens in whole tiles of ``kBlockN`` tokens: ``max_tile = 0`` when the page size is a
    multiple of the tile (FA2: the first page read is ``floor(S / page_size)``), else the
    largest ``kBlockN`` of the kernel's configurations, which bounds the first page read from
    below by ``floor((S - max_tile + 1) / page_size)`` (pages before it are dead for every tile).
    ``q_len``: the query rows of a request (the largest, for ragged queries). ``writes``: the
    kernel writes new tokens through the table (no guard value is safe: page 0 would be
    overwritten). ``call``: the call being checked, for ``track_pages`` (SGLang's pools);
    ``cu_seqlens_q``: the rows' query offsets, for ragged queries (``q_len`` is then the largest).
    """
    found = []
    k_arg, v_arg = cache_args
    caches = [(t, arg) for t, arg in ((k_cache, k_arg), (v_cache, v_arg)) if t is not None]
    if any(t.dim() != 4 for t, _ in caches) or (len(caches) == 2 and k_cache.shape[:2] != v_cache.shape[:2]):
        shapes = ", ".join(f"{arg} {tuple(t.shape)}" for t, arg in caches)
        return [Violation("shape-mismatch", v_arg, f"{shapes}: paged caches must be [num_pages, page_size, heads_k, "
                          "dim] with the same pages", value=tuple(caches[-1][0].shape))]
    num_pages, page_size = int(caches[-1][0].shape[0]), int(caches[-1][0].shape[1])
    found += checks.check_dtype(table, table_arg, (torch.int32,))
    if table.dtype.is_floating_point or table.dtype == torch.bool:
        return found
    tensors = [(table, table_arg), (lengths, lengths_arg)] + [(t, arg) for t, arg in caches]
    for tensor, arg in tensors:
        if isinstance(tensor, torch.Tensor):
            found += checks.check_device(tensor, arg, device, "q")
    if any(v.check == "bad-device" for v in found):
        return found
    if table.dim() != 2 or (batch is not None and table.shape[0] != batch):
        return found + [Violation("shape-mismatch", table_arg, f"{table_arg} has shape {tuple(table.shape)}, "
                                  f"expected [batch={batch}, max_num_pages]", value=tuple(table.shape),
                                  bound=(batch, "W"))]
    batch = int(table.shape[0])
    capacity = int(table.shape[1]) * page_size
    check_lengths = lengths is not None
    if lengths is None:  # every row is `capacity` long: every page is read
        lengths, new_tokens = torch.full((batch,), capacity, dtype=torch.int32, device=device), 0
    elif isinstance(lengths, int):
        lengths = torch.full((batch,), lengths, dtype=torch.int32, device=device)
    else:
        if tuple(lengths.shape) != (batch,):
            return found + [Violation("shape-mismatch", lengths_arg, f"{lengths_arg} has shape "
                                      f"{tuple(lengths.shape)}, {table_arg} implies ({batch},)",
                                      value=tuple(lengths.shape), bound=(batch,))]
        found += checks.check_dtype(lengths, lengths_arg, (torch.int32,))
        if lengths.dtype.is_floating_point:
            return found
    if window_left is None or window_left < 0 or window_left >= capacity:
        window_left = exact_window = -1  # flash_api.cpp: window_size_left >= seqlen_k -> no window
        tile = 0
    elif max_tile:
        exact_window, window_left, tile = window_left, window_left + max_tile - 1, 1
    else:
        exact_window, tile = window_left, 0
    access = PageTable(table, table_arg, (Buffer(caches[0][1], num_pages),), page_size, lengths=lengths,
                       lengths_arg=lengths_arg, length_offset=int(new_tokens), window_left=int(window_left),
                       q_len=int(q_len), tile=tile, guard=None if writes else 0,
                       only=None if check_lengths else PAGE_CHECKS)
    found.append(access)
    if call is not None and tracking.enabled(call):  # the pages it attends to, exactly: track_pages
        region = None
        if cu_seqlens_q is not None and exact_window >= 0:  # ragged: each row's window starts at its own query
            kv_len = lengths.to(torch.int64) + int(new_tokens)
            q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).to(kv_len.device, torch.int64)
            first = (kv_len - q_lens - int(exact_window)).clamp(min=0) // page_size
            region = (first, checks.ceil_div(kv_len.clamp(min=0), page_size))
        found += tracking.check_read_pages(call, access, (caches[0][0],), window_left=int(exact_window),
                                           q_len=int(q_len), region=region)
    return found


PAGE_CHECKS = frozenset({"page-out-of-range", "dead-page-out-of-range"})


@rule(FLASH_ATTN_WITH_KVCACHE, name="flash_attn.flash_attn_with_kvcache", reads=_READS)
def flash_attn_with_kvcache(call):
    q, k_cache, v_cache, k_new, lengths, table, window = call.read(_READS)
    if table is None:
        return []  # not paged: no page table to check
    if k_cache.dim() != 4 or tuple(v_cache.shape) != tuple(k_cache.shape):
        return [Violation("shape-mismatch", "v_cache", f"k_cache {tuple(k_cache.shape)} and v_cache "
                          f"{tuple(v_cache.shape)} must both be [num_blocks, page_block_size, nheads_k, headdim]",
                          value=tuple(v_cache.shape), bound=tuple(k_cache.shape))]
    found = []
    page_size = int(k_cache.shape[1])
    if page_size % PAGE_BLOCK_MULTIPLE:
        found.append(Violation("shape-mismatch", "k_cache", f"k_cache pages hold {page_size} tokens; "
                               f"flash_attn_with_kvcache needs page_block_size % {PAGE_BLOCK_MULTIPLE} == 0",
                               value=page_size, bound=PAGE_BLOCK_MULTIPLE))
    # Read region: columns [floor(max(L - seqlen_q - window_left, 0) / ps), ceil(L / ps)) with
    # L = cache_seqlens + new tokens: the window skip in whole pages (kBlockN divides the page).
    new_tokens = int(k_new.shape[1]) if isinstance(k_new, torch.Tensor) and lengths is not None else 0
    return found + paged_kv_access(device=q.device, batch=q.shape[0], k_cache=k_cache, v_cache=v_cache, table=table,
                                   table_arg="block_table", lengths=lengths, new_tokens=new_tokens,
                                   q_len=int(q.shape[1]), window_left=window[0] if window is not None else -1,
                                   writes=isinstance(k_new, torch.Tensor), call=call)
