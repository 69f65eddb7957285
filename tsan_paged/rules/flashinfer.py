"""Built-in rules for FlashInfer (flashinfer-python 0.7.2.post1).

``trtllm_batch_decode_with_kv_cache`` (``flashinfer/decode.py``): what the kernel reads.

- ``kv_cache`` is a tuple ``(k, v)`` of ``[P, H, ps, D]`` (HND) / ``[P, ps, H, D]`` (NHD),
  or one tensor ``[P, 2, ...]`` (unbound into K and V along dim 1) or ``[P, 1, ...]`` (K and
  V are the same tensor). K and V page counts are checked separately.
- ``block_tables`` is int32 ``[B, W]``; ``[B, 2, W]`` (K ids, V ids) when
  ``uses_shared_paged_kv_idx=False``; ``[H, B, W]`` with ``enable_block_sparse_attention``.
  The kernel reads row i at ``i * W`` ignoring strides, so it must be contiguous.
- Read region of row i, by backend (``"auto"`` is trtllm-gen on compute capability 10.x,
  else xqa; on a CPU tensor the xqa region is used):

  * xqa reads columns ``j < ceil(seq_lens[i] / ps)`` only (``mhaUtils.cuh`` ``getPage``).
    With a sliding window (``window_left >= 0``, ``win = window_left + 1``) it skips whole
    leading tiles: ``S = max(seq_len - q_len + 1 - win, 0)`` tokens, first page read
    ``floor(floor(S / tile) * tile / ps)``. The tile is 64 tokens in ``mha_sm90.cu``, which
    ``xqa.py`` runs only for an fp8 KV cache on sm90 with head_dim <= 256 (and q_len 1 under a
    window), else 256 tokens (``mha.cu``: 64 x 4); 256 when the GPU is unknown (CPU tensors).
  * trtllm-gen / cake (closed cubins; the seed crashed there on entries past a row's
    length): the whole row counts as read. Block-sparse rows: the packed front
    ``ceil(seq_lens / ps)`` entries.

Out-of-range entries outside the region are ``dead-page-out-of-range`` warnings: real
serving tables (SGLang's) hold stale values there.
"""

from __future__ import annotations

import sys
import weakref

import torch

from .. import checks
from .. import tracking
from ..access import Buffer, CsrPages, HostCheck, PageTable, Slots, Writes
from ..registry import rule
from ..report import Violation

TRTLLM_DECODE = "flashinfer.decode:trtllm_batch_decode_with_kv_cache"
XQA_SM90_TILE_TOKENS = 64    # mha_sm90.cu: gemm0CtaTileNbTokens (the Hopper fp8-KV kernel)
XQA_GENERIC_TILE_TOKENS = 256  # mha.cu: ctaTile.x = warpTile.x (64) * ctaShapeInWarps.x (4)
LENGTH_DTYPES = (torch.int32, torch.uint32)


def split_kv_cache(kv_cache, kv_layout: str):
    """``(k, v, k_name, v_name, page_size, findings)`` as the kernel sees the cache."""
    if kv_layout not in ("HND", "NHD"):
        return None, None, "", "", 0, [Violation("bad-layout", "kv_layout",
                                                 f"kv_layout = {kv_layout!r}; the kernel takes 'HND' or 'NHD'",
                                                 value=kv_layout, bound="HND|NHD")]
    if isinstance(kv_cache, (tuple, list)):
        if len(kv_cache) != 2 or not all(isinstance(t, torch.Tensor) for t in kv_cache):
            return None, None, "", "", 0, [Violation("shape-mismatch", "kv_cache",
                                                     "kv_cache tuple must hold two tensors (k, v)")]
        k, v = kv_cache
        k_name, v_name = "kv_cache[0]", "kv_cache[1]"
    else:
        if kv_cache.dim() != 5 or kv_cache.shape[1] not in (1, 2):
            return None, None, "", "", 0, [Violation(
                "shape-mismatch", "kv_cache",
                f"kv_cache has shape {tuple(kv_cache.shape)}; a single tensor must be [P, 1 or 2, ...] with 5 dims",
                value=tuple(kv_cache.shape))]
        if kv_cache.shape[1] == 1:
            k = v = kv_cache[:, 0]
            k_name = v_name = "kv_cache"
        else:
            k, v = kv_cache.unbind(dim=1)
            k_name, v_name = "kv_cache[:, 0]", "kv_cache[:, 1]"
    found = []
    if k.dim() != 4 or v.dim() != 4:
        found.append(Violation("shape-mismatch", "kv_cache",
                               f"K and V must be 4-D pages, got {tuple(k.shape)} and {tuple(v.shape)}"))
        return None, None, k_name, v_name, 0, found
    if k.shape[1:] != v.shape[1:]:
        found.append(Violation("shape-mismatch", "kv_cache",
                               f"K pages {tuple(k.shape[1:])} and V pages {tuple(v.shape[1:])} differ",
                               value=tuple(v.shape), bound=tuple(k.shape)))
    page_size = k.shape[2] if kv_layout == "HND" else k.shape[1]
    return k, v, k_name, v_name, int(page_size), found


def resolve_backend(backend: str, device: torch.device, capability=None) -> str:
    """The backend ``"auto"`` picks: trtllm-gen on compute capability 10.x, else xqa."""
    if backend != "auto":
        return backend
    if capability is None:
        if device.type != "cuda":
            return "xqa"
        capability = torch.cuda.get_device_capability(device)
    return "trtllm-gen" if capability[0] == 10 else "xqa"


_CAPABILITY: dict = {}


def _capability(call, device):
    """The compute capability the call runs on (``tsan-paged show`` sets the dumped device's)."""
    if call.options.cuda_capability is not None:
        return tuple(call.options.cuda_capability)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        cap = _CAPABILITY.get(index)
        if cap is None:
            cap = _CAPABILITY[index] = torch.cuda.get_device_capability(index)
        return cap
    return None


def _xqa_tile(k, head_dim, q_len, capability) -> int:
    """Tile of the kernel ``flashinfer.xqa.xqa`` picks (``xqa.py``: ``run_sm90_fp8_mha``).

    The Hopper kernel (``mha_sm90.cu``, 64-token tiles) runs only for an fp8 KV cache on
    compute capability 9.x with head_dim <= 256 and (for a sliding window) q_len 1; every
    other case runs ``mha.cu`` (256-token tiles). Unknown capability: the generic kernel,
    whose smaller skip reads more pages (the conservative choice).
    """
    if (capability is not None and capability[0] == 9 and k.dtype == torch.float8_e4m3fn
            and head_dim <= 256 and q_len == 1):
        return XQA_SM90_TILE_TOKENS
    return XQA_GENERIC_TILE_TOKENS


def _dtypes_and_devices(found, device, table, lengths, table_arg="block_tables", lengths_arg="seq_lens",
                        others=()) -> bool:
    """int32 table, int32/uint32 lengths, everything on the query's device (``others``: more
    ``(tensor, name)`` pairs). Appends findings; False when the values cannot be checked."""
    if table.dtype != torch.int32 or (lengths is not None and lengths.dtype not in LENGTH_DTYPES):
        found += checks.check_dtype(table, table_arg, (torch.int32,))
        if lengths is not None:
            found += checks.check_dtype(lengths, lengths_arg, LENGTH_DTYPES)
        if table.dtype.is_floating_point or table.dtype == torch.bool or (
                lengths is not None and lengths.dtype.is_floating_point):
            return False  # the kernel would not read these values as page ids
    tensors = ((table, table_arg), (lengths, lengths_arg)) + tuple(others)
    for tensor, _ in tensors:
        if tensor is not None and tensor.device != device:
            for t, arg in tensors:
                if t is not None:
                    found += checks.check_device(t, arg, device, "query")
            return False
    return True


_DECODE_READS = ("query", "kv_cache", "block_tables", "seq_lens", "max_seq_len", "window_left", "kv_layout",
                 "backend", "q_len_per_req", "max_q_len", "cum_seq_lens_q", "uses_shared_paged_kv_idx",
                 "enable_block_sparse_attention")


@rule(TRTLLM_DECODE, name="flashinfer.trtllm_batch_decode_with_kv_cache", reads=_DECODE_READS)
def trtllm_batch_decode_with_kv_cache(call):
    if call.get("causal_seqlens_kv_global") is not None or call.get("request_order") is not None:
        return _cake_decode(call)  # Blackwell (sm100/103) Cake routes: their own regions
    arguments = call.read(_DECODE_READS)
    (query, kv_cache, table, lengths, max_seq_len, window_left, kv_layout, backend, q_len_per_req,
     max_q_len, cum_seq_lens_q, shared, sparse) = arguments
    # A decode loop calls with one form (shapes, dtypes, scalars) over and over: the analysis below
    # (metadata only) runs once per form, later calls describe their tensors with its result.
    form = _call_form(call, arguments)
    known = _FORMS.get(form) if form is not None else None
    if known is not None and not (call.wants("duplicate-page") or tracking.enabled(call)):
        return [PageTable(table, lengths=lengths.reshape(-1) if sparse else lengths, **known)]

    k, v, k_name, v_name, page_size, found = split_kv_cache(kv_cache, kv_layout)
    if k is None:
        return found

    device = query.device
    if not _dtypes_and_devices(found, device, table, lengths, others=((k, k_name), (v, v_name))):
        return found

    # Table form
    if sparse:
        expected_dims, form_text = 3, "[num_kv_heads, batch, W]"
    elif shared:
        expected_dims, form_text = 2, "[batch, W]"
    else:
        expected_dims, form_text = 3, "[batch, 2, W]"
    if table.dim() != expected_dims or (not shared and not sparse and table.shape[1] != 2):
        return found + [Violation("shape-mismatch", "block_tables",
                                  f"block_tables has shape {tuple(table.shape)}, expected {form_text}"
                                  f" (uses_shared_paged_kv_idx={shared}, enable_block_sparse_attention={sparse})",
                                  value=tuple(table.shape), bound=form_text)]
    batch = table.shape[-2] if sparse else table.shape[0]
    batch_shape = tuple(table.shape[:2]) if sparse else (batch,)
    q_len = q_len_per_req or 1
    if cum_seq_lens_q is None and query.shape[0] != batch * q_len:
        found.append(Violation("shape-mismatch", "query", f"query has {query.shape[0]} rows, batch {batch} x "
                               f"q_len_per_req {q_len} = {batch * q_len}", value=query.shape[0], bound=batch * q_len))
    found += checks.check_packed_rows(table, "block_tables")
    if tuple(lengths.shape) != batch_shape:
        found.append(Violation("shape-mismatch", "seq_lens", f"seq_lens has shape {tuple(lengths.shape)}, "
                               f"block_tables implies {batch_shape}", value=tuple(lengths.shape), bound=batch_shape))
        return found

    # What row i reads (module docstring), by the backend "auto" picks on this GPU.
    capability = _capability(call, device)
    kernel = resolve_backend(backend, device, capability)
    pk, pv = int(k.shape[0]), int(v.shape[0])
    if shared or sparse:
        buffers = (Buffer("kv_cache", pk),) if pk == pv else (Buffer(k_name, pk), Buffer(v_name, pv))
    else:  # [B, 2, W]: K ids index K, V ids index V
        buffers = (Buffer(k_name, pk), Buffer(v_name, pv))
    described = dict(arg="block_tables", buffers=buffers, page_size=page_size, lengths_arg="seq_lens",
                     max_len=max_seq_len, max_len_arg="max_seq_len", kv_split=not (shared or sparse),
                     sparse_batch=batch if sparse else None, guard=-1 if kernel == "xqa" else 0)
    if kernel == "xqa":
        q = max_q_len or q_len
        described.update(window_left=-1 if window_left is None else int(window_left), q_len=q,
                         tile=_xqa_tile(k, query.shape[-1], q, capability))
    elif not sparse:
        described.update(whole_row=True)  # trtllm-gen: the whole row counts as read
    if form is not None:
        described["form"] = ("trtllm_batch_decode_with_kv_cache",) + form
    access = PageTable(table, lengths=lengths.reshape(-1) if sparse else lengths, **described)
    found.append(access)
    if call.wants("duplicate-page"):
        for view, index_of, _ in checks.table_views(access)[:: 1 if not shared else len(buffers)]:
            found += checks.check_duplicate_pages(view, "block_tables", _read_region(access), index_of)
    found += tracking.check_read_pages(call, access, (k, v))  # [] unless track_pages
    if form is not None and len(found) == 1:  # the next call of this form skips the analysis above
        if len(_FORMS) > 4096:
            _FORMS.clear()
        _FORMS[form] = described
    return found


def _read_region(access: PageTable):
    """The region ``checks.check_duplicate_pages`` takes: ``() -> (first, end)``."""
    def region():
        lengths = access.lengths.reshape(-1).to(torch.int64)
        end = checks.ceil_div(lengths.clamp(min=0), access.page_size).clamp(max=access.width)
        if access.whole_row:
            return None, None
        if access.window_left < 0:
            return None, end
        return checks.window_first_page(lengths, access.window_left, access.q_len, access.page_size,
                                        access.tile), end
    return region


# A call's form: everything the analysis reads before it describes the access (shapes, dtypes,
# devices, contiguity, scalar arguments). Profiled, the memo cut the decode rule's host time by ~45%
# (docs/gpu.md). Only forms the analysis passed without a finding are kept; what the configuration
# decides (duplicate-page, page tracking) is asked on every call.
_PLAIN = (int, float, bool, str, type(None))
_FORMS: dict = {}  # form -> the PageTable's arguments but its tensors


def _call_form(call, arguments):
    """Everything the analysis reads from a decode call before it describes the access, or
    ``None`` when an argument is not a plain tensor or scalar (the call then always takes the
    full analysis)."""
    (query, kv_cache, table, lengths, max_seq_len, window_left, kv_layout, backend, q_len_per_req,
     max_q_len, cum_seq_lens_q, shared, sparse) = arguments
    tensor = torch.Tensor
    if type(kv_cache) in (tuple, list):
        if len(kv_cache) != 2 or not (isinstance(kv_cache[0], tensor) and isinstance(kv_cache[1], tensor)):
            return None
        k, v = kv_cache
        kv = (k.shape, k.dtype, k.device, v.shape, v.dtype, v.device)
    elif isinstance(kv_cache, tensor):
        kv = (kv_cache.shape, kv_cache.dtype, kv_cache.device)
    else:
        return None
    if not (isinstance(query, tensor) and isinstance(table, tensor) and isinstance(lengths, tensor)):
        return None
    scalars = (max_seq_len, window_left, kv_layout, backend, q_len_per_req, max_q_len, shared, sparse)
    for value in scalars:
        if type(value) not in _PLAIN:
            return None
    return (kv, query.shape, query.device, table.shape, table.dtype, table.device, table.is_contiguous(),
            lengths.shape, lengths.dtype, lengths.device, lengths.is_contiguous(), cum_seq_lens_q is None,
            scalars, call.options.cuda_capability, getattr(call.options, "device_interpret", False))


# =========================================================================================
# More FlashInfer 0.7.2.post1 entry points: trtllm context, MLA decode, xqa, the paged
# wrappers (plan/run) and append_paged_kv_cache (a write). Each rule states the source it
# follows; paths are relative to site-packages/flashinfer.
# =========================================================================================

TRTLLM_CONTEXT = "flashinfer.prefill:trtllm_batch_context_with_kv_cache"
TRTLLM_MLA_DECODE = "flashinfer.mla._core:trtllm_batch_decode_with_kv_cache_mla"
XQA_DECODE = "flashinfer.decode:xqa_batch_decode_with_kv_cache"
XQA_MLA_DECODE = "flashinfer.mla._core:xqa_batch_decode_with_kv_cache_mla"
XQA_RAW = "flashinfer.xqa:xqa"
XQA_MLA_RAW = "flashinfer.xqa:xqa_mla"
DECODE_WRAPPER = "flashinfer.decode:BatchDecodeWithPagedKVCacheWrapper"
PREFILL_WRAPPER = "flashinfer.prefill:BatchPrefillWithPagedKVCacheWrapper"
APPEND_PAGED_KV = "flashinfer.page:append_paged_kv_cache"
CUDNN_DECODE = "flashinfer.cudnn.decode:cudnn_batch_decode_with_kv_cache"
MLA_WRAPPER = "flashinfer.mla._batch_mla._wrapper:BatchMLAPagedAttentionWrapper"


def _check_table(found, *, table, table_arg, lengths, lengths_arg, batch, pages, page_size, device,
                 whole_row=False, window_left=-1, q_len=1, tile=0, max_len=None, max_len_arg="max_seq_len",
                 kv_split=False, guard=0):
    """The common form of a dense ``[B, W]`` (or ``[B, 2, W]``) page table: its metadata checks,
    then its access. ``pages``: ``[(buffer name, page count)]`` (K and V, or one). Row i reads
    columns ``[first, ceil(len_i / ps))`` (the window's first, see :class:`PageTable`), or every
    column (``whole_row``). Appends to ``found`` and returns it."""
    if not _dtypes_and_devices(found, device, table, lengths, table_arg, lengths_arg):
        return found
    form = "[batch, 2, W]" if kv_split else "[batch, W]"
    if table.dim() != (3 if kv_split else 2) or (kv_split and table.shape[1] != 2) or (
            batch is not None and table.shape[0] != batch):
        found.append(Violation("shape-mismatch", table_arg,
                               f"{table_arg} has shape {tuple(table.shape)}, expected {form} with batch {batch}",
                               value=tuple(table.shape), bound=form))
        return found
    if lengths is not None and tuple(lengths.shape) != (table.shape[0],):
        found.append(Violation("shape-mismatch", lengths_arg, f"{lengths_arg} has shape {tuple(lengths.shape)}, "
                               f"{table_arg} implies ({table.shape[0]},)", value=tuple(lengths.shape),
                               bound=(table.shape[0],)))
        return found
    if kv_split or len(pages) == 1:
        buffers = tuple(Buffer(name, n) for name, n in pages)
    elif pages[0][1] == pages[1][1]:
        buffers = (Buffer("kv_cache", pages[0][1]),)
    else:  # an entry valid for the smaller buffer is valid for both: report against it
        buffers = (Buffer(*min(pages, key=lambda p: p[1])),)
    found.append(PageTable(table, table_arg, buffers, page_size, lengths=lengths, lengths_arg=lengths_arg,
                           max_len=max_len, max_len_arg=max_len_arg, whole_row=whole_row or lengths is None,
                           window_left=window_left, q_len=q_len, tile=tile, kv_split=kv_split, guard=guard))
    return found


def _page_shape(tensor, kv_layout):
    """Page size of a ``[P, H, ps, D]`` (HND) / ``[P, ps, H, D]`` (NHD) cache."""
    return int(tensor.shape[2] if kv_layout == "HND" else tensor.shape[1])


# -- trtllm_batch_context_with_kv_cache (flashinfer/prefill.py) ---------------------------
# backend "trtllm-gen" (closed cubins) or "cake": the whole block_tables row counts as read.
# block_tables [batch_size, W] ([batch_size, 2, W] with uses_shared_paged_kv_idx=False,
# utils.py _check_block_tables_shape); seq_lens [batch_size] = KV length per request;
# max_kv_len bounds it; cum_seq_lens_q / cum_seq_lens_kv are [batch_size + 1].
_CONTEXT_READS = ("query", "kv_cache", "block_tables", "seq_lens", "max_kv_len", "batch_size", "cum_seq_lens_q",
                  "cum_seq_lens_kv", "kv_layout", "uses_shared_paged_kv_idx")


@rule(TRTLLM_CONTEXT, name="flashinfer.trtllm_batch_context_with_kv_cache", reads=_CONTEXT_READS)
def trtllm_batch_context_with_kv_cache(call):
    (query, kv_cache, table, lengths, max_kv_len, batch_size, cu_q, cu_kv, kv_layout,
     shared) = call.read(_CONTEXT_READS)
    k, v, k_name, v_name, page_size, found = split_kv_cache(kv_cache, kv_layout)
    if k is None:
        return found
    for cu, arg in ((cu_q, "cum_seq_lens_q"), (cu_kv, "cum_seq_lens_kv")):
        if isinstance(cu, torch.Tensor) and tuple(cu.shape) != (batch_size + 1,):
            found.append(Violation("shape-mismatch", arg, f"{arg} has shape {tuple(cu.shape)}, batch_size "
                                   f"{batch_size} implies ({batch_size + 1},)", value=tuple(cu.shape),
                                   bound=(batch_size + 1,)))
    for t, arg in ((k, k_name), (v, v_name)):
        if t.device != query.device:
            found += checks.check_device(t, arg, query.device, "query")
    pages = [(k_name, int(k.shape[0])), (v_name, int(v.shape[0]))]
    return _check_table(found, table=table, table_arg="block_tables", lengths=lengths, lengths_arg="seq_lens",
                        batch=batch_size, pages=pages, page_size=page_size, device=query.device, whole_row=True,
                        max_len=max_kv_len, max_len_arg="max_kv_len", kv_split=not shared)


# -- xqa: flashinfer/xqa.py xqa and decode.py xqa_batch_decode_with_kv_cache ----------------
# page_table [B, W] int32, rows packed (mhaUtils.cuh getPage: maxNbPagesPerSeq * idxReq +
# idxPage, guarded by idxPage < nbPages = ceil(seq_len / ps)); seq_lens [B] (xqa: [B, 1]);
# K and V share the table; a sliding window skips whole leading tiles.
def _xqa_checks(call, found, *, q_device, k, v, k_name, v_name, table, table_arg, lengths, lengths_arg, batch,
                page_size, window_left, q_len, head_dim):
    found += checks.check_packed_rows(table, table_arg) if table.dim() == 2 else []
    tile = _xqa_tile(k, head_dim, q_len, _capability(call, q_device))
    pages = [(k_name, int(k.shape[0])), (v_name, int(v.shape[0]))]
    return _check_table(found, table=table, table_arg=table_arg, lengths=lengths, lengths_arg=lengths_arg,
                        batch=batch, pages=pages, page_size=page_size, device=q_device,
                        window_left=-1 if window_left is None else int(window_left), q_len=q_len, tile=tile,
                        guard=-1)


_XQA_DECODE_READS = ("query", "kv_cache", "block_tables", "seq_lens", "window_left", "kv_layout", "q_len_per_req",
                     "q_cu_seq_lens")


@rule(XQA_DECODE, name="flashinfer.xqa_batch_decode_with_kv_cache", reads=_XQA_DECODE_READS)
def xqa_batch_decode_with_kv_cache(call):
    query, kv_cache, table, lengths, window_left, kv_layout, q_len, q_cu = call.read(_XQA_DECODE_READS)
    k, v, k_name, v_name, page_size, found = split_kv_cache(kv_cache, kv_layout)
    if k is None:
        return found
    q_len = q_len or 1
    if q_cu is None and query.shape[0] % q_len == 0:
        batch = query.shape[0] // q_len
    elif q_cu is None:
        return found + [Violation("shape-mismatch", "query", f"query has {query.shape[0]} rows, not a multiple of "
                                  f"q_len_per_req {q_len}", value=query.shape[0], bound=q_len)]
    else:
        batch = None  # ragged Q: batch from seq_lens
    return _xqa_checks(call, found, q_device=query.device, k=k, v=v, k_name=k_name, v_name=v_name, table=table,
                       table_arg="block_tables", lengths=lengths, lengths_arg="seq_lens", batch=batch,
                       page_size=page_size, window_left=window_left, q_len=q_len, head_dim=query.shape[-1])


_XQA_RAW_READS = ("q", "k_cache", "v_cache", "page_table", "seq_lens", "page_size", "sliding_win_size", "kv_layout",
                  "q_seq_len", "q_cu_seq_lens")


@rule(XQA_RAW, name="flashinfer.xqa", reads=_XQA_RAW_READS)
def xqa(call):
    q, k, v, table, lengths, page_size, win, kv_layout, q_len, q_cu = call.read(_XQA_RAW_READS)
    found = []
    if k.dim() != 4 or v.dim() != 4 or k.shape[1:] != v.shape[1:]:
        return [Violation("shape-mismatch", "k_cache", f"k_cache {tuple(k.shape)} and v_cache {tuple(v.shape)} must "
                          "be 4-D pages of one shape", value=tuple(v.shape), bound=tuple(k.shape))]
    if _page_shape(k, kv_layout) != page_size:
        found.append(Violation("shape-mismatch", "page_size", f"page_size = {page_size} but k_cache pages "
                               f"{tuple(k.shape[1:])} ({kv_layout}) hold {_page_shape(k, kv_layout)} tokens; the "
                               "kernel is compiled for page_size", value=page_size, bound=_page_shape(k, kv_layout)))
        return found
    if lengths.dim() == 2:
        lengths = lengths[:, 0]  # [B, beam_width], beam 1
    batch = None if q_cu is not None else q.shape[0]
    return _xqa_checks(call, found, q_device=q.device, k=k, v=v, k_name="k_cache", v_name="v_cache", table=table,
                       table_arg="page_table", lengths=lengths, lengths_arg="seq_lens", batch=batch,
                       page_size=page_size, window_left=(win - 1) if win and win > 0 else -1, q_len=q_len or 1,
                       head_dim=q.shape[-1])


# -- MLA decode: flashinfer/mla/_core.py --------------------------------------------------
# kv_cache [P, ps, D] or [P, 1, ps, D] (page size = kv_cache.size(-2)); block_tables [B, W]
# ([B, 2, W] with uses_shared_paged_kv_idx=False, trtllm-gen only); seq_lens [B].
# backend "auto" = trtllm-gen on compute capability 10.x, else xqa (SM120 mla_sm120.cu, whose
# page loads are guarded by idxPage < nbPages); a CPU tensor is checked as xqa. xqa reads
# columns j < ceil(seq_lens / ps); trtllm-gen / cute-dsl / cake count the whole row as read.
# Sparse MLA (sparse_mla_top_k > 0: token indices, not pages) is not checked.
def _mla_cache(kv_cache):
    if kv_cache.dim() == 4 and kv_cache.shape[1] == 1:
        return int(kv_cache.shape[0]), int(kv_cache.shape[2]), []
    if kv_cache.dim() == 3:
        return int(kv_cache.shape[0]), int(kv_cache.shape[1]), []
    return 0, 0, [Violation("shape-mismatch", "kv_cache", f"kv_cache has shape {tuple(kv_cache.shape)}, expected "
                            "[P, ps, D] or [P, 1, ps, D]", value=tuple(kv_cache.shape))]


_MLA_READS = ("query", "kv_cache", "block_tables", "seq_lens", "max_seq_len", "sparse_mla_top_k", "backend",
              "uses_shared_paged_kv_idx", "cum_seq_lens_q")


@rule(TRTLLM_MLA_DECODE, name="flashinfer.trtllm_batch_decode_with_kv_cache_mla", reads=_MLA_READS)
def trtllm_batch_decode_with_kv_cache_mla(call):
    query, kv_cache, table, lengths, max_seq_len, top_k, backend, shared, cu_q = call.read(_MLA_READS)
    if top_k and top_k > 0 or lengths is None:
        return []
    pages, page_size, found = _mla_cache(kv_cache)
    if found:
        return found
    if backend == "auto":
        capability = _capability(call, query.device)
        backend = "trtllm-gen" if capability is not None and capability[0] == 10 else "xqa"
    xqa_backend = backend == "xqa"
    batch = query.shape[0] if query.dim() == 4 and cu_q is None else None
    return _check_table(found, table=table, table_arg="block_tables", lengths=lengths, lengths_arg="seq_lens",
                        batch=batch, pages=[("kv_cache", pages)] * (1 if shared else 2), page_size=page_size,
                        device=query.device, whole_row=not xqa_backend,
                        max_len=None if xqa_backend else max_seq_len, kv_split=not shared)


_XQA_MLA_READS = ("query", "kv_cache", "block_tables", "seq_lens")


@rule(XQA_MLA_DECODE, name="flashinfer.xqa_batch_decode_with_kv_cache_mla", reads=_XQA_MLA_READS)
def xqa_batch_decode_with_kv_cache_mla(call):
    query, kv_cache, table, lengths = call.read(_XQA_MLA_READS)
    pages, page_size, found = _mla_cache(kv_cache)
    if found:
        return found
    return _check_table(found, table=table, table_arg="block_tables", lengths=lengths, lengths_arg="seq_lens",
                        batch=query.shape[0], pages=[("kv_cache", pages)], page_size=page_size, device=query.device)


_XQA_MLA_RAW_READS = ("q", "k_cache", "page_table", "seq_lens", "page_size")


@rule(XQA_MLA_RAW, name="flashinfer.xqa_mla", reads=_XQA_MLA_RAW_READS)
def xqa_mla(call):
    q, k, table, lengths, page_size = call.read(_XQA_MLA_RAW_READS)
    # [P, ps, 1, D] as xqa_batch_decode_with_kv_cache_mla passes it, or [P * ps, D] rows
    pages = int(k.shape[0]) if k.dim() >= 3 else int(k.shape[0]) // page_size
    if lengths.dim() == 2:
        lengths = lengths[:, 0]
    return _check_table([], table=table, table_arg="page_table", lengths=lengths, lengths_arg="seq_lens",
                        batch=q.shape[0], pages=[("k_cache", pages)], page_size=page_size, device=q.device)


# -- the paged wrappers (flashinfer/decode.py, flashinfer/prefill.py) ---------------------
# plan(indptr, indices, last_page_len, ..., page_size): a CSR page list, row i reads
# indices[indptr[i]:indptr[i+1]] (page.cuh paged_kv_t); run(q, paged_kv_cache) reads them from
# the wrapper's own device copies, _paged_kv_indptr_buf / _paged_kv_indices_buf /
# _paged_kv_last_page_len_buf (decode.py plan(), near line 2115: copied in place in CUDA-graph
# mode, so a captured run reads whatever they hold at each replay), through the cache whose
# layout the constructor fixed (self._kv_layout). plan() is checked as given (and against the
# pages of the cache the wrapper last ran on, when known); run() checks the buffers it reads:
# every call when they are on a GPU (the device kernel: captured runs are checked at every
# replay), once per plan and cache on a CPU.
# plan() takes host and device tensors mixed (FlashInfer's own CUDA-graph decode test passes a CUDA
# indptr and indices with a CPU last_page_len): see _as_planned.
_wrapper_state = weakref.WeakKeyDictionary()  # wrapper -> {"plan": ..., "pages": ..., "verified": ...}
_WRAPPER_BUFFERS = ("_paged_kv_indptr_buf", "_paged_kv_indices_buf", "_paged_kv_last_page_len_buf")
NO_PAGE_BOUND = checks.UNKNOWN_COUNT  # plan(): the list's structure and signs are checked, not its pages


def _as_planned(ids, *others) -> tuple:
    """``(ids, *others)`` on one device: a plan()'s metadata as FlashInfer's kernels read it.

    plan() takes each metadata tensor on the host or on the wrapper's device, mixed, and copies
    each to the wrapper's device for run() (decode.py ``_plan_impl``: ``indptr.to(self.device)``,
    or ``copy_`` into the CUDA-graph buffers; prefill.py ``plan`` the same; the MLA planner,
    ``_batch_mla/_wrapper.py``: "Metadata tensors may be on CPU or the wrapper device"). It also
    reads indptr and last_page_len (not the page ids) on the host, for its schedule
    (``indptr.to("cpu")``). So mixed devices are FlashInfer's contract, not a ``bad-device``
    fault: the list is checked where its page ids ``ids`` are (the long tensor is never copied),
    the small tensors copied there as plan() copies them. ``None`` entries stay ``None``."""
    device = ids.device
    return (ids,) + tuple(t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) and t.device != device
                          else t for t in others)


def _smallest(pages) -> Buffer:
    """The buffer an entry must fit (one valid for the smaller cache is valid for both)."""
    name, num_pages = min(pages, key=lambda p: p[1])
    if len(pages) > 1 and pages[0][1] == pages[1][1]:
        name = "paged_kv_cache"
    return Buffer(name, num_pages)


def _wrapper_plan(call, names):
    wrapper = call["self"]
    indptr, indices, last_page_len, page_size = (call[n] for n in names[:3] + ("page_size",))
    found = []
    for tensor, arg in ((indices, names[1]), (last_page_len, names[2])):
        if tensor.dtype.is_floating_point or tensor.dtype == torch.bool or tensor.dtype != indptr.dtype:
            found += checks.check_dtype(tensor, arg, (indptr.dtype,))
    if found or indptr.dtype.is_floating_point:
        return found
    indices, indptr, last_page_len = _as_planned(indices, indptr, last_page_len)
    state = _wrapper_state.setdefault(wrapper, {})
    state["plan"] = (indptr, indices, last_page_len, page_size, names)
    pages = state.get("pages")
    state["verified"] = pages  # checked here against the cache the wrapper last ran on
    buffer = _smallest(pages) if pages is not None else Buffer("paged_kv_cache", NO_PAGE_BOUND)
    return found + [CsrPages(indptr, indices, (buffer,), last_page_len, page_size, *names)]


def _wrapper_run(call, names):
    wrapper, kv_cache = call["self"], call["paged_kv_cache"]
    state = _wrapper_state.get(wrapper)
    kv_layout = getattr(wrapper, "_kv_layout", "NHD")
    k, v, k_name, v_name, page_size, found = split_kv_cache(kv_cache, kv_layout)
    found = [f.replace(arg="paged_kv_cache") for f in found]
    if k is None:
        return found
    if isinstance(kv_cache, torch.Tensor):
        pages = (("paged_kv_cache", int(k.shape[0])),)
    else:
        pages = (("paged_kv_cache[0]", int(k.shape[0])), ("paged_kv_cache[1]", int(v.shape[0])))
    plan = state.get("plan") if state is not None else None
    if plan is not None and plan[3] != page_size:
        return found + [Violation("shape-mismatch", "paged_kv_cache",
                                  f"plan() was given page_size = {plan[3]}, paged_kv_cache pages ({kv_layout}, "
                                  f"{tuple(k.shape[1:])}) hold {page_size} tokens", value=page_size, bound=plan[3])]
    if state is not None:
        state["pages"] = pages
    buffers = [getattr(wrapper, name, None) for name in _WRAPPER_BUFFERS]
    if all(isinstance(b, torch.Tensor) and b.is_cuda for b in buffers):
        return found + [CsrPages(buffers[0], buffers[1], (_smallest(pages),), buffers[2], page_size, *names)]
    if plan is None or state.get("verified") == pages:
        return found  # planned before the sanitizer started, or checked at plan() against this cache
    state["verified"] = pages
    indptr, indices, last_page_len, _, _ = plan
    return found + [CsrPages(indptr, indices, (_smallest(pages),), last_page_len, page_size, *names,
                             only=frozenset({"page-out-of-range"}))]


_DECODE_PLAN_NAMES = ("indptr", "indices", "last_page_len")
_PREFILL_PLAN_NAMES = ("paged_kv_indptr", "paged_kv_indices", "paged_kv_last_page_len")


@rule(f"{DECODE_WRAPPER}.plan", name="flashinfer.BatchDecodeWithPagedKVCacheWrapper.plan",
      reads=("self",) + _DECODE_PLAN_NAMES + ("page_size",))
def batch_decode_wrapper_plan(call):
    return _wrapper_plan(call, _DECODE_PLAN_NAMES)


@rule(f"{DECODE_WRAPPER}.run", name="flashinfer.BatchDecodeWithPagedKVCacheWrapper.run",
      reads=("self", "paged_kv_cache"))
def batch_decode_wrapper_run(call):
    return _wrapper_run(call, _DECODE_PLAN_NAMES)


@rule(f"{PREFILL_WRAPPER}.plan", name="flashinfer.BatchPrefillWithPagedKVCacheWrapper.plan",
      reads=("self",) + _PREFILL_PLAN_NAMES + ("page_size",))
def batch_prefill_wrapper_plan(call):
    return _wrapper_plan(call, _PREFILL_PLAN_NAMES)


@rule(f"{PREFILL_WRAPPER}.run", name="flashinfer.BatchPrefillWithPagedKVCacheWrapper.run",
      reads=("self", "paged_kv_cache"))
def batch_prefill_wrapper_run(call):
    return _wrapper_run(call, _PREFILL_PLAN_NAMES)


# -- append_paged_kv_cache (flashinfer/page.py; data/include/flashinfer/page.cuh
# AppendPagedKVCacheKernel): a WRITE. For each appended token i < append_key.size(0):
# page_iter = indptr[batch_indices[i]] + positions[i] // ps, and K/V are written into page
# indices[page_iter] (no bound check in the kernel). Only those entries are dereferenced. No
# guard value is safe (any page written is some request's), so a guard action only reports.
_APPEND_READS = ("append_key", "batch_indices", "positions", "paged_kv_cache", "kv_indices", "kv_indptr",
                 "kv_last_page_len", "kv_layout")
_APPEND_NAMES = ("kv_indptr", "kv_indices", "kv_last_page_len")


@rule(APPEND_PAGED_KV, name="flashinfer.append_paged_kv_cache", reads=_APPEND_READS)
def append_paged_kv_cache(call):
    key, batch_idx, positions, kv_cache, indices, indptr, last_page_len, kv_layout = call.read(_APPEND_READS)
    k, v, k_name, v_name, page_size, found = split_kv_cache(kv_cache, kv_layout)
    if k is None:
        return found
    nnz = key.shape[0]
    writes = []
    for tensor, arg in ((batch_idx, "batch_indices"), (positions, "positions")):
        if tensor.dim() != 1 or tensor.shape[0] != nnz:
            writes.append(Violation("shape-mismatch", arg, f"{arg} has shape {tuple(tensor.shape)}, append_key has "
                                    f"{nnz} tokens", value=tuple(tensor.shape), bound=(nnz,)))
    if writes:  # the list's structure, then why its writes cannot be followed
        return found + [CsrPages(indptr, indices, (Buffer("paged_kv_cache", NO_PAGE_BOUND),), last_page_len,
                                 page_size, *_APPEND_NAMES, guard=None)] + writes
    buffer = Buffer("paged_kv_cache", int(k.shape[0])) if k.shape[0] == v.shape[0] else Buffer(
        *min(((k_name, int(k.shape[0])), (v_name, int(v.shape[0]))), key=lambda p: p[1]))
    return found + [CsrPages(indptr, indices, (buffer,), last_page_len, page_size, *_APPEND_NAMES,
                             writes=Writes(batch_idx, positions, nnz), guard=None)]


# -- the Cake decode routes of trtllm_batch_decode_with_kv_cache --------------------------
# Decode context parallel and request_order (flashinfer/decode.py, 0.7.2.post1, near lines
# 3920-3977 and 4036-4443; both run Cake kernels, shared [B, W] table, HND cache):
# - DCP (causal_seqlens_kv_global given): rank-local caches; the static kernels
#   (data/csrc/cake_fmha/cuda/dcp_spec/...) walk ceil(max_seq_len / 128) 128-token blocks rounded
#   up to pairs for EVERY request, reading 128 / ps page ids per block from the row start with no
#   clamp to the row width: columns [0, (128 / ps) * 2 * ceil(ceil(max_seq_len / 128) / 2)) of
#   each row (seq_lens is not what bounds the reads; max_seq_len is the largest rank-local length).
#   A narrower table is read into the next row: a shape finding.
# - request_order [B]: launch slot -> logical request; every read uses the logical index, so
#   entries must lie in [0, B); request b reads columns j < ceil(seq_lens[b] / ps) (the
#   request-ordered kernel), and seq_lens[b] < q_len_per_req makes it read one entry before the row.
CAKE_BLOCK_TOKENS = 128


def _cake_decode(call):
    query, kv_cache, table, lengths, max_seq_len, kv_layout = (
        call[n] for n in ("query", "kv_cache", "block_tables", "seq_lens", "max_seq_len", "kv_layout"))
    k, v, k_name, v_name, page_size, found = split_kv_cache(kv_cache, kv_layout)
    if k is None:
        return found
    if not _dtypes_and_devices(found, query.device, table, lengths, others=((k, k_name), (v, v_name))):
        return found
    order = call.get("request_order")
    split = order is not None and not call.get("uses_shared_paged_kv_idx", True)  # [B, 2, W]: K ids, V ids
    if table.dim() != (3 if split else 2) or (split and table.shape[1] != 2):
        form = "[batch, 2, W] (uses_shared_paged_kv_idx=False)" if split else "a shared [batch, W]"
        return found + [Violation("shape-mismatch", "block_tables", f"block_tables has shape {tuple(table.shape)}; "
                                  f"this Cake decode route takes {form} table", value=tuple(table.shape))]
    found += checks.check_packed_rows(table, "block_tables")
    batch, width = int(table.shape[0]), int(table.shape[-1])
    buffer = Buffer("kv_cache", min(int(k.shape[0]), int(v.shape[0])))
    if order is not None:
        if tuple(order.shape) != (batch,):
            return found + [Violation("shape-mismatch", "request_order", f"request_order has shape "
                                      f"{tuple(order.shape)}, block_tables implies ({batch},)",
                                      value=tuple(order.shape), bound=(batch,))]
        rows = Slots(order, "request_order", Buffer("block_tables rows", batch), guard=None, negative_skipped=False)
        buffers = (Buffer(k_name, int(k.shape[0])), Buffer(v_name, int(v.shape[0]))) if split else (buffer,)
        return found + [rows, PageTable(table, "block_tables", buffers, page_size, lengths=lengths,
                                        max_len=max_seq_len, kv_split=split)]
    # the kernels walk at least one block pair, also for an empty rank (max_seq_len 0)
    blocks = max(1, -(-max(int(max_seq_len), 0) // CAKE_BLOCK_TOKENS))
    columns = max(CAKE_BLOCK_TOKENS // page_size, 1) * 2 * -(-blocks // 2)
    if columns > width:
        return found + [Violation("shape-mismatch", "block_tables", f"block_tables rows hold {width} pages; with "
                                  f"max_seq_len = {max_seq_len} the DCP kernels read the first {columns} entries of "
                                  "every row (whole 128-token block pairs, unclamped): past each row's end",
                                  value=width, bound=columns)]
    return found + [PageTable(table[:, :columns], "block_tables", (buffer,), page_size, whole_row=True)]


# -- cudnn_batch_decode_with_kv_cache (flashinfer/cudnn/decode.py) -------------------------
# k_cache / v_cache HND [P, H, ps, D]; block_tables [B, pages_per_seq] int32, bound as the K and
# the V table; actual_seq_lens_kv [B] (the wrapper passes [B, 1, 1, 1]). The cuDNN graph is
# closed source: the whole row counts as read (as for trtllm-gen). The cubin fallback (no cuDNN
# frontend: cudnn/decode.py CUDNN_AVAILABLE false) strides rows by max_sequence_kv // ps, not the
# table's width (cudnn_sdpa_kernel_launcher.cu): there a table of another width is misread.
_CUDNN_READS = ("q", "k_cache", "v_cache", "max_sequence_kv", "actual_seq_lens_kv", "block_tables")


@rule(CUDNN_DECODE, name="flashinfer.cudnn_batch_decode_with_kv_cache", reads=_CUDNN_READS)
def cudnn_batch_decode_with_kv_cache(call):
    q, k, v, max_kv, lengths, table = call.read(_CUDNN_READS)
    if table is None:
        return []  # not paged
    if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
        return [Violation("shape-mismatch", "v_cache", f"k_cache {tuple(k.shape)} and v_cache {tuple(v.shape)} must "
                          "be HND pages [P, H, ps, D] of one page count and size", value=tuple(v.shape))]
    page_size = int(k.shape[2])
    if lengths is not None:
        lengths = lengths.reshape(-1)
        if lengths.device != table.device:  # the fallback takes CPU lengths (and copies them)
            lengths = lengths.to(table.device, non_blocking=True)
    found = _check_table([], table=table, table_arg="block_tables", lengths=lengths,
                         lengths_arg="actual_seq_lens_kv", batch=None, pages=[("k_cache", int(k.shape[0]))],
                         page_size=page_size, device=q.device, whole_row=True, max_len=max_kv,
                         max_len_arg="max_sequence_kv")
    fallback = not getattr(sys.modules.get("flashinfer.cudnn.decode"), "CUDNN_AVAILABLE", False)
    if fallback and table.dim() == 2 and table.shape[1] != max_kv // page_size:
        found.append(Violation("bad-layout", "block_tables", f"block_tables rows hold {table.shape[1]} pages; the "
                               f"cuDNN fallback kernel strides rows by max_sequence_kv // page_size = "
                               f"{max_kv // page_size}", value=int(table.shape[1]), bound=max_kv // page_size))
    return found + checks.check_packed_rows(table, "block_tables")


# -- BatchMLAPagedAttentionWrapper (flashinfer/mla/_batch_mla/, 0.7.2.post1) ---------------
# plan() takes a flat CSR list (qo_indptr, kv_indptr, kv_indices, kv_len_arr, ..., page_size:
# what SGLang's flashinfer MLA backend passes, page_size 1), a dense form (block_tables, seq_lens)
# or metadata=MLAPlanMetadata; it hands them to the backend it picks, and run() reads that
# backend's copies (wrapper._planned_backend):
# - fa2 / fa3 (_backends/_fa_common.py): _kv_indices_buf at each run, with kv_indptr / kv_len
#   baked into the plan: request b reads kv_indices[kv_indptr[b] : kv_indptr[b] + ceil(kv_len[b] /
#   ps)] (include/flashinfer/attention/mla.cuh load_kv, guarded by packed_kv_bound), which plan()
#   requires to be the row (strict CSR) -> the CSR rows of _kv_indptr_buf / _kv_indices_buf;
# - xqa: _block_tables rows, j < ceil(seq_lens / ps) (mla_sm120.cu); trtllm-gen (closed cubins),
#   cutlass (whole 128-token tiles of page ids) and cutile: the whole row counts as read.
# Cache pages: ckv_cache / kv_cache dim 0 ([num_pages, page_size, dim]).
_MLA_PLAN_READS = ("self", "kv_indptr", "kv_indices", "kv_len_arr", "page_size", "block_tables", "seq_lens",
                   "metadata")


@rule(f"{MLA_WRAPPER}.plan", name="flashinfer.BatchMLAPagedAttentionWrapper.plan", reads=_MLA_PLAN_READS)
def batch_mla_wrapper_plan(call):
    _, indptr, indices, kv_len, page_size, table, lengths, metadata = call.read(_MLA_PLAN_READS)
    unknown_pages = (Buffer("kv_cache", NO_PAGE_BOUND),)  # the cache comes at run(): structure only
    # "Metadata tensors may be on CPU or the wrapper device" (SGLang passes CPU indptrs with GPU
    # indices): checked on the indices' (the table's) device, as plan() copies them (_as_planned).
    if indptr is not None and indices is not None:
        indices, indptr = _as_planned(indices, indptr)
        return [CsrPages(indptr, indices, unknown_pages, page_size=page_size, indptr_arg="kv_indptr",
                         indices_arg="kv_indices")]
    if table is not None and lengths is not None and page_size:
        table, lengths = _as_planned(table, lengths)
        return _check_table([], table=table, table_arg="block_tables", lengths=lengths,
                            lengths_arg="seq_lens", batch=None, pages=[("kv_cache", NO_PAGE_BOUND)],
                            page_size=page_size, device=table.device)
    return []  # metadata=MLAPlanMetadata: checked at run(), against the backend's copies


_MLA_RUN_READS = ("self", "ckv_cache", "kv_cache", "kv_len", "page_table")


@rule(f"{MLA_WRAPPER}.run", name="flashinfer.BatchMLAPagedAttentionWrapper.run", reads=_MLA_RUN_READS)
def batch_mla_wrapper_run(call):
    wrapper, ckv_cache, kv_cache, kv_len, page_table = call.read(_MLA_RUN_READS)
    backend = getattr(wrapper, "_planned_backend", None)
    if isinstance(kv_cache, (tuple, list)) and kv_cache and isinstance(kv_cache[0], torch.Tensor):
        cache, cache_name = kv_cache[0], "kv_cache[0]"  # run(query=, kv_cache=(ckv, kpe)): the preferred form
    elif isinstance(kv_cache, torch.Tensor):
        cache, cache_name = kv_cache, "kv_cache"
    else:
        cache, cache_name = ckv_cache, "ckv_cache"
    if not isinstance(cache, torch.Tensor) or (backend is None and (page_table is None or kv_len is None)):
        return []  # no cache, or neither a plan nor run(page_table=, kv_len=): the library raises its own error
    page_size = getattr(backend, "_page_size", None) or (int(cache.shape[-2]) if cache.dim() >= 3 else None)
    buffer = Buffer(cache_name, int(cache.shape[0]))
    indptr, indices = getattr(backend, "_kv_indptr_buf", None), getattr(backend, "_kv_indices_buf", None)
    if isinstance(indptr, torch.Tensor) and isinstance(indices, torch.Tensor):
        return [CsrPages(indptr, indices, (buffer,), page_size=page_size, indptr_arg="kv_indptr",
                         indices_arg="kv_indices")]
    table = page_table if page_table is not None else getattr(backend, "_block_tables", None)
    if table is None:
        table = getattr(backend, "_page_table", None)
    lengths = kv_len if kv_len is not None else getattr(backend, "_seq_lens", None)
    if lengths is None:
        lengths = getattr(backend, "_seq_lens_2d", getattr(backend, "_kv_len", None))
    name = getattr(wrapper, "_planned_backend_name", None) or type(backend).__name__
    if not isinstance(table, torch.Tensor) or not isinstance(lengths, torch.Tensor) or not page_size:
        return [checks.unsupported_form(call.target, "self", f"the planned backend {name!r} keeps no page table "
                                        "this rule knows")]
    return _check_table([], table=table, table_arg="block_tables", lengths=lengths.reshape(-1),
                        lengths_arg="seq_lens", batch=None, pages=[(buffer.name, buffer.pages)], page_size=page_size,
                        device=table.device, whole_row=name != "xqa", guard=-1 if name == "xqa" else 0)
