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
  block_table, ...)``: the same cache and table; the pages of tiles up to ``ceil(seqused_k /
  TILE)`` are loaded with a token mask, so pages ``j < ceil(seqused_k / block_size)``; a window
  starts at a whole tile (``TILE <= 128``).
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

from ..declarative import make_rule, validate
from ..registry import registry, rule
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
UNIFIED_MAX_TILE = 128  # triton_unified_attention.py: tiles of 16, 32, or 128 tokens (head-256 prefill)
_UNIFIED_READS = ("q", "k", "v", "cu_seqlens_q", "max_seqlen_q", "seqused_k", "window_size", "block_table")


@rule(UNIFIED_ATTENTION, name="vllm.unified_attention", reads=_UNIFIED_READS)
def unified_attention(call):
    q, k, v, cu_q, max_q, lengths, window, table = call.read(_UNIFIED_READS)
    return paged_kv_access(device=q.device, batch=int(lengths.shape[0]), k_cache=k, v_cache=v, table=table,
                           table_arg="block_table", lengths=lengths, lengths_arg="seqused_k", q_len=max_q,
                           window_left=window[0] if window is not None else -1, max_tile=UNIFIED_MAX_TILE,
                           cache_args=("k", "v"))


rule("vllm.v1.attention.ops.flashmla:flash_mla_with_kvcache_fp8", name="vllm.flash_mla_with_kvcache_fp8",
     reads=FLASH_MLA_READS)(flash_mla_access)
rule("vllm.third_party.flashmla.flash_mla_interface:flash_mla_with_kvcache", name="vllm.flash_mla_with_kvcache",
     reads=FLASH_MLA_READS)(flash_mla_access)
