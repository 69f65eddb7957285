"""Vectorized check primitives shared by every rule.

Each function takes tensors and names, and returns a list of :class:`Violation` (empty when
the argument is fine). None loops over rows or columns in Python. The page-range check
takes the *read region* as per-row column bounds ``[first, end)``: entries inside it are
dereferenced by the kernel (``page-out-of-range``, an error), entries outside it are stale
and never read (``dead-page-out-of-range``, a warning). Its fast path is one reduction
over the table; the masked analysis runs only when some entry is out of range.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .report import MAX_EXAMPLES, Violation

IndexOf = Callable[[int, int], tuple]
"""Maps (row of the 2D view, column) to the index reported to the user."""


def ceil_div(a, b):
    return -(-a // b)


def _examples(positions: torch.Tensor, values: torch.Tensor, index_of: IndexOf) -> tuple:
    pos = positions[:MAX_EXAMPLES].tolist()
    vals = values[:MAX_EXAMPLES].tolist()
    return tuple((index_of(*p), v) for p, v in zip(pos, vals))


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


def length_bounds(lengths: torch.Tensor) -> tuple:
    """``(min, max)`` of per-row lengths as Python ints, in one pass; ``(0, 0)`` when empty."""
    if lengths.numel() == 0:
        return 0, 0
    low, high = torch.aminmax(lengths)
    return int(low), int(high)


def check_lengths(lengths: torch.Tensor, arg: str, bounds: tuple, max_len: Optional[int] = None,
                  max_len_arg: str = "max_seq_len", index_of: Callable[[int], tuple] = lambda r: (r,)) -> list:
    """``negative-seq-len`` and ``seq-len-exceeds-max`` for a 1D tensor of per-row lengths.

    ``bounds`` is :func:`length_bounds` of ``lengths``: valid lengths cost no further pass.
    """
    found = []
    low, high = bounds
    if low < 0:
        rows = (lengths < 0).nonzero().flatten()
        found.append(_per_row("negative-seq-len", arg, lengths, rows, 0, index_of,
                              lambda r, v: f"{arg}[{r}] = {v} is negative"))
    if max_len is not None and high > max_len:
        rows = (lengths > max_len).nonzero().flatten()
        found.append(_per_row("seq-len-exceeds-max", arg, lengths, rows, max_len, index_of,
                              lambda r, v: f"{arg}[{r}] = {v} exceeds {max_len_arg} = {max_len}"))
    return found


def check_lengths_fit(lengths: torch.Tensor, arg: str, bounds: tuple, page_size: int, width: int, table_arg: str,
                      index_of: Callable[[int], tuple] = lambda r: (r,)) -> list:
    """``seq-len-exceeds-table``: a row needs more pages than the table row holds."""
    capacity = width * page_size
    if bounds[1] <= capacity:
        return []
    rows = (lengths > capacity).nonzero().flatten()
    return [_per_row("seq-len-exceeds-table", arg, lengths, rows, capacity, index_of,
                     lambda r, v: f"{arg}[{r}] = {v} needs {ceil_div(v, page_size)} pages of {page_size}, "
                                  f"{table_arg} rows hold {width} ({capacity} tokens)")]


def _per_row(check, arg, lengths, rows, bound, index_of, describe) -> Violation:
    values = lengths[rows]
    first_row, first_value = int(rows[0]), int(values[0])
    examples = tuple((index_of(r), v) for r, v in zip(rows[:MAX_EXAMPLES].tolist(), values[:MAX_EXAMPLES].tolist()))
    return Violation(check, arg, describe(first_row, first_value),
                     index=index_of(first_row), value=first_value, bound=bound,
                     count=int(rows.numel()), examples=examples)


Region = Callable[[], tuple]
"""Returns the read region ``(first, end)``: per-row column bounds, each a tensor or ``None``."""


def check_pages_in_range(table: torch.Tensor, arg: str, num_pages: int, buffer: str, region: Region,
                         index_of: IndexOf = lambda r, c: (r, c)) -> list:
    """Every entry the kernel reads must be a page of ``buffer``: ``0 <= v < num_pages``.

    ``table`` is a 2D view ``[R, W]``; ``region()`` gives row r's read region, columns
    ``first[r] <= c < end[r]`` (``None``: no bound on that side). It is only called when
    some entry is out of range. Out-of-range entries inside the region are
    ``page-out-of-range`` errors; outside it, ``dead-page-out-of-range`` warnings.
    """
    if table.numel() == 0:
        return []
    low, high = torch.aminmax(table)
    if int(low) >= 0 and int(high) < num_pages:
        return []
    first, end = region()
    bad = (table < 0) | (table >= num_pages)
    if first is None and end is None:
        live_bad, dead_bad = bad, None
    else:
        cols = torch.arange(table.shape[1], device=table.device)
        live = torch.ones_like(bad) if first is None else cols >= first.unsqueeze(1)
        if end is not None:
            live &= cols < end.unsqueeze(1)
        live_bad, dead_bad = bad & live, bad & ~live
    found = []
    for check, mask, where in (("page-out-of-range", live_bad, "read by the kernel"),
                               ("dead-page-out-of-range", dead_bad, "outside the read region (stale, not read)")):
        if mask is None:
            continue
        positions = mask.nonzero()
        if positions.numel() == 0:
            continue
        values = table[mask]
        r, c = positions[0].tolist()
        value = int(values[0])
        index = index_of(r, c)
        found.append(Violation(
            check, arg,
            f"{arg}[{', '.join(map(str, index))}] = {value}, {buffer} has {num_pages} pages "
            f"(valid 0..{num_pages - 1}); entry is {where}",
            index=index, value=value, bound=num_pages, count=int(positions.shape[0]),
            examples=_examples(positions, values, index_of)))
    return found


def check_duplicate_pages(table: torch.Tensor, arg: str, region: Region,
                          index_of: IndexOf = lambda r, c: (r, c)) -> list:
    """``duplicate-page``: the same page twice in one row's read region (sort, compare neighbours)."""
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
                      f"{arg}[{', '.join(map(str, index))}] = {value} repeats the page at column "
                      f"{int(firsts[0])} of the same row's read region",
                      index=index, value=value, count=int(pos.shape[0]),
                      examples=_examples(pos, values, index_of))]



def check_csr_pages(indptr: torch.Tensor, indices: torch.Tensor, last_page_len: Optional[torch.Tensor],
                    num_pages: int, page_size: Optional[int], buffer: str, indptr_arg: str = "indptr",
                    indices_arg: str = "indices", last_page_len_arg: str = "last_page_len") -> list:
    """A CSR page list: row i reads pages ``indices[indptr[i]:indptr[i+1]]``.

    Its KV length is ``(n_i - 1) * page_size + last_page_len[i]`` (an empty row has
    ``last_page_len = 0``). Entries past ``indptr[-1]`` are never read. Findings in
    ``indices`` are indexed ``(row, position_in_row)``; per-row findings ``(row,)``.
    """
    found = []
    rows = indptr.shape[0] - 1
    if indptr.dim() != 1 or rows < 0:
        return [Violation("shape-mismatch", indptr_arg, f"{indptr_arg} must be 1-D [batch + 1], got {tuple(indptr.shape)}",
                          value=tuple(indptr.shape))]
    if last_page_len is not None and tuple(last_page_len.shape) != (rows,):
        found.append(Violation("shape-mismatch", last_page_len_arg,
                               f"{last_page_len_arg} has shape {tuple(last_page_len.shape)}, {indptr_arg} implies ({rows},)",
                               value=tuple(last_page_len.shape), bound=(rows,)))
        last_page_len = None
    if rows == 0:
        return found
    bounds = indptr.to(torch.int64)
    steps = bounds[1:] - bounds[:-1]
    start, stop = int(bounds[0]), int(bounds[-1])
    if start < 0 or int(steps.min()) < 0:
        bad = (steps < 0).nonzero().flatten()
        row = int(bad[0]) if bad.numel() else 0
        return found + [Violation("shape-mismatch", indptr_arg,
                                  f"{indptr_arg} must start at >= 0 and not decrease; row {row} spans "
                                  f"[{int(bounds[row])}, {int(bounds[row + 1])})", index=(row,),
                                  value=int(bounds[row + 1]), bound=int(bounds[row]))]
    if stop > indices.numel():
        return found + [Violation("shape-mismatch", indptr_arg,
                                  f"{indptr_arg}[-1] = {stop} but {indices_arg} holds {indices.numel()} entries",
                                  value=stop, bound=indices.numel())]
    if last_page_len is not None and page_size is not None:
        lens = last_page_len.to(torch.int64)
        low, high = length_bounds(lens)
        if low < 0:
            found.append(_per_row("negative-seq-len", last_page_len_arg, lens, (lens < 0).nonzero().flatten(), 0,
                                  lambda r: (r,), lambda r, v: f"{last_page_len_arg}[{r}] = {v} is negative"))
        if high > page_size:
            found.append(_per_row("seq-len-exceeds-table", last_page_len_arg, lens, (lens > page_size).nonzero().flatten(),
                                  page_size, lambda r: (r,),
                                  lambda r, v: f"{last_page_len_arg}[{r}] = {v} tokens in a last page of {page_size}"))
    live = indices.reshape(-1)[start:stop]
    if live.numel() == 0:
        return found
    low, high = torch.aminmax(live)
    if int(low) >= 0 and int(high) < num_pages:
        return found
    bad = ((live < 0) | (live >= num_pages)).nonzero().flatten()
    positions = bad + start
    row_of = torch.searchsorted(bounds, positions, right=True) - 1
    pos = torch.stack([row_of, positions - bounds[row_of]], dim=1)
    values = live[bad]
    r, p = pos[0].tolist()
    value = int(values[0])
    return found + [Violation(
        "page-out-of-range", indices_arg,
        f"{indices_arg}[{int(positions[0])}] (row {r}, page {p} of the row) = {value}, {buffer} has {num_pages} pages "
        f"(valid 0..{num_pages - 1})", index=(r, p), value=value, bound=num_pages, count=int(bad.numel()),
        examples=_examples(pos, values, lambda a, b: (a, b)))]


def check_slots(slot_mapping: torch.Tensor, num_slots: int, buffer: str, arg: str = "slot_mapping",
                tokens: Optional[int] = None) -> list:
    """Slots a cache-write kernel writes: ``slot < num_slots``; negative slots are padding, skipped.

    Only the first ``tokens`` entries are read (``slot_mapping.size(0)`` by default).
    Findings are indexed ``(token,)``.
    """
    slots = slot_mapping.reshape(-1)[:tokens] if tokens is not None else slot_mapping.reshape(-1)
    if slots.numel() == 0 or int(slots.max()) < num_slots:
        return []
    bad = (slots >= num_slots).nonzero().flatten()
    values = slots[bad]
    token, value = int(bad[0]), int(values[0])
    return [Violation("page-out-of-range", arg,
                      f"{arg}[{token}] = {value}, {buffer} has {num_slots} slots (valid 0..{num_slots - 1}; "
                      "negative = padding)", index=(token,), value=value, bound=num_slots, count=int(bad.numel()),
                      examples=tuple(((t,), v) for t, v in zip(bad[:MAX_EXAMPLES].tolist(), values[:MAX_EXAMPLES].tolist())))]
