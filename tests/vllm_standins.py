"""Stand-ins for vLLM 0.33.0's compiled extensions, the only part of vLLM the CPU tests replace.

vLLM's Python (its FlashAttention and FlashMLA interfaces, its backends, its Triton kernels) is
the installed package, unmodified. What cannot load on a CPU machine is its compiled code (the
``.so`` files need libcuda; ``.ci/install`` removes them). These modules stand in for it, at the
import path vLLM imports and with the op schemas the real extensions register (copied from the
schema strings in vLLM 0.33.0's ``.so`` files), each with a CPU implementation of the paged read
(gathers each request's pages, an IndexError on a page past the cache, and attends to them):

- ``vllm.vllm_flash_attn._vllm_fa2_C`` -> ``torch.ops._vllm_fa2_C.varlen_fwd`` (FA2, what
  ``flash_attn_varlen_func(..., fa_version=2)`` calls);
- ``vllm.vllm_flash_attn._vllm_fa3_C`` -> ``torch.ops._vllm_fa3_C.fwd`` (FA3, ``fa_version=3``);
- ``vllm._flashmla_C`` -> ``torch.ops._flashmla_C.dense_decode_fwd`` (what the vendored
  ``vllm.third_party.flashmla.flash_mla_interface.flash_mla_with_kvcache`` calls, dense form);
- ``_C_cache_ops`` (``reshape_and_cache``, ``reshape_and_cache_flash``, ``concat_and_cache_mla``):
  ``vllm_ops.py``, which ``vllm._custom_ops``' wrappers call.

Registering a module in ``sys.modules`` before vLLM imports it is what makes ``from . import
_vllm_fa2_C`` (``vllm_flash_attn/flash_attn_interface.py``) and ``import vllm._flashmla_C``
succeed; vLLM's code around them runs as shipped.
"""

import importlib.util
import sys
import types

import torch

import vllm_ops  # noqa: F401  (_C_cache_ops with vLLM 0.33.0's schemas and CPU kernels)

FA2_VARLEN_FWD = ("varlen_fwd(Tensor! q, Tensor k, Tensor v, Tensor!? out, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
                  "Tensor? seqused_k, Tensor? leftpad_k, Tensor? block_table, Tensor? alibi_slopes, int max_seqlen_q, "
                  "int max_seqlen_k, float p_dropout, float softmax_scale, bool zero_tensors, bool is_causal, "
                  "int window_size_left, int window_size_right, float softcap, bool return_softmax, int num_splits, "
                  "Tensor? gen) -> Tensor[]")
FA3_FWD = ("fwd(Tensor! q, Tensor k, Tensor v, Tensor? k_new, Tensor? v_new, Tensor? q_v, Tensor!? out, "
           "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? cu_seqlens_k_new, Tensor? seqused_q, Tensor? seqused_k, "
           "int? max_seqlen_q, int? max_seqlen_k, Tensor? page_table, Tensor? kv_batch_idx, Tensor? leftpad_k, "
           "Tensor? rotary_cos, Tensor? rotary_sin, Tensor? seqlens_rotary, Tensor? q_descale, Tensor? k_descale, "
           "Tensor? v_descale, float softmax_scale, bool is_causal, int window_size_left, int window_size_right, "
           "float softcap, bool is_rotary_interleaved, Tensor? scheduler_metadata, int num_splits, bool? pack_gqa, "
           "int sm_margin, Tensor? s_aux, int cp_world_size, int cp_rank, Tensor? cp_tot_seqused_k) -> Tensor[]")
FLASHMLA_DENSE_DECODE = ("dense_decode_fwd(Tensor q, Tensor kcache, int head_size_v, Tensor seqlens_k, "
                         "Tensor block_table, float softmax_scale, bool is_causal, Tensor(a)? tile_scheduler_metadata, "
                         "Tensor(b)? num_splits, Tensor(c!)? out_) -> (Tensor(c!), Tensor, Tensor(a)?, Tensor(b)?)")


def paged_attention(q, k, v, cu_seqlens_q, seqused_k, block_table, window_left, scale, first_page=None):
    """``q [tokens, H, D]``; ``k`` / ``v`` ``[num_blocks, block_size, h_k, d]``; causal,
    bottom-right aligned, each request's keys gathered from its pages (from ``first_page(b)``)."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype)
    block_size = k.shape[1]
    for b in range(seqused_k.shape[0]):
        rows = slice(int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]))
        length, seqlen_q = int(seqused_k[b]), rows.stop - rows.start
        if seqlen_q == 0 or length == 0:
            continue
        first = first_page(length, seqlen_q) if first_page is not None and window_left >= 0 else 0
        pages = block_table[b, first: -(-length // block_size)].long()
        pad = torch.zeros(first * block_size, *k.shape[2:], dtype=k.dtype)
        keys = torch.cat([pad, k[pages].reshape(-1, *k.shape[2:])])[:length]
        values = torch.cat([pad, v[pages].reshape(-1, *v.shape[2:])])[:length]
        group = q.shape[1] // k.shape[2]
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q[rows].float(), keys.float()) * scale
        pos = torch.arange(length)
        row = torch.arange(seqlen_q).unsqueeze(1) + length - seqlen_q
        mask = pos <= row
        if window_left >= 0:
            mask &= pos >= row - window_left
        scores = scores.masked_fill(~mask, float("-inf"))
        out[rows] = torch.einsum("hqk,khd->qhd", scores.softmax(-1).nan_to_num(), values.float()).to(q.dtype)
    return out


def _fa2_varlen_fwd(q, k, v, out, cu_seqlens_q, cu_seqlens_k, seqused_k, leftpad_k, block_table, alibi_slopes,
                    max_seqlen_q, max_seqlen_k, p_dropout, softmax_scale, zero_tensors, is_causal, window_size_left,
                    window_size_right, softcap, return_softmax, num_splits, gen):
    assert block_table is not None and seqused_k is not None, "this stand-in implements the paged path only"
    # FA2 (csrc/flash_attn/src/flash_fwd_kernel.h): a window starts at a whole kBlockN tile; kBlockN
    # divides 256 and the page: with pages of >= 256 tokens, at the first key's page.
    result = paged_attention(q, k, v, cu_seqlens_q, seqused_k, block_table, window_size_left, softmax_scale,
                             lambda n, sq: 0)
    out = result if out is None else out.copy_(result)
    return [out, torch.zeros(q.shape[1], q.shape[0])]


def _fa3_fwd(q, k, v, k_new, v_new, q_v, out, cu_seqlens_q, cu_seqlens_k, cu_seqlens_k_new, seqused_q, seqused_k,
             max_seqlen_q, max_seqlen_k, page_table, *rest):
    softmax_scale, is_causal, window_size_left = rest[8], rest[9], rest[10]
    assert page_table is not None and seqused_k is not None, "this stand-in implements the paged path only"
    block_size = k.shape[1]
    # FA3's fork (hopper/block.h): a window starts at its first key, so at that key's page
    result = paged_attention(q, k, v, cu_seqlens_q, seqused_k, page_table, window_size_left, softmax_scale,
                             lambda n, sq: max(n - sq - window_size_left, 0) // block_size)
    out = result if out is None else out.copy_(result)
    return [out, torch.zeros(q.shape[1], q.shape[0]), torch.empty(0), torch.empty(0)]


def _flashmla_dense_decode_fwd(q, kcache, head_size_v, seqlens_k, block_table, softmax_scale, is_causal,
                               tile_scheduler_metadata, num_splits, out_):
    """FlashMLA dense decode: ``q [B, s_q, h_q, d]``, ``kcache [num_blocks, 64, 1, d]``; V is the
    first ``head_size_v`` of each row. Column 0 is loaded even at length 0 (as the kernel does)."""
    batch, s_q, heads, dim = q.shape
    out = torch.zeros(batch, s_q, heads, head_size_v, dtype=q.dtype) if out_ is None else out_
    lse = torch.zeros(batch, heads, s_q)
    for b in range(batch):
        length = int(seqlens_k[b])
        pages = block_table[b, : max(-(-length // kcache.shape[1]), 1)].long()
        kv = kcache[pages].reshape(-1, dim)[:length].float()
        scores = torch.einsum("shd,td->sht", q[b].float(), kv) * softmax_scale
        out[b] = torch.einsum("sht,td->shd", scores.softmax(-1).nan_to_num(), kv[:, :head_size_v]).to(q.dtype)
    return out, lse, tile_scheduler_metadata, num_splits


_LIBRARIES = []


def _define(namespace, schema, fn):
    lib = torch.library.Library(namespace, "FRAGMENT")
    lib.define(schema)
    lib.impl(schema.split("(", 1)[0], fn, "CPU")
    _LIBRARIES.append(lib)


def _module(name):
    module = types.ModuleType(name)
    module.__file__ = f"<tests/vllm_standins.py: stand-in for vLLM's compiled {name}>"
    sys.modules[name] = module
    return module


def install():
    """Registers the stand-in modules and ops (once). ``ImportError`` where vLLM is not installed."""
    if importlib.util.find_spec("vllm") is None:
        raise ImportError("No module named 'vllm'")
    if "vllm.vllm_flash_attn._vllm_fa2_C" in sys.modules:
        return
    _define("_vllm_fa2_C", FA2_VARLEN_FWD, _fa2_varlen_fwd)
    _define("_vllm_fa3_C", FA3_FWD, _fa3_fwd)
    _define("_flashmla_C", FLASHMLA_DENSE_DECODE, _flashmla_dense_decode_fwd)
    for name in ("vllm.vllm_flash_attn._vllm_fa2_C", "vllm.vllm_flash_attn._vllm_fa3_C", "vllm._flashmla_C"):
        _module(name)
