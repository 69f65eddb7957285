"""Built-in rules for the paged-KV kernels SGLang 0.5.23 calls (``sglang.kernels.ops.attention``,
sgl-kernel 0.4.10, sgl-flash-mla 1.0.0) and for its KV pools' writes.

Which backend SGLang picks (``sglang/srt/arg_groups/model_override_base.py``,
``get_default_attn_backend``): MHA models run ``fa3`` on Hopper, ``trtllm_mha`` (FlashInfer's
``trtllm_batch_decode_with_kv_cache``: ``rules/flashinfer.py``) or ``fa4`` on Blackwell,
``flashinfer`` (FlashInfer's paged wrappers) or ``triton`` elsewhere; MLA models run ``fa3`` on
Hopper, ``flashinfer`` (FlashInfer's MLA wrapper) on Blackwell, ``triton`` elsewhere. Paths
below are relative to ``site-packages/sglang``.

- **FlashAttention 3 / 4** (``fa3`` / ``fa4``). The backend (``srt/layers/attention/
  flashattention_backend.py``) calls ``kernels/ops/attention/flash_attention.py``
  ``flash_attn_with_kvcache(..., ver=3|4)`` / ``flash_attn_varlen_func``, which call
  ``flash_attention_v3.py`` (-> ``sgl_kernel.flash_attn``, FlashAttention 3's
  ``hopper/``) or ``flash_attention_v4.py`` (FA4, ``flash_attn/cute``); its ``__init__`` also
  keeps ``sgl_kernel.flash_attn.flash_attn_varlen_func`` as an attribute. Every one of these
  is a target (a call is checked once, at the outermost). ``page_table`` int32
  ``[batch, W]`` indexes ``k_cache`` / ``v_cache`` ``[num_pages, page_size, heads_k, dim]``;
  row b's KV length is ``cache_seqlens[b]`` (+ the new ``k`` tokens, FA3 only) and its pages
  are read up to ``ceil(len / page_size)`` (FA3 ``hopper/paged_kv.h`` masks rows at
  ``seqlen_k``; FA4 ``flash_attn/cute`` the same). A local window skips whole ``kBlockN``
  tiles, and the page size need not be a multiple of the tile: the first page read is bounded
  with the largest tile (:func:`tsan_paged.rules.flash_attn.paged_kv_access`).
- **Triton** (``triton``). ``decode_attention.py`` ``decode_attention_fwd`` (and
  ``decode_attention_fwd_normal`` / ``_grouped``, module globals it calls: the backend keeps
  ``torch.compiler.disable(decode_attention_fwd)`` from its ``__init__``, so a sanitizer
  started later still sees those): ``_fwd_kernel_stage1`` reads, for request
  ``b < q.shape[0]``, ``kv_indices[kv_indptr[b] : kv_indptr[b + 1]]``, each a TOKEN SLOT of
  ``k_buffer`` / ``v_buffer`` ``[slots, heads, dim]`` (with ``page_size > 1`` too: page
  ``slot // page_size``, the same address). ``extend_attention.py`` ``extend_attention_fwd``:
  request ``b < qo_indptr.shape[0] - 1`` reads its prefix slots the same way (not with
  ``skip_prefix``; with ``identity_kv_indices`` no index is read);
  ``extend_attention_fwd_unified``: prefix and new tokens' slots, the same way. SGLang
  over-allocates ``kv_indices``: entries past ``kv_indptr[-1]`` are never read. Slot 0 is the
  pools' padding slot (``memory_pool.py``), the guard value.
- **FlashMLA** (``flashmla``): ``kernels/ops/attention/flash_mla_interface.py``
  ``flash_mla_with_kvcache`` (-> sgl-flash-mla): the FlashMLA rule (``rules/flash_mla.py``).
- **KV writes**: ``srt/mem_cache/memory_pool.py`` ``MHATokenToKVPool.set_kv_buffer`` and
  ``MLATokenToKVPool.set_kv_buffer`` / ``set_mla_kv_buffer`` write token t of the step into
  slot ``loc[t]`` (``out_cache_loc``, or a ``KVWriteLoc``'s ``loc``) of buffers of
  ``size + page_size`` rows (``_create_buffers``; SGLang's own optional check,
  ``maybe_detect_oob``, uses the same bound). ``k_buffer[loc] = k`` wraps a negative slot onto
  the last rows: negative slots are out of range here. ``SWAKVPool.set_kv_buffer`` translates
  ``loc`` and calls the MHA pool's, which is checked with the translated slots. Every layer of a
  step writes through the same ``loc``: an eager step checks it at the first layer's write only
  (a captured graph checks every layer's).
"""

from __future__ import annotations

import torch

from .. import checks, tracking
from ..access import Buffer, CsrPages, PageTable, Slots
from ..registry import rule
from ..report import Violation
from .flash_attn import paged_kv_access
from .flash_mla import FLASH_MLA_READS, flash_mla_access

OPS = "sglang.kernels.ops.attention"
FA3_MAX_TILE = 224  # FlashAttention 3 hopper/tile_size.h: the largest kBlockN (fp8, head_dim 128)
FA4_MAX_TILE = 224  # flash_attn/cute: its tiles are no larger than FA3's


# -- FlashAttention 3 / 4 ------------------------------------------------------------------
_FA_KVCACHE_READS = ("q", "k_cache", "v_cache", "k", "cache_seqlens", "cache_batch_idx", "cache_leftpad",
                     "page_table", "cu_seqlens_q", "cu_seqlens_k_new", "max_seqlen_q", "window_size")


def _fa_kvcache(call, version: int):
    (q, k_cache, v_cache, k_new, lengths, batch_idx, leftpad, table, cu_q, cu_k_new, max_q,
     window) = call.read(_FA_KVCACHE_READS)
    if table is None:
        return []  # not paged
    if batch_idx is not None or leftpad is not None:
        return [checks.unsupported_form(call.target, "cache_batch_idx" if batch_idx is not None else "cache_leftpad",
                            "a page table with cache_batch_idx / cache_leftpad")]
    batch = cu_q.shape[0] - 1 if cu_q is not None else q.shape[0]
    q_len = (max_q if max_q is not None else q.shape[0]) if cu_q is not None else q.shape[1]
    new_tokens, writes = 0, isinstance(k_new, torch.Tensor)  # FA3 appends k / v through the table
    if writes and lengths is not None:
        if isinstance(lengths, int):
            lengths = torch.full((batch,), lengths, dtype=torch.int32, device=q.device)
        if cu_k_new is not None:  # ragged new tokens: each row's own count joins its length
            lengths = lengths + (cu_k_new[1:] - cu_k_new[:-1]).to(lengths.dtype)
        else:
            new_tokens = int(k_new.shape[1])
    return paged_kv_access(device=q.device, batch=batch, k_cache=k_cache, v_cache=v_cache, table=table,
                           table_arg="page_table", lengths=lengths, new_tokens=new_tokens, q_len=q_len,
                           window_left=window[0] if window is not None else -1,
                           max_tile=FA4_MAX_TILE if version == 4 else FA3_MAX_TILE, writes=writes, call=call,
                           cu_seqlens_q=cu_q)


_FA_VARLEN_READS = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "seqused_k", "max_seqlen_q", "page_table",
                    "window_size")


def _fa_varlen(call, version: int):
    q, k, v, cu_q, cu_k, seqused_k, max_q, table, window = call.read(_FA_VARLEN_READS)
    if table is None:
        return []  # not paged: k and v are the tokens themselves
    lengths, lengths_arg = seqused_k, "seqused_k"
    if lengths is None and cu_k is not None:
        lengths, lengths_arg = (cu_k[1:] - cu_k[:-1]).to(torch.int32), "cu_seqlens_k"
    batch = table.shape[0] if cu_q is None else cu_q.shape[0] - 1
    q_len = (max_q if max_q is not None else q.shape[0]) if cu_q is not None else q.shape[1]
    return paged_kv_access(device=q.device, batch=batch, k_cache=k, v_cache=v, table=table, table_arg="page_table",
                           lengths=lengths, lengths_arg=lengths_arg, q_len=q_len,
                           window_left=window[0] if window is not None else -1,
                           max_tile=FA4_MAX_TILE if version == 4 else FA3_MAX_TILE, cache_args=("k", "v"),
                           call=call, cu_seqlens_q=cu_q)


@rule(f"{OPS}.flash_attention:flash_attn_with_kvcache", name="sglang.flash_attn_with_kvcache",
      reads=_FA_KVCACHE_READS + ("ver",))
def fa_with_kvcache(call):
    return _fa_kvcache(call, call["ver"])


@rule(f"{OPS}.flash_attention:flash_attn_varlen_func", name="sglang.flash_attn_varlen_func",
      reads=_FA_VARLEN_READS + ("ver",))
def fa_varlen(call):
    return _fa_varlen(call, call["ver"])


for _module, _version in (("flash_attention_v3", 3), ("flash_attention_v4", 4), ("flash_attention_v4_sm120", 4)):
    rule(f"{OPS}.{_module}:flash_attn_with_kvcache", name=f"sglang.{_module}.flash_attn_with_kvcache",
         reads=_FA_KVCACHE_READS)(lambda call, v=_version: _fa_kvcache(call, v))
    rule(f"{OPS}.{_module}:flash_attn_varlen_func", name=f"sglang.{_module}.flash_attn_varlen_func",
         reads=_FA_VARLEN_READS)(lambda call, v=_version: _fa_varlen(call, v))
# sgl-kernel's FA3 (the ops flash_attention_v3 loads; the fa3 backend also keeps them as attributes)
rule("sgl_kernel.flash_attn:flash_attn_with_kvcache", name="sgl_kernel.flash_attn_with_kvcache",
     reads=_FA_KVCACHE_READS)(lambda call: _fa_kvcache(call, 3))
rule("sgl_kernel.flash_attn:flash_attn_varlen_func", name="sgl_kernel.flash_attn_varlen_func",
     reads=_FA_VARLEN_READS)(lambda call: _fa_varlen(call, 3))


# -- Triton decode / extend: CSR lists of token slots ----------------------------------------
def _slot_list(call, *, device, k_buffer, v_buffer, indptr, indices, rows):
    """Requests ``b < rows`` read ``indices[indptr[b]:indptr[b + 1]]``: slots of the KV buffers."""
    found = []
    for tensor, arg in ((indptr, "kv_indptr"), (indices, "kv_indices")):
        found += checks.check_dtype(tensor, arg, (torch.int32, torch.int64))
        found += checks.check_device(tensor, arg, device, "q")
    if found:
        return found
    if indptr.dim() != 1 or indptr.shape[0] < rows + 1:
        return found + [Violation("shape-mismatch", "kv_indptr", f"kv_indptr has shape {tuple(indptr.shape)}, the "
                                  f"kernel reads {rows + 1} entries ({rows} requests)", value=tuple(indptr.shape),
                                  bound=(rows + 1,))]
    slots = min(int(k_buffer.shape[0]), int(v_buffer.shape[0]))
    name = "k_buffer" if int(k_buffer.shape[0]) == slots else "v_buffer"
    access = CsrPages(indptr[: rows + 1], indices, (Buffer(name, slots),), indptr_arg="kv_indptr",
                      indices_arg="kv_indices", unit="slot")
    return [access] + tracking.check_read_pages(call, access, (k_buffer, v_buffer), q_len=1)


_DECODE_READS = ("q", "k_buffer", "v_buffer", "kv_indptr", "kv_indices")


def _triton_decode(call):
    q, k_buffer, v_buffer, indptr, indices = call.read(_DECODE_READS)
    return _slot_list(call, device=q.device, k_buffer=k_buffer, v_buffer=v_buffer, indptr=indptr, indices=indices,
                      rows=int(q.shape[0]))


for _name in ("decode_attention_fwd", "decode_attention_fwd_normal", "decode_attention_fwd_grouped"):
    rule(f"{OPS}.decode_attention:{_name}", name=f"sglang.{_name}", reads=_DECODE_READS)(_triton_decode)

_EXTEND_READS = ("q_extend", "k_buffer", "v_buffer", "qo_indptr", "kv_indptr", "kv_indices", "skip_prefix",
                 "identity_kv_indices")


@rule(f"{OPS}.extend_attention:extend_attention_fwd", name="sglang.extend_attention_fwd", reads=_EXTEND_READS)
def extend_attention_fwd(call):
    """Every prefix slot counts as read, also with ``sliding_window_size > 0``: the kernel then
    skips a whole ``BLOCK_N_PREFIX`` tile of prefix slots left of every query row's window
    (``SKIP_TILE``), but that tile size (and ``BLOCK_M``) is chosen per device, so the first slot
    loaded is not known from the call. The region is wider than the kernel's by the skipped tiles
    (``tests/test_read_region_oracle.py`` measures ~10% of window entries); SGLang's own lists hold
    in-range slots there (an evicted SWA token translates to the padding slot 0), so it reports
    nothing on its tables."""
    q, k_buffer, v_buffer, qo_indptr, indptr, indices, skip_prefix, identity = call.read(_EXTEND_READS)
    if skip_prefix or identity:
        return []  # no prefix index is read
    return _slot_list(call, device=q.device, k_buffer=k_buffer, v_buffer=v_buffer, indptr=indptr, indices=indices,
                      rows=int(qo_indptr.shape[0]) - 1)


_UNIFIED_READS = ("q", "k_buffer", "v_buffer", "qo_indptr", "kv_indptr", "kv_indices")


@rule(f"{OPS}.extend_attention:extend_attention_fwd_unified", name="sglang.extend_attention_fwd_unified",
      reads=_UNIFIED_READS)
def extend_attention_fwd_unified(call):
    q, k_buffer, v_buffer, qo_indptr, indptr, indices = call.read(_UNIFIED_READS)
    return _slot_list(call, device=q.device, k_buffer=k_buffer, v_buffer=v_buffer, indptr=indptr, indices=indices,
                      rows=int(qo_indptr.shape[0]) - 1)


# -- torch_native: SGLang's own torch attention -------------------------------------------------
BACKENDS = "sglang.srt.layers.attention"
_NATIVE_READS = ("k_cache", "v_cache", "req_to_token", "req_pool_indices", "seq_lens", "encoder_lens",
                 "is_cross_attn")


def _torch_native(call):
    """``TorchNativeAttnBackend._run_sdpa_forward_decode`` / ``_extend``: request ``b`` reads the
    token slots ``req_to_token[req_pool_indices[b], start:end]`` of ``k_cache`` / ``v_cache``
    (``[slots, heads, dim]``), ``start, end = 0, seq_lens[b]`` (with ``encoder_lens``: the encoder's
    ``0, encoder_lens[b]`` for cross-attention, else ``encoder_lens[b]`` onwards), every one of
    them (a sliding window masks after the gather). Findings are at ``(b, position)`` of the rows
    the batch reads, ``req_to_token[req_pool_indices]``."""
    k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, encoder_lens, cross = call.read(_NATIVE_READS)
    rows = int(req_to_token.shape[0])
    found = [PageTable(req_pool_indices.reshape(-1, 1), "req_pool_indices", (Buffer("req_to_token", rows, "row"),),
                       whole_row=True)]
    table = req_to_token[req_pool_indices.clamp(0, rows - 1)]  # a bad request index is the finding above
    if encoder_lens is None:
        first, end = None, seq_lens
    elif cross:
        first, end = None, encoder_lens
    else:
        first, end = encoder_lens, encoder_lens + seq_lens
    slots = min(int(k_cache.shape[0]), int(v_cache.shape[0]))
    name = "k_cache" if int(k_cache.shape[0]) == slots else "v_cache"
    access = PageTable(table, "req_to_token[req_pool_indices]", (Buffer(name, slots, "slot"),),
                       lengths=end, lengths_arg="seq_lens" if encoder_lens is None else "encoder_lens + seq_lens",
                       first=first, end=end, explicit_region=True)
    return found + [access] + tracking.check_read_pages(call, access, (k_cache, v_cache), q_len=1, slots=True)


for _method in ("_run_sdpa_forward_decode", "_run_sdpa_forward_extend"):
    rule(f"{BACKENDS}.torch_native_backend:TorchNativeAttnBackend.{_method}",
         name=f"sglang.TorchNativeAttnBackend.{_method}", reads=_NATIVE_READS)(_torch_native)


# -- FlashMLA (sgl-flash-mla) -----------------------------------------------------------------
rule(f"{OPS}.flash_mla_interface:flash_mla_with_kvcache", name="sglang.flash_mla_with_kvcache",
     reads=FLASH_MLA_READS)(flash_mla_access)


# -- KV pool writes ------------------------------------------------------------------------
POOLS = "sglang.srt.mem_cache.memory_pool"
_WRITE_READS = ("self", "loc_info")


_last_write: list = [None]  # (loc, its version, the bound) of the last write checked


def _pool_write(call, dcp_widened=False):
    pool, loc = call.read(_WRITE_READS)
    loc = getattr(loc, "loc", loc)  # a KVWriteLoc (memory_pool.py unwrap_write_loc) or the slots
    if not isinstance(loc, torch.Tensor):
        return []
    rows = int(pool.size) + int(pool.page_size)
    if dcp_widened:  # set_mla_kv_buffer: loc is widened under decode context parallel
        rows *= int(getattr(pool, "_write_loc_dcp_span", 1))
    # Every layer of a step writes through the same loc tensor: an eager step checks it once, not
    # once per layer. A loc written in place since, or another pool's bound, is checked again;
    # while a graph is captured every write is (a capture must hold its own check).
    if loc.is_cuda and torch.cuda.is_current_stream_capturing():
        _last_write[0] = None
    else:
        seen = (loc, loc._version, rows)
        last = _last_write[0]
        if last is not None and last[0] is loc and last[1:] == seen[1:]:
            return []
        _last_write[0] = seen
    return [Slots(loc.reshape(-1), "loc", Buffer(f"{type(pool).__name__} (size + page_size)", rows), guard=0,
                  negative_skipped=False)]


for _method in ("MHATokenToKVPool.set_kv_buffer", "MLATokenToKVPool.set_kv_buffer"):
    rule(f"{POOLS}:{_method}", name=f"sglang.{_method}", reads=_WRITE_READS)(_pool_write)
rule(f"{POOLS}:MLATokenToKVPool.set_mla_kv_buffer", name="sglang.MLATokenToKVPool.set_mla_kv_buffer",
     reads=_WRITE_READS)(lambda call: _pool_write(call, dcp_widened=True))

_PREFIX_VALID_READS = ("self", "loc_2d", "commit_lens")


@rule(f"{POOLS}:MHATokenToKVPool.set_kv_buffer_prefix_valid", name="sglang.MHATokenToKVPool.set_kv_buffer_prefix_valid",
      reads=_PREFIX_VALID_READS)
def _pool_write_prefix_valid(call):
    """DFlash speculative decoding's draft-KV commit (``memory_pool.py``): row ``b`` writes
    ``cache_k / cache_v`` rows to the slots ``loc_2d[b, :commit_lens[b]]`` (a tiled kernel on CUDA,
    ``set_kv_buffer`` elsewhere); the rest of each row is not written. Forms SGLang refuses with its
    own ``ValueError`` (ranks, batch sizes) are left to it; it moves ``commit_lens`` to the pool's
    device, and so does the check."""
    pool, loc_2d, commit_lens = call.read(_PREFIX_VALID_READS)
    if not (isinstance(loc_2d, torch.Tensor) and isinstance(commit_lens, torch.Tensor)) or loc_2d.dim() != 2 \
            or commit_lens.dim() != 1 or commit_lens.shape[0] != loc_2d.shape[0]:
        return []
    if commit_lens.device != loc_2d.device:
        commit_lens = commit_lens.to(loc_2d.device, non_blocking=True)
    rows = int(pool.size) + int(pool.page_size)
    return [PageTable(loc_2d, "loc_2d", (Buffer(f"{type(pool).__name__} (size + page_size)", rows, "slot"),),
                      lengths=commit_lens, lengths_arg="commit_lens", guard=0)]
