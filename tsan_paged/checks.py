"""Check primitives shared by every rule, and the torch checks of each access form.

Two layers:

- The **primitives** a Python rule calls (``check_pages_in_range``, ``check_lengths``,
  ``check_lengths_fit``, ``check_csr_pages``, ``check_slots``, ``check_duplicate_pages``, and
  the metadata checks ``check_dtype``, ``check_device``, ``check_packed_rows``). On CPU tensors
  they compute and return :class:`Violation` objects. On CUDA tensors the value checks return
  a *description* of the check instead (:mod:`tsan_paged.access`), which the sanitizer's
  engine runs on the device with no host sync, CUDA graphs included: treat a primitive's
  result as opaque, return it or add it to your rule's list.
- The **torch checks** of the access forms (``page_table_findings``, ``csr_findings``, ...),
  which the engine runs for CPU tensors. Built-in rules return access descriptions; these
  functions and the device kernels report the same findings, with the message builders below
  shared by both.

Nothing here loops over rows or columns in Python. The page-range check's fast path is one
reduction over the table; the masked read-region analysis runs only when some entry is out
of range.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .access import Buffer, CsrPages, HostCheck, Lengths, PageTable, Slots
from .report import MAX_EXAMPLES, Violation

IndexOf = Callable[[int, int], tuple]
"""Maps (row of the 2D view, column) to the index reported to the user."""


def ceil_div(a, b):
    return -(-a // b)


def _examples(positions: torch.Tensor, values: torch.Tensor, index_of: IndexOf) -> tuple:
    pos = positions[:MAX_EXAMPLES].tolist()
    vals = values[:MAX_EXAMPLES].tolist()
    return tuple((index_of(*p), v) for p, v in zip(pos, vals))


def _index_text(index) -> str:
    return ", ".join(map(str, index))


# -- comparisons of index values with Python ints, for any integer dtype --------------------
# torch casts a Python int to the tensor's dtype before it compares: ``int32_tensor >= 2**62`` is
# ``int32_tensor >= 0`` (2**62 wraps to 0) and ``int32_tensor >= 2**31`` is ``>= -2**31``. Bounds
# are page counts, lengths and sentinels that may exceed an int32 table's range (a sanitizer's
# "no page count known" bound, a pool of 2**31 slots, a huge max_seq_len): every comparison of
# page ids or lengths with a bound goes through these, which answer as if in infinite precision.

def at_least(values: torch.Tensor, bound: int) -> torch.Tensor:
    """``values >= bound`` for an integer tensor of any dtype and any Python int ``bound``."""
    info = torch.iinfo(values.dtype)
    if bound > info.max:  # no value reaches it
        return torch.zeros_like(values, dtype=torch.bool)
    if bound <= info.min:
        return torch.ones_like(values, dtype=torch.bool)
    if values.dtype in _WIDENED:
        values = values.to(torch.int64)
    return values >= bound


_WIDENED = (torch.uint16, torch.uint32, torch.uint64)  # few CPU ops take them (uint64 past 2**63 wraps)


def above(values: torch.Tensor, bound: int) -> torch.Tensor:
    """``values > bound`` (see :func:`at_least`)."""
    return at_least(values, bound + 1)


def out_of_range(values: torch.Tensor, bound: int) -> torch.Tensor:
    """``values < 0 or values >= bound``: entries that are not an index into ``bound`` items."""
    high = at_least(values, bound)
    return high | (values < 0) if values.dtype.is_signed else high


# -- messages: one wording for the torch checks and the device records ---------------------

UNKNOWN_COUNT = 2**62
"""A buffer size no index reaches, for a rule that does not know the size yet (FlashInfer's
``plan()``: the cache comes at ``run()``): only negative entries and the list's structure are
found, and messages say the size is not known."""


def _valid_range(buffer: str, count: int, unit: str, note: str = "") -> str:
    if count >= UNKNOWN_COUNT:
        return f"{buffer}'s {unit} count is not known yet (valid >= 0{note})"
    return f"{buffer} has {count} {unit}s (valid 0..{count - 1}{note})"


def page_message(arg: str, index: tuple, value: int, buffer: str, pages: int, live: bool, unit: str = "page") -> str:
    where = "read by the kernel" if live else "outside the read region (stale, not read)"
    return f"{arg}[{_index_text(index)}] = {value}, {_valid_range(buffer, pages, unit)}; entry is {where}"


def negative_message(arg: str, row: int, value: int) -> str:
    return f"{arg}[{row}] = {value} is negative"


def over_max_message(arg: str, row: int, value: int, max_len_arg: str, max_len: int) -> str:
    return f"{arg}[{row}] = {value} exceeds {max_len_arg} = {max_len}"


def over_table_message(arg: str, row: int, value: int, page_size: int, table_arg: str, width: int) -> str:
    return (f"{arg}[{row}] = {value} needs {ceil_div(value, page_size)} pages of {page_size}, "
            f"{table_arg} rows hold {width} ({width * page_size} tokens)")


def csr_page_message(indices_arg: str, position: int, row: int, col: int, value: int, buffer: str,
                     pages: int, unit: str = "page") -> str:
    return (f"{indices_arg}[{position}] (row {row}, {unit} {col} of the row) = {value}, "
            f"{_valid_range(buffer, pages, unit)}")


def last_page_over_message(arg: str, row: int, value: int, page_size: int) -> str:
    return f"{arg}[{row}] = {value} tokens in a last page of {page_size}"


def indptr_order_message(arg: str, row: int, start: int, stop: int) -> str:
    return f"{arg} must start at >= 0 and not decrease; row {row} spans [{start}, {stop})"


def indptr_end_message(arg: str, stop: int, indices_arg: str, entries: int) -> str:
    return f"{arg}[-1] = {stop} but {indices_arg} holds {entries} entries"


def slot_message(arg: str, token: int, value: int, buffer: str, slots: int, negative_skipped: bool = True) -> str:
    padding = "; negative = padding" if negative_skipped else ""
    return f"{arg}[{token}] = {value}, {_valid_range(buffer, slots, 'slot', padding)}"


def write_batch_message(arg: str, token: int, value: int, batch: int, indptr_arg: str) -> str:
    return f"{arg}[{token}] = {value}, the batch has {batch} requests; the kernel reads {indptr_arg}[{value}]"


def write_position_message(arg: str, token: int, value: int, kv_len: int, row: int, past: bool) -> str:
    what = "is past its request's allocated KV length" if past else "is negative"
    return (f"{arg}[{token}] = {value} {what} ({kv_len} tokens in request {row}): the write lands in another "
            "request's page or past the page list")


def write_page_message(indices_arg: str, indptr_arg: str, row: int, col: int, value: int, buffer: str,
                       pages: int, token: int) -> str:
    return (f"{indices_arg}[{indptr_arg}[{row}] + {col}] (row {row}, page {col} of the row) = {value}, "
            f"{_valid_range(buffer, pages, 'page')}; appended token {token} is WRITTEN there")


def unsupported_form(target: str, arg: str, why: str) -> Violation:
    """A call form a rule cannot describe exactly: reported, never checked with a guessed region."""
    return Violation("unsupported-form", arg, f"{target}: {why}; this call is not checked")


# -- metadata checks (no values read: the same on every device) ---------------------------

def check_dtype(tensor: torch.Tensor, arg: str, allowed: Sequence[torch.dtype]) -> list:
    if tensor.dtype in allowed:
        return []
    names = " or ".join(str(d).replace("torch.", "") for d in allowed)
    return [Violation("bad-dtype", arg, f"{arg} has dtype {str(tensor.dtype).replace('torch.', '')}, the kernel reads {names}",
                      value=str(tensor.dtype), bound=names)]


def check_device(tensor: torch.Tensor, arg: str, device: torch.device, other: str) -> list:
    if tensor.device == device:
        return []
    return [Violation("bad-device", arg, f"{arg} is on {tensor.device}, {other} is on {device}",
                      value=str(tensor.device), bound=str(device))]


def check_packed_rows(table: torch.Tensor, arg: str) -> list:
    """The kernel reads row i at ``i * W`` and ignores strides: the table must be contiguous."""
    if table.is_contiguous():
        return []
    return [Violation("bad-layout", arg,
                      f"{arg} is not contiguous (shape {tuple(table.shape)}, strides {table.stride()}); "
                      f"the kernel reads row i at offset i * {table.shape[-1]} and ignores strides, "
                      "so this view is silently misread (pass .contiguous())",
                      value=table.stride(), bound="contiguous")]


# -- the primitives: compute on CPU, describe on CUDA -------------------------------------

def length_bounds(lengths: torch.Tensor) -> Optional[tuple]:
    """``(min, max)`` of per-row lengths as Python ints, in one pass; ``(0, 0)`` when empty.
    ``None`` for a CUDA tensor (reading it would sync): the length checks then describe."""
    if lengths.is_cuda:
        return None
    if lengths.numel() == 0:
        return 0, 0
    low, high = torch.aminmax(lengths)
    return int(low), int(high)


def check_lengths(lengths: torch.Tensor, arg: str, bounds: Optional[tuple] = None, max_len: Optional[int] = None,
                  max_len_arg: str = "max_seq_len", index_of: Optional[Callable[[int], tuple]] = None) -> list:
    """``negative-seq-len`` and ``seq-len-exceeds-max`` for a 1D tensor of per-row lengths.

    ``bounds`` is :func:`length_bounds` of ``lengths``: valid lengths cost no further pass.
    """
    if lengths.is_cuda:
        return [Lengths(lengths, arg, max_len=max_len, max_len_arg=max_len_arg, index_of=index_of)]
    return _check_lengths(lengths, arg, bounds or length_bounds(lengths), max_len, max_len_arg,
                          index_of or _row_index)


def check_lengths_fit(lengths: torch.Tensor, arg: str, bounds: Optional[tuple], page_size: int, width: int,
                      table_arg: str, index_of: Optional[Callable[[int], tuple]] = None) -> list:
    """``seq-len-exceeds-table``: a row needs more pages than the table row holds."""
    if lengths.is_cuda:
        return [Lengths(lengths, arg, page_size=page_size, width=width, table_arg=table_arg, index_of=index_of,
                        only=frozenset({"seq-len-exceeds-table"}))]
    return _check_lengths_fit(lengths, arg, bounds or length_bounds(lengths), page_size, width, table_arg,
                              index_of or _row_index)


Region = Callable[[], tuple]
"""Returns the read region ``(first, end)``: per-row column bounds, each a tensor or ``None``."""


def check_pages_in_range(table: torch.Tensor, arg: str, num_pages: int, buffer: str, region: Region,
                         index_of: Optional[IndexOf] = None, unit: str = "page") -> list:
    """Every entry the kernel reads must be a page of ``buffer``: ``0 <= v < num_pages``.

    ``table`` is a 2D view ``[R, W]``; ``region()`` gives row r's read region, columns
    ``first[r] <= c < end[r]`` (``None``: no bound on that side). On CPU it is only called
    when some entry is out of range. Out-of-range entries inside the region are
    ``page-out-of-range`` errors; outside it, ``dead-page-out-of-range`` warnings.
    """
    if table.is_cuda:
        first, end = region()  # torch ops on the device: queued, not waited for
        return [PageTable(table, arg, (Buffer(buffer, int(num_pages), unit),), first=first, end=end,
                          explicit_region=True, index_of=index_of)]
    return _pages_in_range(table, arg, num_pages, buffer, region, index_of or _cell_index, unit)


def check_csr_pages(indptr: torch.Tensor, indices: torch.Tensor, last_page_len: Optional[torch.Tensor],
                    num_pages: int, page_size: Optional[int], buffer: str, indptr_arg: str = "indptr",
                    indices_arg: str = "indices", last_page_len_arg: str = "last_page_len") -> list:
    """A CSR page list: row i reads pages ``indices[indptr[i]:indptr[i+1]]``.

    Its KV length is ``(n_i - 1) * page_size + last_page_len[i]`` (an empty row has
    ``last_page_len = 0``). Entries past ``indptr[-1]`` are never read. Findings in
    ``indices`` are indexed ``(row, position_in_row)``; per-row findings ``(row,)``.
    """
    access = CsrPages(indptr, indices, (Buffer(buffer, int(num_pages)),), last_page_len, page_size, indptr_arg,
                      indices_arg, last_page_len_arg)
    return [access] if (indptr.is_cuda or indices.is_cuda) else csr_findings(access)


def check_slots(slot_mapping: torch.Tensor, num_slots: int, buffer: str, arg: str = "slot_mapping",
                tokens: Optional[int] = None) -> list:
    """Slots a cache-write kernel writes: ``slot < num_slots``; negative slots are padding, skipped.

    Only the first ``tokens`` entries are read (``slot_mapping.size(0)`` by default).
    Findings are indexed ``(token,)``.
    """
    access = Slots(slot_mapping, arg, Buffer(buffer, int(num_slots)), tokens)
    return [access] if slot_mapping.is_cuda else slot_findings(access)


def check_duplicate_pages(table: torch.Tensor, arg: str, region: Region,
                          index_of: Optional[IndexOf] = None) -> list:
    """``duplicate-page``: the same page twice in one row's read region (sort, compare neighbours).

    A host check: on a CUDA table it syncs, so it runs only outside CUDA graph capture."""
    run = lambda: _duplicate_pages(table, arg, region, index_of or _cell_index)  # noqa: E731
    return [HostCheck("duplicate-page", run)] if table.is_cuda else run()


# -- torch implementations (any device; they sync on CUDA) ----------------------------------

def _row_index(r: int) -> tuple:
    return (r,)


_KV_INDEX = (lambda r, c: (r, 0, c), lambda r, c: (r, 1, c))  # a [B, 2, W] table's K and V views


def _cell_index(r: int, c: int) -> tuple:
    return (r, c)


def _check_lengths(lengths, arg, bounds, max_len, max_len_arg, index_of) -> list:
    found = []
    low, high = bounds
    if low < 0:
        rows = (lengths < 0).nonzero().flatten()
        found.append(_per_row("negative-seq-len", arg, lengths, rows, 0, index_of,
                              lambda r, v: negative_message(arg, r, v)))
    if max_len is not None and high > max_len:
        rows = above(lengths, max_len).nonzero().flatten()
        found.append(_per_row("seq-len-exceeds-max", arg, lengths, rows, max_len, index_of,
                              lambda r, v: over_max_message(arg, r, v, max_len_arg, max_len)))
    return found


def _check_lengths_fit(lengths, arg, bounds, page_size, width, table_arg, index_of) -> list:
    capacity = width * page_size
    if bounds[1] <= capacity:
        return []
    rows = above(lengths, capacity).nonzero().flatten()
    return [_per_row("seq-len-exceeds-table", arg, lengths, rows, capacity, index_of,
                     lambda r, v: over_table_message(arg, r, v, page_size, table_arg, width))]


def _per_row(check, arg, lengths, rows, bound, index_of, describe) -> Violation:
    values = lengths[rows]
    first_row, first_value = int(rows[0]), int(values[0])
    examples = tuple((index_of(r), v) for r, v in zip(rows[:MAX_EXAMPLES].tolist(), values[:MAX_EXAMPLES].tolist()))
    return Violation(check, arg, describe(first_row, first_value),
                     index=index_of(first_row), value=first_value, bound=bound,
                     count=int(rows.numel()), examples=examples)


def _pages_in_range(table, arg, num_pages, buffer, region, index_of, unit="page") -> list:
    if table.numel() == 0:
        return []
    low, high = torch.aminmax(table)
    if int(low) >= 0 and int(high) < num_pages:
        return []
    first, end = region()
    bad = out_of_range(table, num_pages)
    if first is None and end is None:
        live_bad, dead_bad = bad, None
    else:
        cols = torch.arange(table.shape[1], device=table.device)
        live = torch.ones_like(bad) if first is None else cols >= first.unsqueeze(1)
        if end is not None:
            live &= cols < end.unsqueeze(1)
        live_bad, dead_bad = bad & live, bad & ~live
    found = []
    for check, mask, is_live in (("page-out-of-range", live_bad, True), ("dead-page-out-of-range", dead_bad, False)):
        if mask is None:
            continue
        positions = mask.nonzero()
        if positions.numel() == 0:
            continue
        values = table[mask]
        r, c = positions[0].tolist()
        value = int(values[0])
        index = index_of(r, c)
        found.append(Violation(check, arg, page_message(arg, index, value, buffer, num_pages, is_live, unit),
                               index=index, value=value, bound=num_pages, count=int(positions.shape[0]),
                               examples=_examples(positions, values, index_of)))
    return found


def _duplicate_pages(table, arg, region, index_of) -> list:
    if table.numel() == 0 or table.shape[1] < 2:
        return []
    first, end = region()
    rows, width = table.shape
    cols = torch.arange(width, device=table.device)
    live = torch.ones(rows, width, dtype=torch.bool, device=table.device)
    if first is not None:
        live &= cols >= first.unsqueeze(1)
    if end is not None:
        live &= cols < end.unsqueeze(1)
    # Dead entries get distinct negative sentinels so they never pair with anything.
    sentinel = -1 - torch.arange(rows * width, device=table.device, dtype=torch.int64).view(rows, width)
    keyed = torch.where(live, table.to(torch.int64), sentinel)
    ordered, order = keyed.sort(dim=1, stable=True)
    repeat = ordered[:, 1:] == ordered[:, :-1]
    if not bool(repeat.any()):
        return []
    positions = repeat.nonzero()
    second = order[:, 1:][repeat]  # column of the later copy
    firsts = order[:, :-1][repeat]
    values = ordered[:, 1:][repeat]
    pos = torch.stack([positions[:, 0], second], dim=1)
    r, c = pos[0].tolist()
    index = index_of(r, c)
    value = int(values[0])
    return [Violation("duplicate-page", arg,
                      f"{arg}[{_index_text(index)}] = {value} repeats the page at column "
                      f"{int(firsts[0])} of the same row's read region",
                      index=index, value=value, count=int(pos.shape[0]),
                      examples=_examples(pos, values, index_of))]


# -- the access forms' torch checks (what the engine runs for CPU tensors) -----------------

def window_first_page(lengths, window_left: int, q_len: int, page_size: int, tile: int):
    """First column a sliding-window kernel loads per row: ``S = len - q_len - window_left``
    tokens (``len - (q_len - 1) - (window_left + 1)``) are skipped in whole tiles of ``tile``."""
    skipped = (lengths.to(torch.int64) - q_len - window_left).clamp(min=0)  # int64: window_left may pass 2**31
    return (skipped // tile * tile) // page_size


def table_views(access: PageTable) -> list:
    """``[(2D view [rows, W], index_of, Buffer)]``: what each buffer reads of the table."""
    table, buffers = access.table, access.buffers
    if access.kv_split:  # [B, 2, W]: K ids index K, V ids index V
        return [(table[:, kv, :], access.index_of or _KV_INDEX[kv], buffer) for kv, buffer in enumerate(buffers)]
    if access.sparse_batch:
        view, n = table.reshape(-1, table.shape[-1]), access.sparse_batch
        index_of = access.index_of or (lambda r, c: (r // n, r % n, c))
    else:
        view, index_of = table, access.index_of or _cell_index
    return [(view, index_of, buffer) for buffer in buffers]


def length_index_of(access: PageTable):
    if access.length_index_of is not None:
        return access.length_index_of
    if access.sparse_batch:
        n = access.sparse_batch
        return lambda r: (r // n, r % n)
    return _row_index


def page_table_findings(access: PageTable) -> list:
    """The torch checks of a :class:`PageTable`: lengths, then each buffer's view of the table."""
    found = []
    width, page_size = access.width, access.page_size
    lengths = None
    if access.lengths is not None:
        lengths = access.lengths if access.lengths.dim() == 1 else access.lengths.reshape(-1)
        if lengths.dtype == torch.uint32 or access.length_offset:  # few CPU ops take uint32
            lengths = lengths.to(torch.int64) + access.length_offset
        bounds = _sync_bounds(lengths)
        index_of = length_index_of(access)
        found += _check_lengths(lengths, access.lengths_arg, bounds, access.max_len, access.max_len_arg, index_of)
        found += _check_lengths_fit(lengths, access.lengths_arg, bounds, page_size, width, access.arg, index_of)

    def region():
        if access.explicit_region:
            return access.first, access.end
        if access.whole_row or lengths is None:
            return None, None
        end = ceil_div(lengths.to(torch.int64).clamp(min=0), page_size).clamp(max=width)
        if access.window_left is None or access.window_left < 0:
            return None, end
        return window_first_page(lengths, access.window_left, access.q_len, page_size,
                                 access.tile or page_size), end

    for view, index_of, buffer in table_views(access):
        found += _pages_in_range(view, access.arg, buffer.pages, buffer.name, region, index_of, buffer.unit)
    found = _only(found, access.only)
    if access.relabel is not None:
        found = [access.relabel(v, access.buffers) for v in found]
    return found


def lengths_findings(access: Lengths) -> list:
    lengths = access.lengths.reshape(-1).to(torch.int64)
    bounds = _sync_bounds(lengths)
    index_of = access.index_of or _row_index
    found = _check_lengths(lengths, access.arg, bounds, access.max_len, access.max_len_arg, index_of)
    if access.page_size is not None and access.width is not None:
        found += _check_lengths_fit(lengths, access.arg, bounds, access.page_size, access.width, access.table_arg,
                                    index_of)
    return _only(found, access.only)


def csr_metadata(access: CsrPages) -> Optional[list]:
    """The shape findings of a CSR list; ``None`` when its values cannot be checked at all."""
    indptr, lpl = access.indptr, access.last_page_len
    if indptr.dim() != 1 or indptr.shape[0] < 1:
        return None
    rows = indptr.shape[0] - 1
    if lpl is not None and tuple(lpl.shape) != (rows,):
        return [Violation("shape-mismatch", access.last_page_len_arg,
                          f"{access.last_page_len_arg} has shape {tuple(lpl.shape)}, {access.indptr_arg} implies "
                          f"({rows},)", value=tuple(lpl.shape), bound=(rows,))]
    return []


def csr_findings(access: CsrPages) -> list:
    """The torch checks of a :class:`CsrPages` (and of the tokens it is written through)."""
    found = _csr_findings(access)
    return [access.relabel(v, access.buffers) for v in found] if access.relabel is not None else found


def _csr_findings(access: CsrPages) -> list:
    indptr, indices = access.indptr, access.indices
    metadata = csr_metadata(access)
    if metadata is None:
        return [Violation("shape-mismatch", access.indptr_arg, f"{access.indptr_arg} must be 1-D [batch + 1], got "
                          f"{tuple(indptr.shape)}", value=tuple(indptr.shape))]
    found = list(metadata)
    if metadata and access.writes is not None:  # a write's KV lengths need last_page_len: not followed
        return _only(found, access.only)
    last_page_len = access.last_page_len if not metadata else None
    rows = indptr.shape[0] - 1
    if rows == 0:
        return _only(found, access.only)
    bounds = indptr.to(torch.int64)
    steps = bounds[1:] - bounds[:-1]
    start, stop = int(bounds[0]), int(bounds[-1])
    if start < 0 or int(steps.min()) < 0:
        row = 0 if start < 0 else int((steps < 0).nonzero()[0, 0])
        return _only(found + [Violation("shape-mismatch", access.indptr_arg,
                                        indptr_order_message(access.indptr_arg, row, int(bounds[row]),
                                                             int(bounds[row + 1])),
                                        index=(row,), value=int(bounds[row + 1]), bound=int(bounds[row]))],
                     access.only)
    if stop > indices.numel():
        return _only(found + [Violation("shape-mismatch", access.indptr_arg,
                                        indptr_end_message(access.indptr_arg, stop, access.indices_arg,
                                                           indices.numel()), value=stop, bound=indices.numel())],
                     access.only)
    page_size = access.page_size
    if last_page_len is not None and page_size is not None:
        lens = last_page_len.to(torch.int64)
        low, high = _sync_bounds(lens)
        arg = access.last_page_len_arg
        if low < 0:
            found.append(_per_row("negative-seq-len", arg, lens, (lens < 0).nonzero().flatten(), 0, _row_index,
                                  lambda r, v: negative_message(arg, r, v)))
        if high > page_size:
            found.append(_per_row("seq-len-exceeds-table", arg, lens, (lens > page_size).nonzero().flatten(),
                                  page_size, _row_index, lambda r, v: last_page_over_message(arg, r, v, page_size)))
    if access.writes is not None:
        return _only(found + _write_findings(access, bounds), access.only)
    live = indices.reshape(-1)[start:stop]
    for buffer in access.buffers:
        found += _csr_live_pages(access, live, start, bounds, buffer)
    return _only(found, access.only)


def _csr_live_pages(access: CsrPages, live, start, bounds, buffer: Buffer) -> list:
    num_pages = buffer.pages
    if live.numel() == 0:
        return []
    low, high = torch.aminmax(live)
    if int(low) >= 0 and int(high) < num_pages:
        return []
    bad = out_of_range(live, num_pages).nonzero().flatten()
    positions = bad + start
    row_of = torch.searchsorted(bounds, positions, right=True) - 1
    pos = torch.stack([row_of, positions - bounds[row_of]], dim=1)
    values = live[bad]
    r, p = pos[0].tolist()
    value = int(values[0])
    return [Violation("page-out-of-range", access.indices_arg,
                      csr_page_message(access.indices_arg, int(positions[0]), r, p, value, buffer.name, num_pages,
                                       access.unit),
                      index=(r, p), value=value, bound=num_pages, count=int(bad.numel()),
                      examples=_examples(pos, values, lambda a, b: (a, b)))]


def _write_findings(access: CsrPages, bounds) -> list:
    """Each written token's row, position and page (FlashInfer ``page.cuh``
    ``AppendPagedKVCacheKernel``: page ``indices[indptr[b] + pos // ps]``, no bound check)."""
    writes, page_size, found = access.writes, access.page_size, []
    nnz = writes.tokens
    if nnz == 0:
        return []
    batch = access.last_page_len.shape[0]
    b = writes.batch_indices[:nnz].to(torch.int64)
    p = writes.positions[:nnz].to(torch.int64)
    bad_b = (b < 0) | (b >= batch)
    if bool(bad_b.any()):
        tokens = bad_b.nonzero().flatten()
        t = int(tokens[0])
        found.append(Violation("shape-mismatch", writes.batch_arg,
                               write_batch_message(writes.batch_arg, t, int(b[t]), batch, access.indptr_arg),
                               index=(t,), value=int(b[t]), bound=batch, count=int(tokens.numel())))
    lens = access.last_page_len.to(torch.int64)
    safe_b = b.where(~bad_b, 0)
    n_pages = (bounds[1:] - bounds[:-1])[safe_b]
    kv_len = ((n_pages - 1) * page_size + lens[safe_b]).clamp(min=0)
    negative = (p < 0) & ~bad_b
    beyond = (p >= kv_len) & ~bad_b & ~negative
    for mask, check, past in ((negative, "negative-seq-len", False), (beyond, "seq-len-exceeds-table", True)):
        if bool(mask.any()):
            tokens = mask.nonzero().flatten()
            t = int(tokens[0])
            found.append(Violation(check, writes.positions_arg,
                                   write_position_message(writes.positions_arg, t, int(p[t]), int(kv_len[t]),
                                                          int(b[t]), past),
                                   index=(t,), value=int(p[t]), bound=int(kv_len[t]), count=int(tokens.numel())))
    ok = ~(bad_b | negative | beyond)
    column = p.clamp(min=0) // page_size
    entry = bounds[safe_b] + column
    indices = access.indices.reshape(-1)
    written = indices[entry.where(ok, 0)].to(torch.int64) if indices.numel() else entry
    for buffer in access.buffers:
        bad_page = ok & out_of_range(written, buffer.pages)
        if bool(bad_page.any()):
            tokens = bad_page.nonzero().flatten()
            t = int(tokens[0])
            index, value = (int(b[t]), int(column[t])), int(written[t])
            examples = tuple(((int(b[i]), int(column[i])), int(written[i])) for i in tokens[:MAX_EXAMPLES].tolist())
            found.append(Violation("page-out-of-range", access.indices_arg,
                                   write_page_message(access.indices_arg, access.indptr_arg, index[0], index[1], value,
                                                      buffer.name, buffer.pages, t),
                                   index=index, value=value, bound=buffer.pages, count=int(tokens.numel()),
                                   examples=examples))
    return found


def slot_findings(access: Slots) -> list:
    slots = access.slots.reshape(-1)
    if access.tokens is not None:
        slots = slots[:access.tokens]
    num_slots = access.buffer.pages
    if slots.numel() == 0:
        return []
    low, high = _sync_bounds(slots)
    if high < num_slots and (low >= 0 or access.negative_skipped):
        return []
    bad = at_least(slots, num_slots) if access.negative_skipped else out_of_range(slots, num_slots)
    bad = bad.nonzero().flatten()
    values = slots[bad]
    token, value = int(bad[0]), int(values[0])
    return _only([Violation("page-out-of-range", access.arg,
                            slot_message(access.arg, token, value, access.buffer.name, num_slots,
                                         access.negative_skipped), index=(token,),
                            value=value, bound=num_slots, count=int(bad.numel()),
                            examples=tuple(((t,), v) for t, v in zip(bad[:MAX_EXAMPLES].tolist(),
                                                                      values[:MAX_EXAMPLES].tolist())))],
                 access.only)


def _sync_bounds(lengths) -> tuple:
    if lengths.numel() == 0:
        return 0, 0
    low, high = torch.aminmax(lengths)
    return int(low), int(high)


def _only(found: list, only) -> list:
    return found if only is None else [v for v in found if v.check in only]


TORCH_CHECKS = {PageTable: page_table_findings, Lengths: lengths_findings, CsrPages: csr_findings,
                Slots: slot_findings}
"""The torch check of each access form (the engine's CPU path)."""

__all__ = ["above", "at_least", "ceil_div", "check_csr_pages", "check_device", "check_dtype", "check_duplicate_pages",
           "check_lengths", "check_lengths_fit", "check_packed_rows", "check_pages_in_range", "check_slots",
           "length_bounds", "out_of_range"]
