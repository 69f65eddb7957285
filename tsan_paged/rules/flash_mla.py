"""Built-in rule for FlashMLA's paged decode (deepseek-ai/FlashMLA; SGLang ships it as
sgl-flash-mla, vLLM vendors it as ``vllm.third_party.flashmla``).

``flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v,
tile_scheduler_metadata, ..., indices=None, ...)``, dense form (``csrc/api/dense_decode.h``,
``csrc/sm90/decode/dense/splitkv_mla.cuh``, FlashMLA 9241ae3): ``q [B, s_q, h_q, d]``,
``k_cache [num_blocks, page_block_size (64), h_k, d]``, ``block_table`` int32 ``[B, W]``,
``cache_seqlens`` int32 ``[B]``. Request b reads pages ``j < ceil(cache_seqlens[b] / 64)``,
and its first block is loaded before the loop checks it: column 0 is dereferenced even when
``cache_seqlens[b] == 0`` (vLLM's CUDA-graph padding rows, which hold its null block 0 there).
The sparse form (``indices``: token ids, no page table) is reported as ``unsupported-form``,
never checked with a guessed region.
"""

from __future__ import annotations

import torch

from .. import checks
from ..registry import rule
from ..report import Violation
from .flash_attn import paged_kv_access

FLASH_MLA_READS = ("q", "k_cache", "block_table", "cache_seqlens")


def flash_mla_access(call):
    q, k_cache, table, lengths = call.read(FLASH_MLA_READS)
    if call.get("indices") is not None:
        return [checks.unsupported_form(call.target, "indices", "sparse FlashMLA (token indices, not a page table)")]
    if table is None:
        return []
    if k_cache.dim() != 4:
        return [Violation("shape-mismatch", "k_cache", f"k_cache has shape {tuple(k_cache.shape)}, expected "
                          "[num_blocks, page_block_size, h_k, d]", value=tuple(k_cache.shape))]
    if isinstance(lengths, torch.Tensor) and lengths.dtype == torch.int32:
        lengths = torch.where(lengths == 0, 1, lengths)  # column 0 is read at length 0 too
    return paged_kv_access(device=q.device, batch=q.shape[0], k_cache=k_cache, v_cache=None, table=table,
                           table_arg="block_table", lengths=lengths, lengths_arg="cache_seqlens")


rule("flash_mla.flash_mla_interface:flash_mla_with_kvcache", name="flash_mla.flash_mla_with_kvcache",
     reads=FLASH_MLA_READS)(flash_mla_access)
