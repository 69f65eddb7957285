"""Built-in rules for vLLM's dispatcher ops, written as declarative rules.

Schemas from vLLM's ``csrc/torch_bindings.cpp`` (``_C`` and ``_C_cache_ops``):

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
"""

from __future__ import annotations

from ..declarative import make_rule, validate
from ..registry import registry

_PAGED_ATTENTION = dict(table="block_tables", lengths="seq_lens", buffers=["key_cache", "value_cache"],
                        page_size="block_size", max_length="max_seq_len")

SPECS = [
    dict(target="_C::paged_attention_v1", name="vllm.paged_attention_v1", **_PAGED_ATTENTION),
    dict(target="_C::paged_attention_v2", name="vllm.paged_attention_v2", **_PAGED_ATTENTION),
    dict(target="_C_cache_ops::reshape_and_cache", name="vllm.reshape_and_cache", table="slot_mapping",
         slots=True, buffers=["key_cache", "value_cache"], page_size="key_cache.shape[3]"),
    dict(target="_C_cache_ops::reshape_and_cache_flash", name="vllm.reshape_and_cache_flash", table="slot_mapping",
         slots=True, buffers=["key_cache", "value_cache"], page_size="key_cache.shape[1]"),
]

for spec in SPECS:
    registry.add(make_rule(validate(spec, f"built-in rule {spec['name']}"), source=__name__))
