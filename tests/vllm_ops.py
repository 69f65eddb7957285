"""vLLM's paged ops, registered here with vLLM's schemas and real CPU kernels written in torch:
stand-ins for its compiled extensions (``_C``, ``_C_cache_ops``), which need libcuda.

``_C_cache_ops`` schemas are vLLM 0.33.0's (the schema strings in its
``_C_stable_libtorch.abi3.so``; ``vllm._custom_ops.reshape_and_cache*`` /
``concat_and_cache_mla`` call them). ``_C::paged_attention_v1/_v2`` are older vLLM's (0.33.0's
``_C`` has no such op; the rules stay for the versions that have them).
Layouts from the kernels: ``key_cache [num_blocks, H, D/x, block_size, x]``,
``value_cache [num_blocks, H, D, block_size]`` (paged attention, reshape_and_cache),
``[num_blocks, block_size, H, D]`` (reshape_and_cache_flash),
``[num_blocks, block_size, kv_lora_rank + pe_dim]`` (concat_and_cache_mla).
"""

import torch

_C = torch.library.Library("_C", "FRAGMENT")
_C.define("paged_attention_v1(Tensor! out, Tensor query, Tensor key_cache, Tensor value_cache, int num_kv_heads, "
          "float scale, Tensor block_tables, Tensor seq_lens, int block_size, int max_seq_len, Tensor? alibi_slopes, "
          "str kv_cache_dtype, Tensor k_scale, Tensor v_scale, int tp_rank, int blocksparse_local_blocks, "
          "int blocksparse_vert_stride, int blocksparse_block_size, int blocksparse_head_sliding_step) -> ()")
_C.define("paged_attention_v2(Tensor! out, Tensor! exp_sums, Tensor! max_logits, Tensor! tmp_out, Tensor query, "
          "Tensor key_cache, Tensor value_cache, int num_kv_heads, float scale, Tensor block_tables, Tensor seq_lens, "
          "int block_size, int max_seq_len, Tensor? alibi_slopes, str kv_cache_dtype, Tensor k_scale, "
          "Tensor v_scale, int tp_rank, int blocksparse_local_blocks, int blocksparse_vert_stride, "
          "int blocksparse_block_size, int blocksparse_head_sliding_step) -> ()")
_CACHE = torch.library.Library("_C_cache_ops", "FRAGMENT")
_CACHE.define("reshape_and_cache(Tensor key, Tensor value, Tensor! key_cache, Tensor! value_cache, "
              "Tensor slot_mapping, str kv_cache_dtype, Tensor k_scale, Tensor v_scale, "
              "bool interleaved_v=False) -> ()")
_CACHE.define("reshape_and_cache_flash(Tensor key, Tensor value, Tensor! key_cache, Tensor! value_cache, "
              "Tensor slot_mapping, str kv_cache_dtype, Tensor k_scale, Tensor v_scale) -> ()")
_CACHE.define("concat_and_cache_mla(Tensor kv_c, Tensor k_pe, Tensor! kv_cache, Tensor slot_mapping, "
              "str kv_cache_dtype, Tensor scale, bool skip_scale=False) -> ()")


def paged_attention_v1(out, query, key_cache, value_cache, num_kv_heads, scale, block_tables, seq_lens,
                       block_size, max_seq_len, *unused):
    num_blocks, heads, d_x, bs, x = key_cache.shape
    keys = key_cache.permute(0, 3, 1, 2, 4).reshape(num_blocks * bs, heads, d_x * x)  # [slots, H, D]
    values = value_cache.permute(0, 3, 1, 2).reshape(num_blocks * bs, heads, -1)
    group = query.shape[1] // num_kv_heads
    for i, length in enumerate(seq_lens.tolist()):
        tokens = torch.arange(length)
        slots = block_tables[i, tokens // block_size].long() * block_size + tokens % block_size
        k = keys[slots].repeat_interleave(group, dim=1)  # [T, Hq, D]
        v = values[slots].repeat_interleave(group, dim=1)
        weights = torch.softmax(torch.einsum("hd,thd->ht", query[i].float(), k.float()) * scale, dim=-1)
        out[i] = torch.einsum("ht,thd->hd", weights, v.float()).to(out.dtype)


def paged_attention_v2(out, exp_sums, max_logits, tmp_out, query, key_cache, value_cache, *rest):
    paged_attention_v1(out, query, key_cache, value_cache, *rest)


def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale,
                      interleaved_v=False):
    block_size, x = key_cache.shape[3], key_cache.shape[4]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue  # padding
        block, offset = divmod(slot, block_size)
        key_cache[block, :, :, offset, :] = key[t].reshape(key.shape[1], -1, x)
        value_cache[block, :, :, offset] = value[t]


def reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale):
    tokens = slot_mapping.shape[0]  # key may have more rows (CUDA-graph padding)
    live = slot_mapping >= 0
    slots = slot_mapping[live].long()
    key_cache.view(-1, *key_cache.shape[2:])[slots] = key[:tokens][live]
    value_cache.view(-1, *value_cache.shape[2:])[slots] = value[:tokens][live]


def concat_and_cache_mla(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale, skip_scale=False):
    """``csrc/cache_kernels.cu``: token t's latent and rope parts to slot ``slot_mapping[t]`` of
    ``kv_cache [num_blocks, block_size, kv_lora_rank + pe_dim]``; negative slots skipped."""
    tokens = slot_mapping.shape[0]
    live = slot_mapping >= 0
    rows = kv_cache.view(-1, kv_cache.shape[2])
    rows[slot_mapping[live].long()] = torch.cat([kv_c[:tokens], k_pe[:tokens]], dim=-1)[live].to(kv_cache.dtype)


_C.impl("paged_attention_v1", paged_attention_v1, "CPU")
_C.impl("paged_attention_v2", paged_attention_v2, "CPU")
_CACHE.impl("reshape_and_cache", reshape_and_cache, "CPU")
_CACHE.impl("reshape_and_cache_flash", reshape_and_cache_flash, "CPU")
_CACHE.impl("concat_and_cache_mla", concat_and_cache_mla, "CPU")
