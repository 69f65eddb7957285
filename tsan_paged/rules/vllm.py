"""Built-in rules for vLLM (0.33.0; FlashInfer's entry points it calls: ``rules/flashinfer.py``).

vLLM's attention backend by GPU (``vllm/v1/attention/backends/``): its FlashAttention build on
Hopper and Ampere (``flash_attn.py``: FA3 on sm90, FA4 on sm100, FA2 elsewhere), FlashInfer on
Blackwell, Triton ``unified_attention`` elsewhere; MLA models run FlashMLA (``rules/flash_mla.py``,
vendored as ``vllm.third_party.flashmla``) or FlashInfer / Triton MLA.

Python entry points (paths relative to site-packages/vllm):

- ``vllm_flash_attn/flash_attn_interface.py`` ``flash_attn_varlen_func(q, k, v, max_seqlen_q,
  cu_seqlens_q, max_seqlen_k, cu_seqlens_k=None, seqused_k=None, ..., window_size=None, ...,
  block_table=None, ..., fa_version=2, ...)``: with ``block_table`` (int32 ``[batch, W]``,
  ``seqused_k`` required), ``k`` / ``v`` are pages ``[num_blocks, block_size, h_k, d]`` (strided
  views of the cache) and request b reads pages up to ``ceil(seqused_k[b] / block_size)``
  (vllm-flash-attention ``hopper/paged_kv.h``, ``csrc/flash_attn/src/flash_fwd_kernel.h``). A
  local window starts exactly at its first key in the FA3 fork (``hopper/block.h``: token
  offset) and at a whole tile in FA2 (``kBlockN <= 256``) and FA4 (``<= 224``).
  ``flash_attn_with_kvcache`` was removed from vLLM in November 2025.
- ``v1/attention/ops/triton_unified_attention.py`` ``unified_attention(q, k, v, out,
  cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale, causal, window_size,
  block_table, ...)``: the same cache and table. ``kernel_unified_attention`` runs one program
  per (request, q-block of ``BLOCK_Q`` query rows); it loads the table entry of every token of
  its tiles (``TILE_SIZE`` tokens) unmasked, but K / V only where ``seq_offset <
  max_seq_prefix_len`` (``<= seqused_k``), so request b's pages are ``j < ceil(seqused_k[b] /
  block_size)`` and none when it has no query row (``q_len_b = 0``: no program does any work).
  A sliding window (``window_size[0] >= 0``, ``SLIDING_WINDOW = window_size[0] + 1``) prunes
  whole tiles (``triton_attention_helpers.py`` ``compute_tile_loop_bounds``): the first q-block
  starts at tile ``floor((ctx_b - window_size[0]) / TILE)`` (``ctx_b = seqused_k[b] - q_len_b``,
  floored at 0), the later q-blocks later; every token from there on is loaded (keys left of a
  row's window are masked after the load, so a page there is dereferenced though it changes
  nothing). ``TILE`` is the wrapper's choice: ``_get_tile_size(head_size, SLIDING_WINDOW,
  q.element_size(), is_prefill)`` (16 or 32; 128 for the tuned head-256 path on sm100) of the
  2D kernel (prefill tile) or of the split-KV 3D kernel (decode tile), chosen by the same
  conditions as the wrapper (``use_3d``). Chunked local attention (``chunk_lookback >= 0``)
  starts at ``((ctx_b // chunk) - chunk_lookback) * chunk`` instead. No pruning, so from page
  0, with multimodal prefix ranges (``mm_prefix_range``; with ``mm_prefix_clamp_sliding_window``
  a range may start before the window: from page 0 too, conservative), R-SWA
  (``rswa_window``), or the INT4 cache (``unified_attention_int4``, another kernel).
- ``v1/attention/ops/triton_reshape_and_cache_flash.py`` ``triton_reshape_and_cache_flash(key,
  value, key_cache, value_cache, slot_mapping, ...)`` (the Triton backend's KV write): one
  program per entry of ``slot_mapping`` WRITES token t to slot ``slot_mapping[t]`` (block
  ``slot // block_size``) of ``key_cache`` / ``value_cache`` ``[num_blocks, block_size, H, D]``
  (or head-major ``[num_blocks, H, D/x, block_size, x]``: ``block_size = shape[3]``); a
  negative slot returns at once (padding).
- ``v1/attention/ops/flashmla.py`` ``flash_mla_with_kvcache_fp8``: FlashMLA's dense fp8 decode,
  the same region as the FlashMLA rule.

Dispatcher ops, schemas from vLLM's ``csrc/torch_bindings.cpp`` (``_C`` and ``_C_cache_ops``):

- ``paged_attention_v1(Tensor! out, Tensor query, Tensor key_cache, Tensor value_cache,
  int num_kv_heads, float scale, Tensor block_tables, Tensor seq_lens, int block_size,
  int max_seq_len, ...)`` and ``paged_attention_v2(out, exp_sums, max_logits, tmp_out, query,
  key_cache, value_cache, ...same...)``: ``key_cache [num_blocks, H, D/x, block_size, x]``,
  ``value_cache [num_blocks, H, D, block_size]``; row i reads blocks
  ``j < ceil(seq_lens[i] / block_size)`` of ``block_tables [num_seqs, max_blocks]``.
- ``reshape_and_cache(Tensor key, Tensor value, Tensor! key_cache, Tensor! value_cache,
  Tensor slot_mapping, str kv_cache_dtype, Tensor k_scale, Tensor v_scale)``: WRITES token t
  to slot ``slot_mapping[t]`` (block ``slot // block_size``); ``key_cache`` as above, so
  ``block_size = key_cache.shape[3]``. ``reshape_and_cache_flash`` (same schema):
  ``key_cache [num_blocks, block_size, H, D]``, ``block_size = key_cache.shape[1]``.
  The token count is ``slot_mapping.size(0)`` (``key`` may have more rows: CUDA-graph
  padding); negative slots are padding the kernel skips.
- ``concat_and_cache_mla(Tensor kv_c, Tensor k_pe, Tensor! kv_cache, Tensor slot_mapping,
  str kv_cache_dtype, Tensor scale, bool skip_scale=False)``: WRITES token t's latent to slot
  ``slot_mapping[t]`` of ``kv_cache [num_blocks, block_size, kv_lora_rank + pe_dim]``
  (``csrc/cache_kernels.cu``; ``block_size = kv_cache.size(1)``, negative slots skipped).

vLLM's block-table conventions the rules rely on: block 0 is its null block (padding rows of a
CUDA graph hold 0 with ``seq_lens`` 0; it is the guard value), padding slots are -1.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch

from .. import checks
from ..access import Buffer, PageTable, Slots
from ..declarative import make_rule, validate
from ..registry import registry, rule
from ..report import Violation
from .flash_attn import paged_kv_access
from .flash_mla import FLASH_MLA_READS, flash_mla_access

_PAGED_ATTENTION = dict(table="block_tables", lengths="seq_lens", buffers=["key_cache", "value_cache"],
                        page_size="block_size", max_length="max_seq_len")

SPECS = [
    dict(target="_C::paged_attention_v1", name="vllm.paged_attention_v1", **_PAGED_ATTENTION),
    dict(target="_C::paged_attention_v2", name="vllm.paged_attention_v2", **_PAGED_ATTENTION),
    dict(target="_C_cache_ops::reshape_and_cache", name="vllm.reshape_and_cache", table="slot_mapping",
         slots=True, buffers=["key_cache", "value_cache"], page_size="key_cache.shape[3]"),
    dict(target="_C_cache_ops::reshape_and_cache_flash", name="vllm.reshape_and_cache_flash", table="slot_mapping",
         slots=True, buffers=["key_cache", "value_cache"], page_size="key_cache.shape[1]"),
    dict(target="_C_cache_ops::concat_and_cache_mla", name="vllm.concat_and_cache_mla", table="slot_mapping",
         slots=True, buffers=["kv_cache"], page_size="kv_cache.shape[1]"),
]

for spec in SPECS:
    registry.add(make_rule(validate(spec, f"built-in rule {spec['name']}"), source=__name__))


FA_VARLEN = "vllm.vllm_flash_attn.flash_attn_interface:flash_attn_varlen_func"
FA_WINDOW_TILE = {2: 256, 3: 0, 4: 224}  # the largest tile a window start is rounded to (0: exact)
_FA_READS = ("q", "k", "v", "max_seqlen_q", "cu_seqlens_q", "seqused_k", "window_size", "block_table", "fa_version")


@rule(FA_VARLEN, name="vllm.flash_attn_varlen_func", reads=_FA_READS)
def flash_attn_varlen_func(call):
    q, k, v, max_q, cu_q, lengths, window, table, version = call.read(_FA_READS)
    if table is None:
        return []  # not paged: k and v are the tokens themselves
    return paged_kv_access(device=q.device, batch=cu_q.shape[0] - 1, k_cache=k, v_cache=v, table=table,
                           table_arg="block_table", lengths=lengths, lengths_arg="seqused_k", q_len=max_q,
                           window_left=window[0] if window is not None else -1,
                           max_tile=FA_WINDOW_TILE.get(version, 256), cache_args=("k", "v"))


UNIFIED_ATTENTION = "vllm.v1.attention.ops.triton_unified_attention:unified_attention"
UNIFIED_MAX_TILE = 128  # the largest TILE_SIZE of any configuration (the tuned head-256 prefill path)
_UNIFIED_READS = ("q", "k", "v", "cu_seqlens_q", "max_seqlen_q", "seqused_k", "window_size", "block_table", "causal",
                  "seq_threshold_3D", "num_par_softmax_segments", "softmax_segm_output", "softmax_segm_max",
                  "softmax_segm_expsum", "mm_prefix_range", "rswa_prefix_lens", "rswa_window", "kv_quant_mode",
                  "chunk_lookback", "use_td")


@rule(UNIFIED_ATTENTION, name="vllm.unified_attention", reads=_UNIFIED_READS)
def unified_attention(call):
    (q, k, v, cu_q, max_q, lengths, window, table, causal, threshold, segments, segm_out, segm_max, segm_sum,
     mm_prefix, rswa_lens, rswa_window, quant, lookback, use_td) = call.read(_UNIFIED_READS)
    found = paged_kv_access(device=q.device, batch=int(lengths.shape[0]), k_cache=k, v_cache=v, table=table,
                            table_arg="block_table", lengths=lengths, lengths_arg="seqused_k", q_len=max_q,
                            cache_args=("k", "v"))
    access = next((item for item in found if isinstance(item, PageTable)), None)
    if access is None:
        return found
    num_seqs = int(lengths.shape[0])
    if cu_q.dim() != 1 or cu_q.shape[0] < num_seqs + 1:
        return [item for item in found if item is not access] + [Violation(
            "shape-mismatch", "cu_seqlens_q", f"cu_seqlens_q has shape {tuple(cu_q.shape)}, the kernel reads "
            f"{num_seqs + 1} entries ({num_seqs} requests in seqused_k)", value=tuple(cu_q.shape),
            bound=(num_seqs + 1,))]
    page_size, width = int(k.shape[1]), int(table.shape[1])
    kv_len = lengths.to(torch.int64)
    q_lens = (cu_q[1:num_seqs + 1] - cu_q[:num_seqs]).to(kv_len.device, torch.int64)
    end = torch.where(q_lens > 0, checks.ceil_div(kv_len.clamp(min=0), page_size).clamp(max=width), 0)
    window_left = window[0] if window is not None else -1
    # no pruning (from page 0): prefix ranges (clamped to the window or not), R-SWA, the INT4 kernel
    pruned = mm_prefix is None and not (rswa_window is not None and rswa_lens is not None) \
        and getattr(quant, "name", None) != "INT4_PER_TOKEN_HEAD"
    first = None
    if window_left is not None and window_left >= 0 and pruned:
        ctx = kv_len - q_lens
        chunk = (window_left + 1) // (lookback + 1) if lookback is not None and lookback > -1 else 0
        if chunk > 0:  # (vLLM asserts chunk > 0 where lookback is set)
            first_key = (torch.div(ctx, chunk, rounding_mode="floor") - lookback) * chunk
        else:
            first_key = ctx - window_left
        tile = _unified_tile(q, k, window_left, int(max_q), causal, mm_prefix, threshold, segments, segm_out,
                             segm_max, segm_sum, bool(use_td), num_seqs)
        first = first_key.clamp(min=0) // tile * tile // page_size
    region = replace(access, first=first, end=end, explicit_region=True)
    return [region if item is access else item for item in found]


def _unified_tile(q, k, window_left, max_q, causal, mm_prefix, threshold, segments, segm_out, segm_max, segm_sum,
                  use_td, num_seqs) -> int:
    """The ``TILE_SIZE`` ``unified_attention`` launches with: the wrapper's own choice, made from
    the call's arguments as the wrapper makes it (vLLM 0.33.0 L985-1126). Where the wrapper's
    module lacks a name it uses (another vLLM), the largest tile: a region that may start too
    early, never too late."""
    module = sys.modules.get(UNIFIED_ATTENTION.partition(":")[0])
    get_tile = getattr(module, "_get_tile_size", None)
    max_3d_q = getattr(module, "MAX_3D_QUERY_LEN", None)
    batch_invariant = getattr(module, "is_batch_invariant", None)
    if get_tile is None or max_3d_q is None or batch_invariant is None:
        return UNIFIED_MAX_TILE
    head_size, block_size = int(q.shape[2]), int(k.shape[1])
    per_kv = int(q.shape[1]) // max(int(k.shape[2]), 1)
    sliding_window = window_left + 1
    prefill = get_tile(head_size, sliding_window, q.element_size(), is_prefill=True)
    decode = get_tile(head_size, sliding_window, q.element_size(), is_prefill=False)
    tuned_large_head = (head_size == 256 and max_q > 1 and per_kv <= 16 and q.is_cuda
                        and torch.cuda.get_device_capability(q.device)[0] == 10)
    block_m = 16 if per_kv <= 16 else 1 << (per_kv - 1).bit_length()
    if tuned_large_head:
        prefill, block_m = 128, 32
    if use_td:
        prefill, decode = min(prefill, block_size), min(decode, block_size)
    block_q = max(block_m // max(per_kv, 1), 1)
    per_seq_causal = isinstance(causal, torch.Tensor)
    use_3d = not (
        threshold is None or segments is None or segm_out is None or segm_max is None or segm_sum is None
        or (max_q > 1 and (max_q > max_3d_q or not (per_seq_causal or bool(causal)) or per_seq_causal
                           or mm_prefix is not None or tuned_large_head))
        or num_seqs * -(-max_q // block_q) > threshold
        or batch_invariant)
    if use_3d and segm_max.shape[0] < q.shape[0]:
        use_3d = False
    return decode if use_3d else prefill


TRITON_RESHAPE_AND_CACHE = "vllm.v1.attention.ops.triton_reshape_and_cache_flash:triton_reshape_and_cache_flash"
_RESHAPE_READS = ("key", "key_cache", "value_cache", "slot_mapping")


@rule(TRITON_RESHAPE_AND_CACHE, name="vllm.triton_reshape_and_cache_flash", reads=_RESHAPE_READS)
def triton_reshape_and_cache_flash(call):
    key, key_cache, value_cache, slots = call.read(_RESHAPE_READS)
    found = checks.check_dtype(slots, "slot_mapping", (torch.int32, torch.int64))
    found += checks.check_device(slots, "slot_mapping", key.device, "key")
    if found:
        return found
    if key_cache.dim() not in (4, 5) or value_cache.shape[0] != key_cache.shape[0]:
        return [Violation("shape-mismatch", "key_cache", f"key_cache {tuple(key_cache.shape)}, value_cache "
                          f"{tuple(value_cache.shape)}: expected [num_blocks, block_size, H, D] (or head-major "
                          "[num_blocks, H, D/x, block_size, x]) with the same blocks", value=tuple(key_cache.shape))]
    block_size = int(key_cache.shape[1] if key_cache.dim() == 4 else key_cache.shape[3])
    return [Slots(slots.reshape(-1), "slot_mapping", Buffer("key_cache and value_cache",
                                                            int(key_cache.shape[0]) * block_size))]


rule("vllm.v1.attention.ops.flashmla:flash_mla_with_kvcache_fp8", name="vllm.flash_mla_with_kvcache_fp8",
     reads=FLASH_MLA_READS)(flash_mla_access)
rule("vllm.third_party.flashmla.flash_mla_interface:flash_mla_with_kvcache", name="vllm.flash_mla_with_kvcache",
     reads=FLASH_MLA_READS)(flash_mla_access)
