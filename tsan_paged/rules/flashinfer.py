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
    leading tiles of 64 tokens (``mha_sm90.cu``): ``S = max(seq_len - q_len + 1 - win, 0)``
    tokens, first page read ``floor(floor(S / 64) * 64 / ps)``.
  * trtllm-gen / cake (closed cubins; the seed crashed there on entries past a row's
    length): the whole row counts as read. Block-sparse rows: the packed front
    ``ceil(seq_lens / ps)`` entries.

Out-of-range entries outside the region are ``dead-page-out-of-range`` warnings: real
serving tables (SGLang's) hold stale values there.
"""

from __future__ import annotations

import torch

from .. import checks
from .. import device as device_mod
from ..registry import rule
from ..report import Violation

TRTLLM_DECODE = "flashinfer.decode:trtllm_batch_decode_with_kv_cache"
XQA_TILE_TOKENS = 64  # gemm0CtaTileNbTokens in data/csrc/xqa/mha_sm90.cu (sm90, head_dim <= 256)
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


def xqa_first_page(lengths: torch.Tensor, window_left: int, q_len: int, page_size: int):
    """First column xqa loads under a sliding window, per row (``None`` without a window)."""
    if window_left is None or window_left < 0:
        return None
    skipped = (lengths - (q_len - 1) - (window_left + 1)).clamp(min=0)
    return (skipped // XQA_TILE_TOKENS * XQA_TILE_TOKENS) // page_size


_DECODE_READS = ("query", "kv_cache", "block_tables", "seq_lens", "max_seq_len", "window_left", "kv_layout",
                 "backend", "q_len_per_req", "max_q_len", "cum_seq_lens_q", "uses_shared_paged_kv_idx",
                 "enable_block_sparse_attention")


@rule(TRTLLM_DECODE, name="flashinfer.trtllm_batch_decode_with_kv_cache", reads=_DECODE_READS)
def trtllm_batch_decode_with_kv_cache(call):
    (query, kv_cache, table, lengths, max_seq_len, window_left, kv_layout, backend, q_len_per_req,
     max_q_len, cum_seq_lens_q, shared, sparse) = call.read(_DECODE_READS)
    k, v, k_name, v_name, page_size, found = split_kv_cache(kv_cache, kv_layout)
    if k is None:
        return found

    device = query.device
    if table.dtype != torch.int32 or lengths.dtype not in LENGTH_DTYPES:
        found += checks.check_dtype(table, "block_tables", (torch.int32,))
        found += checks.check_dtype(lengths, "seq_lens", LENGTH_DTYPES)
        if table.dtype.is_floating_point or table.dtype == torch.bool or lengths.dtype.is_floating_point:
            return found  # the kernel would not read these values as page ids
    if table.device != device or lengths.device != device or k.device != device or v.device != device:
        for tensor, arg in ((table, "block_tables"), (lengths, "seq_lens"), (k, k_name), (v, v_name)):
            found += checks.check_device(tensor, arg, device, "query")
        return found

    # Table form: a 2D view [rows, W] for the checks, and how to name an entry of it.
    if sparse:
        expected_dims, form = 3, "[num_kv_heads, batch, W]"
    elif shared:
        expected_dims, form = 2, "[batch, W]"
    else:
        expected_dims, form = 3, "[batch, 2, W]"
    if table.dim() != expected_dims or (not shared and not sparse and table.shape[1] != 2):
        return found + [Violation("shape-mismatch", "block_tables",
                                  f"block_tables has shape {tuple(table.shape)}, expected {form}"
                                  f" (uses_shared_paged_kv_idx={shared}, enable_block_sparse_attention={sparse})",
                                  value=tuple(table.shape), bound=form)]
    batch, width = table.shape[-2] if sparse else table.shape[0], table.shape[-1]
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

    interpret = getattr(call.options, "device_interpret", False)  # tests: the device kernel on CPU tensors
    if (device_mod.enabled(table, lengths) or (interpret and device_mod.interpretable(table, lengths))) \
            and not call.wants("duplicate-page"):
        return found + _device_checks(call, table, lengths, k, v, k_name, v_name, page_size, batch, width,
                                      max_seq_len, window_left, backend, max_q_len or q_len, shared, sparse)

    if sparse:
        lengths = lengths.reshape(-1)

        def index_of(r, c, n=batch):
            return (r // n, r % n, c)
    else:
        def index_of(r, c):
            return (r, c)
    if lengths.dtype == torch.uint32:  # few CPU ops take uint32
        lengths = lengths.to(torch.int64)

    def length_index(r):
        return index_of(r, 0)[:-1]

    bounds = checks.length_bounds(lengths)
    found += checks.check_lengths(lengths, "seq_lens", bounds, max_seq_len, index_of=length_index)
    found += checks.check_lengths_fit(lengths, "seq_lens", bounds, page_size, width, "block_tables",
                                      index_of=length_index)
    backend = resolve_backend(backend, device, call.options.cuda_capability)

    def region():
        """Columns each row reads (computed only when something is out of range)."""
        if backend != "xqa" and not sparse:
            return None, None  # trtllm-gen: the whole row counts as read
        lens = lengths.to(torch.int64)
        end = checks.ceil_div(lens.clamp(min=0), page_size).clamp(max=width)
        first = xqa_first_page(lens, window_left, max_q_len or q_len, page_size) if backend == "xqa" else None
        return first, end

    if shared or sparse:
        view = table if not sparse else table.reshape(-1, width)
        if k.shape[0] == v.shape[0]:
            views = [(view, index_of, "kv_cache", k.shape[0])]
        else:
            views = [(view, index_of, k_name, k.shape[0]), (view, index_of, v_name, v.shape[0])]
    else:  # [B, 2, W]: K ids index K, V ids index V
        views = [(table[:, 0, :], lambda r, c: (r, 0, c), k_name, k.shape[0]),
                 (table[:, 1, :], lambda r, c: (r, 1, c), v_name, v.shape[0])]
    for view, name_of, buffer, num_pages in views:
        found += checks.check_pages_in_range(view, "block_tables", num_pages, buffer, region, name_of)
    if call.wants("duplicate-page"):
        for view, name_of, _, _ in views[:: 1 if not shared else len(views)]:
            found += checks.check_duplicate_pages(view, "block_tables", region, name_of)
    return found


def _device_checks(call, table, lengths, k, v, k_name, v_name, page_size, batch, width, max_seq_len, window_left,
                   backend, q_len, shared, sparse):
    """A CUDA table: the length and page-range checks as one device kernel (:mod:`tsan_paged.device`)."""
    capability = call.options.cuda_capability or (device_mod.capability(table.device) if table.is_cuda else None)
    backend = resolve_backend(backend, table.device, capability)
    if backend == "xqa":
        region = device_mod.REGION_XQA
    else:
        region = device_mod.REGION_END if sparse else device_mod.REGION_ROW
    pk, pv = int(k.shape[0]), int(v.shape[0])
    if shared or sparse:
        views = (("kv_cache", pk, None),) if pk == pv else ((k_name, pk, None), (v_name, pv, None))
    else:
        views = ((k_name, pk, 0), (v_name, pv, 1))
    rows = table.shape[0] * table.shape[1] if sparse else table.shape[0]
    lengths = lengths.reshape(-1)  # a view: [H, B] block-sparse lengths are packed
    plan = device_mod.plan_for(rows, width, views, page_size, max_seq_len, region,
                           window_left, q_len, lengths.dtype == torch.uint32, kv_split=not (shared or sparse),
                           sparse_batch=batch if sparse else None, guard_value=-1 if backend == "xqa" else 0)
    if plan.rows == 0 or width == 0:
        return []
    return device_mod.check(call.target, plan, table, lengths)
