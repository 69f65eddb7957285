"""vLLM 0.33.0's paged Python entry points, as a package ``vllm`` written to a temp directory.

vLLM cannot be installed on this CPU machine (CUDA-only wheels, a GPU stack). These modules
have the exact paths and signatures of vLLM 0.33.0 (``vllm/vllm_flash_attn/
flash_attn_interface.py`` L176-219, ``vllm/v1/attention/ops/triton_unified_attention.py``
L828-877, ``vllm/third_party/flashmla/flash_mla_interface.py`` L60-80 (vendored FlashMLA),
``vllm/v1/attention/ops/flashmla.py`` ``flash_mla_with_kvcache_fp8``) and a real CPU
implementation of the paged read: each request's pages ``block_table[b, j]`` for
``j < ceil(seqused_k[b] / block_size)`` are gathered (an IndexError on a page past the cache)
(from a window's first page) and attended to. The rules bound to them are the built-in ones,
untouched.
"""

import importlib
import sys
import textwrap

PAGED = textwrap.dedent('''
    import torch


    def paged_attention(q, k, v, cu_seqlens_q, seqused_k, block_table, window_left=-1):
        """q [tokens, H, D]; k / v [num_blocks, block_size, h_k, d]; causal, bottom-right aligned."""
        out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype)
        block_size = k.shape[1]
        for b in range(seqused_k.shape[0]):
            rows = slice(int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]))
            length, seqlen_q = int(seqused_k[b]), rows.stop - rows.start
            if seqlen_q == 0 or length == 0:
                continue
            first = 0  # the FA3 fork's window start: its first key's page (exact)
            if window_left is not None and window_left >= 0:
                first = max(length - seqlen_q - window_left, 0) // block_size
            pages = block_table[b, first: -(-length // block_size)].long()
            keys = torch.cat([torch.zeros(first * block_size, *k.shape[2:]),
                              k[pages].reshape(-1, *k.shape[2:])])[:length]
            values = torch.cat([torch.zeros(first * block_size, *v.shape[2:]),
                                v[pages].reshape(-1, *v.shape[2:])])[:length]
            group = q.shape[1] // k.shape[2]
            keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
            scores = torch.einsum("qhd,khd->hqk", q[rows].float(), keys.float()) * q.shape[-1] ** -0.5
            pos = torch.arange(length)
            row = torch.arange(seqlen_q).unsqueeze(1) + length - seqlen_q
            mask = pos <= row
            if window_left is not None and window_left >= 0:
                mask &= pos >= row - window_left
            scores = scores.masked_fill(~mask, float("-inf"))
            out[rows] = torch.einsum("hqk,khd->qhd", scores.softmax(-1).nan_to_num(), values.float()).to(q.dtype)
        return out
''')

FLASH_ATTN = textwrap.dedent('''
    from vllm._paged import paged_attention


    def flash_attn_varlen_func(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k=None, seqused_k=None,
                               q_v=None, dropout_p=0.0, softmax_scale=None, causal=False, window_size=None,
                               softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                               block_table=None, return_softmax_lse=False, out=None, scheduler_metadata=None,
                               q_descale=None, k_descale=None, v_descale=None, num_splits=0, output_scale=None,
                               fa_version=2, s_aux=None, cp_world_size=1, cp_rank=0, cp_tot_seqused_k=None,
                               mask_mod=None, block_sparse_tensors=None, aux_tensors=None,
                               aux_tensor_leading_dims=None, dynamic_causal=None, gather_kv_indices=None,
                               gather_kv_valid_length=None):
        assert cu_seqlens_k is not None or seqused_k is not None, "cu_seqlens_k or seqused_k must be provided"
        assert block_table is not None, "this CPU module implements the paged path only"
        result = paged_attention(q, k, v, cu_seqlens_q, seqused_k, block_table,
                                 window_size[0] if window_size is not None else -1)
        if out is not None:
            out.copy_(result)
            return out
        return result
''')

UNIFIED = textwrap.dedent('''
    from vllm._paged import paged_attention


    def unified_attention(q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale, causal,
                          window_size, block_table, softcap, q_descale, k_descale, v_descale, seq_threshold_3D=None,
                          num_par_softmax_segments=None, softmax_segm_output=None, softmax_segm_max=None,
                          softmax_segm_expsum=None, alibi_slopes=None, output_scale=None, qq_bias=None, sinks=None,
                          mm_prefix_range=None, rswa_prefix_lens=None, rswa_window=None, use_alibi_sqrt=False,
                          kv_quant_mode=None, k_scale_cache=None, v_scale_cache=None, chunk_lookback=-1,
                          use_td=False, mm_prefix_clamp_sliding_window=False):
        out.copy_(paged_attention(q, k, v, cu_seqlens_q, seqused_k, block_table, window_size[0]))
''')

FLASH_MLA = textwrap.dedent('''
    import torch


    class FlashMLASchedMeta:
        pass


    def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                               num_splits=None, softmax_scale=None, causal=False, is_fp8_kvcache=False, indices=None,
                               attn_sink=None, extra_k_cache=None, extra_indices_in_kvcache=None, topk_length=None,
                               extra_topk_length=None, out=None, enable_batch_invariant=False):
        """Dense decode: q [B, s_q, h_q, d], k_cache [num_blocks, 64, 1, d]; V is the first head_dim_v."""
        assert indices is None, "this CPU module implements the dense path only"
        batch, s_q, heads, dim = q.shape
        out = torch.zeros(batch, s_q, heads, head_dim_v, dtype=q.dtype)
        lse = torch.zeros(batch, heads, s_q)
        for b in range(batch):
            length = int(cache_seqlens[b])
            pages = block_table[b, : max(-(-length // k_cache.shape[1]), 1)].long()  # column 0 even at length 0
            kv = k_cache[pages].reshape(-1, dim)[:length].float()
            scores = torch.einsum("shd,td->sht", q[b].float(), kv) * (softmax_scale or dim ** -0.5)
            out[b] = torch.einsum("sht,td->shd", scores.softmax(-1).nan_to_num(), kv[:, :head_dim_v]).to(q.dtype)
        return out, lse
''')

FILES = {
    "vllm/__init__.py": "",
    "vllm/_paged.py": PAGED,
    "vllm/vllm_flash_attn/__init__.py": "from vllm.vllm_flash_attn.flash_attn_interface import flash_attn_varlen_func\n",
    "vllm/vllm_flash_attn/flash_attn_interface.py": FLASH_ATTN,
    "vllm/v1/__init__.py": "",
    "vllm/v1/attention/__init__.py": "",
    "vllm/v1/attention/ops/__init__.py": "",
    "vllm/v1/attention/ops/triton_unified_attention.py": UNIFIED,
    "vllm/third_party/__init__.py": "",
    "vllm/third_party/flashmla/__init__.py": "",
    "vllm/third_party/flashmla/flash_mla_interface.py": FLASH_MLA,
}
MODULES = ("vllm.vllm_flash_attn", "vllm.v1.attention.ops.triton_unified_attention",
           "vllm.third_party.flashmla.flash_mla_interface")


def install(directory):
    """Write the package under ``directory`` (on ``sys.path``) and import its modules."""
    for path, text in FILES.items():
        target = directory / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    sys.path.insert(0, str(directory))
    return [importlib.import_module(name) for name in MODULES]


def uninstall(directory):
    sys.path.remove(str(directory))
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        del sys.modules[name]
