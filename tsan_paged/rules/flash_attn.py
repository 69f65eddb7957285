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

from .. import checks
from ..access import Buffer, PageTable
from ..registry import rule
from ..report import Violation

FLASH_ATTN_WITH_KVCACHE = "flash_attn.flash_attn_interface:flash_attn_with_kvcache"
PAGE_BLOCK_MULTIPLE = 256  # flash_api.cpp mha_fwd_kvcache

_READS = ("q", "k_cache", "v_cache", "k", "cache_seqlens", "block_table", "window_size")


@rule(FLASH_ATTN_WITH_KVCACHE, name="flash_attn.flash_attn_with_kvcache", reads=_READS)
def flash_attn_with_kvcache(call):
    q, k_cache, v_cache, k_new, lengths, table, window = call.read(_READS)
    if table is None:
        return []  # not paged: no page table to check
    found = []
    if k_cache.dim() != 4 or tuple(v_cache.shape) != tuple(k_cache.shape):
        return [Violation("shape-mismatch", "v_cache", f"k_cache {tuple(k_cache.shape)} and v_cache "
                          f"{tuple(v_cache.shape)} must both be [num_blocks, page_block_size, nheads_k, headdim]",
                          value=tuple(v_cache.shape), bound=tuple(k_cache.shape))]
    num_blocks, page_size = int(k_cache.shape[0]), int(k_cache.shape[1])
    if page_size % PAGE_BLOCK_MULTIPLE:
        found.append(Violation("shape-mismatch", "k_cache", f"k_cache pages hold {page_size} tokens; "
                               f"flash_attn_with_kvcache needs page_block_size % {PAGE_BLOCK_MULTIPLE} == 0",
                               value=page_size, bound=PAGE_BLOCK_MULTIPLE))
    device = q.device
    found += checks.check_dtype(table, "block_table", (torch.int32,))
    if table.dtype.is_floating_point or table.dtype == torch.bool:
        return found
    for tensor, arg in ((table, "block_table"), (lengths, "cache_seqlens"), (k_cache, "k_cache")):
        if isinstance(tensor, torch.Tensor):
            found += checks.check_device(tensor, arg, device, "q")
    if any(v.check == "bad-device" for v in found):
        return found
    batch = q.shape[0]
    if table.dim() != 2 or table.shape[0] != batch:
        return found + [Violation("shape-mismatch", "block_table", f"block_table has shape {tuple(table.shape)}, "
                                  f"expected [batch={batch}, max_num_blocks_per_seq]", value=tuple(table.shape),
                                  bound=(batch, "W"))]
    width = table.shape[1]
    capacity = width * page_size
    new_tokens = int(k_new.shape[1]) if isinstance(k_new, torch.Tensor) else 0
    if lengths is None:  # every row is `capacity` long: every page is read
        lengths, new_tokens, check_lengths = torch.full((batch,), capacity, dtype=torch.int32, device=device), 0, False
    else:
        check_lengths = True
        if isinstance(lengths, int):
            lengths = torch.full((batch,), lengths, dtype=torch.int32, device=device)
        if tuple(lengths.shape) != (batch,):
            return found + [Violation("shape-mismatch", "cache_seqlens", f"cache_seqlens has shape "
                                      f"{tuple(lengths.shape)}, q implies ({batch},)", value=tuple(lengths.shape),
                                      bound=(batch,))]
        found += checks.check_dtype(lengths, "cache_seqlens", (torch.int32,))
        if lengths.dtype.is_floating_point:
            return found
    window_left = window[0] if window is not None else -1
    if window_left is not None and window_left >= capacity:
        window_left = -1  # flash_api.cpp: window_size_left >= seqlen_k -> no window
    # Read region: columns [floor(max(L - seqlen_q - window_left, 0) / ps), ceil(L / ps)) with
    # L = cache_seqlens + new tokens: the window skip in whole pages (tile = page size).
    return found + [PageTable(table, "block_table", (Buffer("k_cache", num_blocks),), page_size, lengths=lengths,
                              lengths_arg="cache_seqlens", length_offset=new_tokens,
                              window_left=-1 if window_left is None else int(window_left), q_len=int(q.shape[1]),
                              only=None if check_lengths else frozenset({"page-out-of-range",
                                                                          "dead-page-out-of-range"}))]
