"""GPU: the access checks as one sync-free Triton launch per check, CUDA graphs included.

When a call's tables are CUDA tensors, :mod:`tsan_paged.engine` hands each access description
(:mod:`tsan_paged.access`) here. It becomes a *plan* (the kernel of :mod:`tsan_paged.kernels`
that checks its form, the launch shape and the scalars, cached per form), one launch, and a
*record* in a preallocated device ring slot: per check how many launches hit it, how many
entries offend, the first offending entry and the bound. No ``.item()``, no allocation (the
ring is made once, before any capture), no host sync: ``torch.cuda.set_sync_debug_mode("error")``
stays silent on the deferred path. The records decode into the same :class:`Violation` objects
the torch checks give (check id, index, value, bound, count, message; ``examples`` holds the
first offending entry only; values wider than 32 bits are shown saturated to the int32 range).
The same kernels run on CPU tensors under Triton's interpreter (tests).

What happens on a finding (config keys ``device_path``, ``device_action``, ``device_poll_s``):

- **sync path** (``device_path="auto"`` in ``raise`` and ``abort`` mode, eager): the kernel
  runs, the host reads the record (one sync, the only one) and the sanitizer acts before the
  attention kernel is called, as on CPU.
- **deferred path** (``log`` mode eager, and every mode while a CUDA graph is being
  captured): nothing waits. Each call site (the caller's ``file:line`` at call or at capture
  time, plus the access's form) owns one ring slot; records there are sticky (the first
  finding is kept, later ones counted). They are read without blocking whenever the GPU has
  passed a snapshot point: a snapshot (one async copy of the used ring into pinned memory,
  and an event) is queued at most every ``device_poll_s`` seconds by a checked call or by the
  end of a ``CUDAGraph.replay()``; the next checked call or replay after the GPU got there
  reports it. ``PagedSanitizer.flush()``, the sanitizer's exit and process exit read
  everything now (they sync). A report names op, check, index, value, bound and the call site
  (the capture site for graph replays). ``abort`` mode ends the process when the report is
  read; ``raise`` mode raises the deferred errors from ``flush()`` or at the block's exit.
- **device actions** (``device_action``), so a deferred finding cannot turn into an
  unrelated illegal memory access first:

  * ``trap``: the device prints one line (``tsan_paged trap: check position value bound``)
    and executes ``trap`` in the check kernel, before the attention kernel reads anything. The
    CUDA context is dead afterwards, but the last line on the console says why. Default in
    ``abort`` mode.
  * ``guard``: offending entries are rewritten **in the caller's tensors** to the access's
    guard value before the kernel runs (a value its kernel reads harmlessly: ``-1``, xqa's
    own "no page"; ``0``, an in-range page, for other reads; ``-1`` for slot mappings, which
    their kernels skip), offending lengths are clamped (negative -> 0, past the table or
    ``max_len`` -> that bound, a CSR last page into ``[0, page_size]``). The program survives,
    only the offending rows' outputs change, and the finding is reported. An access with no
    safe guard value (a write through a CSR list) is reported without guarding. Default in
    ``log`` and ``raise`` mode.
  * ``none``: report only.

**A finding survives the write it failed to stop.** An access with no safe guard value is a
write through the table (``append_paged_kv_cache``, FlashAttention's new K/V): in ``log`` mode
the kernel runs, and an offending entry sends its write past the cache, anywhere in device
memory, the device ring included (issue 20: bf16 tokens read back as counts and positions). Two
ways out were weighed: trap by default for such writes (sync-free, but ``log`` mode would kill
the CUDA context of the program it promises to leave running), or keep their records where no
device write reaches. The second is what happens: such an entry's slot is a *host slot*,
pinned host memory the kernel writes through its device address (Ring). No copy, no sync, a
fixed address a CUDA graph captures; a clean launch costs its launch counter's atomic over the
bus (plus a ticket atomic per program when the grid has several), a launch with a finding a few
more. Not yet measured on a GPU. Reads, and writes that are guarded or trapped,
keep device slots. In ``raise`` and ``abort`` mode such a write traps on the device instead.

**Corrupted records.** A device slot can still be overwritten (by that write, or by a kernel no
rule checks). Every record is checked before it is decoded (:func:`corrupted`): hit counters
>= 0, a found check's count and first position within the entries it checks, the bound the
launch passed, a value out of it, no record of a check its kernel never writes. One that fails
is reported once per call site as ``device-records-corrupted`` (an error), never decoded; the
call site's later records are not trusted (not decoded). The sync path's slot is zeroed after one.

The first launch of each form compiles its kernel (about a second): make the first calls
eagerly, before capturing graphs (serving engines warm up that way anyway).
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import checks
from . import kernels as K
from .access import CsrPages, Lengths, PageTable, Slots
from .callsite import caller_frame, describe
from .report import Violation

available = K.available
TRITON_ERROR = K.TRITON_ERROR


# -- launch shapes (benchmark knobs) ---------------------------------------------------------
# The launch shape keeps the kernel small, which is what a graph replay pays for: on an H100, xqa ran
# ~11 us longer after a version with 8192-entry programs and a [16, 128] slow-path tile (255 registers
# and a stack), ~2 us after this one (~120 registers, 5 programs for a 64 x 66 table).
# benchmarks/gpu_slowdown_probe.py measures the shapes; docs/gpu.md has the figures.
def _env_int(name: str, default: int, allowed, described: str) -> int:
    """A benchmarking knob from the environment; a bad value warns and keeps the default (importing
    tsan_paged must not fail: TSAN_PAGED=... imports it into every Python process)."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
        if value in allowed:
            return value
    except ValueError:
        pass
    import warnings

    warnings.warn(f"tsan_paged: {name}={text!r} is not {described}; using {default}", stacklevel=2)
    return default


PROGRAM_ENTRIES = _env_int("TSAN_PAGED_PROGRAM_ENTRIES", 1024, range(16, 1 << 20), "an integer from 16 to 2**20 - 1")
MAX_ROWS = 128
FBLOCK_MAX = 1024   # fast pass: entries per load step
SLOW_TILE = 128     # slow path: entries per [sub_r, block_w] tile (one per thread at 4 warps)
ROWS_PER_PROGRAM = 1024  # flat kernel: indptr / last_page_len rows, written tokens per program
NUM_WARPS = _env_int("TSAN_PAGED_NUM_WARPS", 4, (1, 2, 4, 8, 16), "1, 2, 4, 8 or 16")
# Signal programmatic dependent launch (sm90+) at the end of the check: xqa is launched with PDL.
PDL = os.environ.get("TSAN_PAGED_PDL", "1") != "0"


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ------------------------------------------------------------------------------------------
# Plans: one per access form, cached
# ------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Plan:
    """What to launch for one access form, and how to turn its record into Violations."""

    kind: str  # "dense" | "flat"
    grid: int
    num_warps: int
    head: tuple  # the kernel's scalar arguments before STICKY
    block: tuple  # after GUARD: per-program sizes, then the constexprs up to TRAP_ENABLED, PDL
    align: int  # dense: table entries per 16 bytes when every program's range is 16-byte aligned
    guard: Optional[int]
    decode: Callable  # (plan, words, previous hits) -> [Violation]
    info: dict = field(default_factory=dict)  # names, sizes and callables for the reports
    tails: dict = field(default_factory=dict)

    def tail(self, sticky: int, action: int, errs: int, align: int, trap: bool, pdl: bool) -> tuple:
        key = (sticky, action, errs, align, trap, pdl)
        tail = self.tails.get(key)
        if tail is None:
            guard = self.guard if self.guard is not None else 0
            block = self.block
            if self.kind == "dense":  # ALIGN is the 5th constexpr of the dense kernel
                block = block[:5] + (align,) + block[6:]
            tail = self.tails[key] = self.head + (sticky, action, errs, guard) + block + (trap, pdl)
        return tail


_PLANS: dict = {}


def _cached(key, build) -> Plan:
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 4096:
            _PLANS.clear()
        plan = _PLANS[key] = build()
    return plan


def plan_for(access) -> Optional[Plan]:
    """The plan that checks ``access`` (``None``: not a form the kernels check)."""
    if isinstance(access, PageTable):
        return _page_table_plan(access)
    if isinstance(access, Lengths):
        return _lengths_plan(access)
    if isinstance(access, CsrPages):
        return _csr_plan(access)
    if isinstance(access, Slots):
        return _slots_plan(access)
    return None


def _dense_launch(rows: int, width: int, row_stride: int, itemsize: int, entries: Optional[int] = None,
                  num_warps: Optional[int] = None) -> tuple:
    """``(grid, block_r, sub_r, block_w, lblock, fblock, align)`` for a table of ``rows`` rows."""
    block_w = 16
    while block_w < width and block_w < SLOW_TILE:
        block_w *= 2
    rows = max(rows, 0)
    # Fast pass: ~PROGRAM_ENTRIES entries and at most MAX_ROWS rows per program, spread evenly.
    per_program = max(1, min(MAX_ROWS, (entries or PROGRAM_ENTRIES) // max(row_stride, 1)))
    grid = max(1, -(-rows // per_program))
    block_r = max(1, -(-rows // grid))
    sub_r = max(1, min(SLOW_TILE // block_w, _pow2(block_r)))
    span = block_r * row_stride
    per16 = max(1, 16 // itemsize)
    align = per16 if span % per16 == 0 and (rows * row_stride) % per16 == 0 else 1
    return grid, block_r, sub_r, block_w, _pow2(block_r), min(FBLOCK_MAX, max(128, _pow2(span))), align


def _max_len_arg(max_len: Optional[int]) -> int:
    """The kernel's MAXLEN: ``-1`` for none, else the bound itself (up to int64's range: uint32
    lengths reach 2**32 - 1, so a bound past int32's range must not be clamped to it). The
    kernels compare it with lengths widened to int64, whatever type Triton gives the scalar."""
    return -1 if max_len is None else min(int(max_len), K.BIG)


def _page_table_plan(a: PageTable) -> Plan:
    table, lengths = a.table, a.lengths
    if a.form is not None:  # the rule's own key for everything but the values (cheaper to hash)
        plan = _PLANS.get(a.form)
        if plan is not None:
            return plan
    key = a.form if a.form is not None else ("table", tuple(table.shape), table.dtype, a.arg, a.buffers, a.page_size,
           None if lengths is None else (tuple(lengths.shape), lengths.dtype), a.lengths_arg, a.length_offset,
           a.max_len, a.max_len_arg, a.whole_row, a.window_left, a.q_len, a.tile, a.explicit_region,
           None if a.first is None else a.first.dtype, None if a.end is None else a.end.dtype, a.kv_split,
           a.sparse_batch, a.guard, a.only, a.relabel, a.reported_as,
           a.index_of if a.relabel is not None else None)  # a derived table's views: each its own plan

    def build() -> Plan:
        rows, width = a.rows, a.width
        views = a.buffers
        pages = [b.pages for b in views]
        kv_split = a.kv_split and len(views) == 2
        row_stride = 2 * width if kv_split else width
        grid, block_r, sub_r, block_w, lblock, fblock, align = _dense_launch(rows, width, row_stride,
                                                                             table.element_size())
        if a.explicit_region:
            region = K.REGION_BOUNDS
        elif a.whole_row or lengths is None:
            region = K.REGION_ROW
        else:
            region = K.REGION_LENGTHS
        window = -1 if a.window_left is None or a.window_left < 0 else int(a.window_left)
        max_len = _max_len_arg(a.max_len)
        len_unsigned = lengths is not None and lengths.dtype == torch.uint32
        head = (rows, width, row_stride, width if kv_split else 0, len(views), pages[0], pages[-1], min(pages),
                a.page_size, width * a.page_size, max_len, region, window, int(a.q_len), int(a.length_offset),
                int(len_unsigned))
        block = (block_r, sub_r, block_w, lblock, fblock, align, a.tile or a.page_size, lengths is not None,
                 a.first is not None, a.end is not None)
        views_of = checks.table_views(a)
        info = dict(arg=a.arg, lengths_arg=a.lengths_arg, max_len_arg=a.max_len_arg, max_len=a.max_len,
                    page_size=a.page_size, width=width, buffers=views, len_unsigned=len_unsigned,
                    index_of=[v[1] for v in views_of], length_index_of=checks.length_index_of(a),
                    wide=table.element_size() > 4, only=a.only, relabel=a.relabel, reported_as=a.reported_as)
        return Plan("dense", grid, NUM_WARPS, head, block, align, a.guard, _dense_findings, info)

    return _cached(key, build)


def _lengths_plan(a: Lengths) -> Plan:
    lengths = a.lengths
    key = ("lengths", tuple(lengths.shape), lengths.dtype, a.arg, a.max_len, a.max_len_arg, a.page_size, a.width,
           a.table_arg, a.only)

    def build() -> Plan:
        rows = int(lengths.numel())
        grid, block_r, sub_r, block_w, lblock, fblock, _ = _dense_launch(rows, 0, 0, 4)
        width = a.width if a.width is not None else 0
        page_size = a.page_size if a.page_size is not None else 1
        capacity = width * page_size if a.page_size is not None and a.width is not None else K.BIG
        max_len = _max_len_arg(a.max_len)
        len_unsigned = lengths.dtype == torch.uint32
        head = (rows, 0, 0, 0, 1, 1, 1, 1, page_size, capacity, max_len, K.REGION_ROW, -1, 1, 0, int(len_unsigned))
        block = (block_r, sub_r, block_w, lblock, fblock, 1, page_size, True, False, False)
        info = dict(arg=a.table_arg or a.arg, lengths_arg=a.arg, max_len_arg=a.max_len_arg, max_len=a.max_len,
                    page_size=page_size, width=width, buffers=(), len_unsigned=len_unsigned, index_of=[],
                    length_index_of=a.index_of or (lambda r: (r,)), wide=False, only=a.only)
        return Plan("dense", grid, NUM_WARPS, head, block, 1, None, _dense_findings, info)

    return _cached(key, build)


def _flat_plan(key, *, entries: int, rows: int, tokens: int, buffers: tuple, page_size: int, neg_ok: bool,
               check_entries: bool, has_indptr: bool, has_last: bool, has_tokens: bool, guard, decode, info) -> Plan:
    def build() -> Plan:
        per = PROGRAM_ENTRIES
        grid = max(1, -(-entries // per) if check_entries else 1, -(-rows // ROWS_PER_PROGRAM) if has_indptr else 1,
                   -(-tokens // ROWS_PER_PROGRAM) if has_tokens else 1)
        pages = [b.pages for b in buffers]
        head = (entries, rows, tokens, pages[0], pages[-1], min(pages), len(buffers), page_size or 1, int(neg_ok))
        block = (per, ROWS_PER_PROGRAM, ROWS_PER_PROGRAM, min(FBLOCK_MAX, max(128, _pow2(per))), 128, 128,
                 check_entries, has_indptr, has_last, has_tokens)
        return Plan("flat", grid, NUM_WARPS, head, block, 1, guard, decode, dict(info, buffers=buffers))

    return _cached(key, build)


def _csr_plan(a: CsrPages) -> Optional[Plan]:
    """(The engine has checked the list's metadata: 1-D indptr of 2+ entries, last_page_len
    of its rows or none.)"""
    writes = a.writes
    if writes is not None and (a.last_page_len is None or a.page_size is None):
        return None
    lpl = a.last_page_len if a.page_size is not None else None
    key = ("csr", tuple(a.indptr.shape), a.indptr.dtype, a.indices.numel(), a.indices.dtype,
           None if lpl is None else lpl.dtype, a.buffers, a.page_size, a.indptr_arg, a.indices_arg,
           a.last_page_len_arg, None if writes is None else (writes.tokens, writes.batch_indices.dtype,
                                                             writes.positions.dtype, writes.batch_arg,
                                                             writes.positions_arg), a.guard, a.only, a.unit,
           a.relabel, a.reported_as)
    info = dict(indptr_arg=a.indptr_arg, indices_arg=a.indices_arg, last_page_len_arg=a.last_page_len_arg, unit=a.unit,
                page_size=a.page_size, entries=int(a.indices.numel()), rows=int(a.indptr.shape[0] - 1),
                batch_arg=writes.batch_arg if writes else "", positions_arg=writes.positions_arg if writes else "",
                only=a.only, wide=a.indices.element_size() > 4, relabel=a.relabel, reported_as=a.reported_as)
    return _flat_plan(key, entries=int(a.indices.numel()), rows=int(a.indptr.shape[0] - 1),
                      tokens=writes.tokens if writes else 0, buffers=a.buffers, page_size=a.page_size or 1,
                      neg_ok=False, check_entries=writes is None, has_indptr=True, has_last=lpl is not None,
                      has_tokens=writes is not None, guard=None if writes is not None else a.guard,
                      decode=_csr_findings, info=info)


def _slots_plan(a: Slots) -> Plan:
    count = int(a.slots.numel()) if a.tokens is None else min(int(a.tokens), int(a.slots.numel()))
    key = ("slots", count, a.slots.dtype, a.arg, a.buffer, a.guard, a.only, a.negative_skipped)
    info = dict(arg=a.arg, only=a.only, wide=a.slots.element_size() > 4, negative_skipped=a.negative_skipped)
    return _flat_plan(key, entries=count, rows=0, tokens=0, buffers=(a.buffer,), page_size=1,
                      neg_ok=a.negative_skipped,
                      check_entries=True, has_indptr=False, has_last=False, has_tokens=False, guard=a.guard,
                      decode=_slot_findings, info=info)


def launch_tensors(access) -> tuple:
    """The kernel's tensor arguments for ``access``, in its plan's order (dummies: the first tensor).
    The kernels read packed memory: a strided view is checked through a packed copy (a guard
    action then rewrites the copy, not the view)."""
    return tuple(t if t.is_contiguous() else t.contiguous() for t in _launch_tensors(access))


def _launch_tensors(access) -> tuple:
    if isinstance(access, PageTable):
        lengths = access.lengths
        if lengths is not None:
            if lengths.dim() != 1:
                lengths = lengths.reshape(-1)
            if lengths.dtype == torch.uint32:  # same bits, read as unsigned
                lengths = lengths.view(torch.int32)
        table = access.table
        return (table, lengths if lengths is not None else table, access.first if access.first is not None else table,
                access.end if access.end is not None else table)
    if isinstance(access, Lengths):
        lengths = access.lengths.reshape(-1)
        if lengths.dtype == torch.uint32:
            lengths = lengths.view(torch.int32)
        return (lengths, lengths, lengths, lengths)
    if isinstance(access, CsrPages):
        indices = access.indices.reshape(-1)
        lpl = access.last_page_len if access.last_page_len is not None else indices
        w = access.writes
        return (indices, access.indptr, lpl, w.batch_indices if w else indices, w.positions if w else indices)
    slots = access.slots.reshape(-1)
    return (slots, slots, slots, slots, slots)


# ------------------------------------------------------------------------------------------
# Records -> Violations (the torch checks' order and wording)
# ------------------------------------------------------------------------------------------

def _record_limits(plan: Plan) -> dict:
    """``{check: (size, bound, aux rows)}`` for each check ``plan``'s kernel can write: its record's
    positions lie in ``[0, size)``, its count in ``[1, size]``, its bound word is ``bound`` when
    that is fixed by the launch (``None``: data-dependent), its aux row below ``aux rows``. Read
    off the launch's own scalar arguments, as the kernel reads them (kernels.py)."""
    limits = plan.info.get("limits")
    if limits is not None:
        return limits
    h, b = plan.head, plan.block
    limits = {}
    if plan.kind == "dense":
        rows, width, views, p0, p1, cap, max_len = h[0], h[1], h[4], h[5], h[6], h[9], h[10]
        for c, pages in ((K.PAGE0, p0), (K.DEAD0, p0)) + (((K.PAGE1, p1), (K.DEAD1, p1)) if views == 2 else ()):
            if width:
                limits[c] = (rows * width, pages, None)
        if b[7]:  # HAS_LENGTHS
            limits[K.NEGATIVE] = (rows, 0, None)
            limits[K.OVER_TABLE] = (rows, cap, None)
            if max_len >= 0:
                limits[K.OVER_MAX] = (rows, max_len, None)
    else:
        entries, rows, tokens, p0, p1, views, page_size = h[0], h[1], h[2], h[3], h[4], h[6], h[7]
        check_entries, has_indptr, has_last, has_tokens = b[6:10]
        pages = ((K.PAGE0, p0),) + (((K.PAGE1, p1),) if views == 2 else ())
        if check_entries or has_tokens:
            size = tokens if has_tokens else entries
            for c, count in pages:
                limits[c] = (size, count, rows if has_indptr else None)
        if has_tokens:
            limits[K.TOKEN_BATCH] = (tokens, rows, None)
            limits[K.TOKEN_NEG] = limits[K.TOKEN_OVER] = (tokens, None, rows)
        if has_indptr:
            limits[K.SHAPE] = (rows, None, None)
            limits[K.SHAPE_END] = (rows, entries, None)
        if has_last:
            limits[K.NEGATIVE] = (rows, 0, None)
            limits[K.OVER_TABLE] = (rows, page_size, None)
    plan.info["limits"] = limits
    return limits


_OUT_OF_RANGE = (K.PAGE0, K.PAGE1, K.DEAD0, K.DEAD1, K.TOKEN_BATCH)  # a finding's value is < 0 or >= its bound


def corrupted(plan: Plan, words, sticky: bool = True) -> Optional[str]:
    """Why the record ``words`` cannot have been written by ``plan``'s kernel, or ``None``.

    A kernel that writes out of bounds (an unguarded write these checks reported but could not
    stop, or one no rule checks) can land on the device records and leave any bits there: bf16
    data read as counts and positions. Such a record is reported as ``device-records-corrupted``,
    never decoded. What a real record satisfies: hits >= 0; for a check found, a count in
    ``[1, size]``, a first position in ``[0, size)``, the bound the launch passed, a value out of
    that bound, an aux row below the batch; in a slot owned by one call site (``sticky``), no
    record of a check its kernel never writes, and launch counts >= 0. (The sync path's shared
    slot keeps other plans' records of checks this one never clears.)"""
    limits = _record_limits(plan)
    if sticky and (words[K.CALLS] < 0 or words[K.HIT_CALLS] < 0):
        return f"launch counts {words[K.CALLS]}, {words[K.HIT_CALLS]}"
    neg_ok = plan.kind == "flat" and plan.head[8]
    for c in range(K.NCHECKS):
        base = K.RECORD + K.REC * c
        hits, count, enc, bound, aux = words[base:base + K.REC]
        what = f"record of check {c} ({K.CHECK_IDS[c]})"
        limit = limits.get(c)
        if limit is None:
            if sticky and any(words[base:base + K.REC]):
                return f"a {what}, which this check's kernel never writes"
            continue
        if hits < 0:
            return f"{what}: {hits} hits"
        if hits == 0:
            continue
        size, want, aux_rows = limit
        if not 1 <= count <= size:
            return f"{what}: {count} offending entries of {size}"
        if not 0 < enc <= K.BIG:
            return f"{what}: first entry encoded as {enc}"
        position, value = K.unpack(enc)
        if not 0 <= position < size:
            return f"{what}: first offending entry at position {position} of {size}"
        if want is not None and bound != want:
            return f"{what}: bound {bound}, the launch passed {want}"
        low = min(want, K.INT32_MAX) if want is not None else None  # values are kept saturated to int32
        if c in _OUT_OF_RANGE and (0 <= value < low or (value < 0 and neg_ok)):
            return f"{what}: value {value} is within its bound {want}"
        if c in (K.NEGATIVE, K.TOKEN_NEG) and value >= 0:
            return f"{what}: value {value} is not negative"
        if aux_rows is not None and not 0 <= aux >> 32 < aux_rows and c in (K.PAGE0, K.PAGE1):
            return f"{what}: row {aux >> 32} of {aux_rows}"
        if aux_rows is not None and c in (K.TOKEN_NEG, K.TOKEN_OVER) and not 0 <= aux < aux_rows:
            return f"{what}: row {aux} of {aux_rows}"
    return None


def corrupted_finding(plan: Plan, why: str) -> Violation:
    """The report of a record :func:`corrupted` refused."""
    info = plan.info
    arg = info.get("arg") or info.get("indices_arg") or "?"
    return Violation("device-records-corrupted", arg,
                     f"the device record of the check of {arg} holds what no check kernel writes ({why}): device "
                     "memory was overwritten, most likely by a kernel that wrote out of bounds (a write these checks "
                     "reported and could not stop, or one no rule checks); the record is not decoded, and this call "
                     "site's later records are not trusted", value=why)


def decode(plan: Plan, words, previous_hits=None, sticky: bool = True) -> list:
    """The findings of a record, or its ``device-records-corrupted`` report (:func:`corrupted`)."""
    why = corrupted(plan, words, sticky)
    if why is not None:
        return [corrupted_finding(plan, why)]
    return plan.decode(plan, words, previous_hits)


def _new_hits(words, c: int, previous_hits) -> Optional[tuple]:
    """``(count, position, value, bound, aux)`` of check ``c`` if its record has news."""
    base = K.RECORD + K.REC * c
    hits, count, enc, bound, aux = words[base:base + K.REC]
    if hits <= (previous_hits[c] if previous_hits else 0) or count <= 0:
        return None
    position, value = K.unpack(enc)
    return count, position, value, bound, aux


def _saturated(info, value) -> str:
    return " (an int64 value past the int32 range, shown saturated)" if info.get("wide") and value in (
        K.INT32_MAX, K.INT32_MIN) else ""


def _only(found: list, only) -> list:
    return found if only is None else [v for v in found if v.check in only]


def _dense_findings(plan: Plan, words, previous_hits=None) -> list:
    info = plan.info
    out = []
    for c in (K.NEGATIVE, K.OVER_MAX, K.OVER_TABLE, K.PAGE0, K.DEAD0, K.PAGE1, K.DEAD1):
        if c in (K.PAGE1, K.DEAD1) and len(info["buffers"]) < 2:
            continue
        new = _new_hits(words, c, previous_hits)
        if new is None:
            continue
        count, where, value, _, _ = new
        if c in (K.NEGATIVE, K.OVER_MAX, K.OVER_TABLE):
            if info["len_unsigned"]:
                value &= 0xFFFFFFFF
            arg, index = info["lengths_arg"], info["length_index_of"](where)
            if c == K.NEGATIVE:
                bound, message = 0, checks.negative_message(arg, where, value)
            elif c == K.OVER_MAX:
                bound = info["max_len"]
                message = checks.over_max_message(arg, where, value, info["max_len_arg"], bound)
            else:
                bound = info["width"] * info["page_size"]
                message = checks.over_table_message(arg, where, value, info["page_size"], info["arg"], info["width"])
        else:
            view = 0 if c in (K.PAGE0, K.DEAD0) else 1
            r, col = divmod(where, info["width"])
            index = info["index_of"][view](r, col)
            arg, buffer = info["arg"], info["buffers"][view]
            bound = buffer.pages
            message = checks.page_message(arg, index, value, buffer.name, buffer.pages, c in (K.PAGE0, K.PAGE1),
                                           buffer.unit)
            message += _saturated(info, value)
        out.append(Violation(K.CHECK_IDS[c], arg, message, index=index, value=value, bound=bound, count=count,
                             examples=((index, value),)))
    out = _only(out, info["only"])
    relabel = info.get("relabel")
    return [relabel(v, info["buffers"]) for v in out] if relabel is not None else out


def _csr_findings(plan: Plan, words, previous_hits=None) -> list:
    info = plan.info
    indptr_arg, indices_arg = info["indptr_arg"], info["indices_arg"]
    shape = _new_hits(words, K.SHAPE, previous_hits)
    if shape is not None:
        count, row, stop, start, _ = shape
        return _only([Violation("shape-mismatch", indptr_arg, checks.indptr_order_message(indptr_arg, row, start, stop),
                                index=(row,), value=stop, bound=start)], info["only"])
    end = _new_hits(words, K.SHAPE_END, previous_hits)
    if end is not None:
        stop = end[2]
        return _only([Violation("shape-mismatch", indptr_arg,
                                checks.indptr_end_message(indptr_arg, stop, indices_arg, info["entries"]),
                                value=stop, bound=info["entries"])], info["only"])
    out = []
    lpl_arg, page_size = info["last_page_len_arg"], info["page_size"]
    for c in (K.NEGATIVE, K.OVER_TABLE):
        new = _new_hits(words, c, previous_hits)
        if new is not None:
            count, row, value, _, _ = new
            if c == K.NEGATIVE:
                bound, message = 0, checks.negative_message(lpl_arg, row, value)
            else:
                bound, message = page_size, checks.last_page_over_message(lpl_arg, row, value, page_size)
            out.append(Violation(K.CHECK_IDS[c], lpl_arg, message, index=(row,), value=value, bound=bound,
                                 count=count, examples=(((row,), value),)))
    writes = bool(info["batch_arg"])
    if writes:
        batch = _new_hits(words, K.TOKEN_BATCH, previous_hits)
        if batch is not None:
            count, token, value, _, _ = batch
            out.append(Violation("shape-mismatch", info["batch_arg"],
                                 checks.write_batch_message(info["batch_arg"], token, value, info["rows"], indptr_arg),
                                 index=(token,), value=value, bound=info["rows"], count=count))
        for c, past in ((K.TOKEN_NEG, False), (K.TOKEN_OVER, True)):
            new = _new_hits(words, c, previous_hits)
            if new is not None:
                count, token, value, kv_len, row = new
                out.append(Violation(K.CHECK_IDS[c], info["positions_arg"],
                                     checks.write_position_message(info["positions_arg"], token, value, kv_len, row,
                                                                   past),
                                     index=(token,), value=value, bound=kv_len, count=count))
    for c, buffer in zip((K.PAGE0, K.PAGE1), info["buffers"]):
        new = _new_hits(words, c, previous_hits)
        if new is None:
            continue
        count, position, value, _, aux = new
        row, col = aux >> 32, aux & 0xFFFFFFFF
        if writes:
            message = checks.write_page_message(indices_arg, indptr_arg, row, col, value, buffer.name, buffer.pages,
                                                position)
        else:
            message = checks.csr_page_message(indices_arg, position, row, col, value, buffer.name, buffer.pages,
                                              info["unit"])
        out.append(Violation("page-out-of-range", indices_arg, message + _saturated(info, value), index=(row, col),
                             value=value, bound=buffer.pages, count=count, examples=(((row, col), value),)))
    out = _only(out, info["only"])
    relabel = info.get("relabel")
    return [relabel(v, info["buffers"]) for v in out] if relabel is not None else out


def _slot_findings(plan: Plan, words, previous_hits=None) -> list:
    info = plan.info
    new = _new_hits(words, K.PAGE0, previous_hits)
    if new is None:
        return []
    count, token, value, _, _ = new
    buffer = info["buffers"][0]
    return _only([Violation("page-out-of-range", info["arg"],
                            checks.slot_message(info["arg"], token, value, buffer.name, buffer.pages,
                                                info["negative_skipped"])
                            + _saturated(info, value), index=(token,), value=value, bound=buffer.pages, count=count,
                            examples=(((token,), value),))], info["only"])


def err_mask(severity, reported_as: Optional[str] = None) -> int:
    """Bit per kernel check whose configured severity is "error" (what trap and guard act on);
    ``reported_as``: the page checks' findings become that check (a derived table's), whose
    severity counts for them."""
    def configured(c):
        if reported_as is not None and c in (K.PAGE0, K.PAGE1, K.DEAD0, K.DEAD1):
            return severity(reported_as)
        return severity(K.CHECK_IDS[c])

    return sum(1 << c for c in range(K.NCHECKS) if configured(c) == "error")


# ------------------------------------------------------------------------------------------
# The ring, fast launches, deferred records
# ------------------------------------------------------------------------------------------

@dataclass
class Entry:
    """A ring slot owned by one call site (+ access form): sticky records, read later."""

    slot: int
    plan: Plan
    op: str
    caller: str
    stack: tuple
    sink: object  # weakref to what reports the findings (the PagedSanitizer that checked the call)
    captured: bool
    hits: list = field(default_factory=lambda: [0] * K.NCHECKS)
    calls: int = 0
    code: object = None  # the call site's code object: keeps the id in the entry's key its own
    last: int = 0  # the ring's launch count at this entry's latest launch (Ring: recycling)
    stream: int = 0  # the raw CUDA stream of that launch
    host: bool = False  # its slot is a host slot (Ring): records no device write reaches
    corrupt: bool = False  # its record was found corrupted (reported once; not decoded again)


class Ring:
    """Preallocated device slots for one CUDA device (made once, outside any capture).

    An entry (a call site and access form, eagerly) keeps its slot while its sanitizer runs, but
    eager shapes vary (a plan per batch size or list length): when every slot is taken, the
    slots of eager entries whose records a completed snapshot has already reported (no launch
    since, and the last one on the snapshot's stream, which orders the copy after it) are
    recycled, and a leaving sanitizer's eager entries free theirs after its flush. A captured
    entry keeps its slot for good: its graph writes it at every replay. A recycled slot is zeroed
    on the current stream: a new owner launching on another stream is not ordered after it.

    ``host_slots`` more slots live in pinned host memory, mapped into the device's address space
    (under unified addressing a kernel writes host memory through the same address): they hold
    the records of entries whose finding nothing stops (check()), out of reach of the write they
    failed to stop. The host reads them in place, hit counters before fields: a kernel writes a
    record's fields before its hit counter, and a sticky record's fields never change after."""

    def __init__(self, device: torch.device, slots: int = 4096, host_slots: int = 256):
        self.device = device
        self.slots = slots
        self.words = torch.zeros(slots, K.SLOT_WORDS, dtype=torch.int64, device=device)
        self.host = torch.zeros(slots, K.SLOT_WORDS, dtype=torch.int64).pin_memory()
        self.sync_slot = 0  # slot 0: the sync path (one call at a time)
        self.next_slot = 1
        self.free_slots: list = []  # recycled slots, zeroed on the device
        self.launches = 0  # deferred launches so far
        self.snap_launches = 0  # launches queued before the pending snapshot
        self.reported_launches = 0  # launches whose records a completed snapshot (or flush) reported
        self.snap_stream = 0  # the raw stream the pending snapshot was queued on
        self.reported_stream = None  # ... the last completed one's (None: a flush, every stream)
        self.entries: dict = {}  # (site, plan, op, sink) -> Entry
        self.event: Optional[torch.cuda.Event] = None
        self.snap_slots = 0
        self.last_snapshot = 0.0
        self.poll_s = 0.1  # the last checked call's sanitizer's device_poll_s
        self.launchers: dict = {}  # kernel, dtypes, constexprs, pointer alignment -> compiled kernel
        self.base = self.words.data_ptr()
        # Host slots: pinned host memory the kernels write through its device address (unified
        # addressing), for the records of findings nothing stops (see check()).
        self.host_slots = torch.zeros(host_slots, K.SLOT_WORDS, dtype=torch.int64).pin_memory()
        self.host_base = _device_address(self.host_slots)
        self.host_next = 0
        self.host_free: list = []
        self.index = device.index
        self.stream_of = torch._C._cuda_getCurrentRawStream
        self.pdl = _pdl(device)


def _device_address(host: torch.Tensor) -> int:
    """The device address of pinned host memory: asked of the driver (``cuPointerGetAttribute``,
    as Triton's launcher does for every pointer argument); under unified addressing, every
    64-bit CUDA platform, it is the host address itself, which serves when the driver cannot be
    asked here."""
    address = host.data_ptr()
    try:
        import ctypes

        out = ctypes.c_uint64()
        status = ctypes.CDLL("libcuda.so.1").cuPointerGetAttribute(ctypes.byref(out), 3, ctypes.c_uint64(address))
        return out.value if status == 0 and out.value else address  # 3: CU_POINTER_ATTRIBUTE_DEVICE_POINTER
    except Exception:
        return address


_lock = threading.RLock()
_rings: dict = {}  # device index -> Ring
_capability: dict = {}
_warned: set = set()
_replay_patch = None  # (class, original replay)


def ring_for(device: torch.device, create: bool = True) -> Optional[Ring]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    ring = _rings.get(index)
    if ring is None and create:
        if torch.cuda.is_current_stream_capturing():
            return None  # allocating (and zeroing) now would be captured into the graph
        with _lock:
            ring = _rings.get(index)
            if ring is None:
                with torch.cuda.device(index):
                    ring = _rings[index] = Ring(torch.device("cuda", index))
                atexit.register(_atexit_flush)
    return ring


def capability(device: torch.device) -> tuple:
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = _capability.get(index)
    if cap is None:
        cap = _capability[index] = torch.cuda.get_device_capability(index)
    return cap


def _pdl(device) -> bool:
    return PDL and capability(device)[0] >= 9


def prepare(device: torch.device) -> None:
    """Make the ring now (call before capturing graphs if no eager check ran yet)."""
    ring_for(device)


def launch(ring: Ring, plan: Plan, tensors: tuple, slot: int, sticky: int, action: int, errs: int,
           host: bool = False) -> None:
    """Launch through a pre-bound compiled handle (no Triton Python launcher on the hot path);
    ``host``: ``slot`` is a host slot (Ring)."""
    ptrs = [t.data_ptr() for t in tensors]
    aligned = tuple(p % 16 == 0 for p in ptrs)
    align = plan.align if aligned[0] else 1
    # The trap code (device_print + trap) only in the trap action's kernel: the guard and none
    # kernels are smaller and print nothing.
    trap = action == K.ACTION_TRAP
    tail = plan.tail(sticky, action, errs, align, trap, ring.pdl)
    key = (plan, aligned, ring.pdl, trap)  # a plan fixes its tensors' dtypes and its constexprs
    compiled = ring.launchers.get(key)
    if compiled is not None:
        compiled.run(plan.grid, 1, 1, ring.stream_of(ring.index), compiled.function, compiled.packed_metadata,
                     None, None, None, *ptrs, (ring.host_base if host else ring.base) + slot * K.SLOT_WORDS * 8,
                     *tail)
        return
    record = ring.host_slots[slot] if host else ring.words[slot]  # Triton's launcher maps a host pointer itself
    compiled = K.kernel(plan.kind, False)[(plan.grid,)](*tensors, record, *tail, num_warps=plan.num_warps)
    if getattr(compiled, "packed_metadata", None) is not None and hasattr(compiled, "function"):
        ring.launchers[key] = compiled


def run_interpreted(plan: Plan, tensors: tuple, *, action: str = "none", errs: int = 0, sticky: int = 0,
                    slot: Optional[torch.Tensor] = None) -> list:
    """One launch of ``plan`` on CPU tensors under Triton's interpreter; its findings (tests, and
    ``device_interpret``)."""
    slot = torch.zeros(K.SLOT_WORDS, dtype=torch.int64) if slot is None else slot
    tail = plan.tail(sticky, K.ACTION_CODES[action], errs, 1, False, False)
    K.kernel(plan.kind, True)[(plan.grid,)](*tensors, slot, *tail)
    return decode(plan, slot.tolist(), sticky=bool(sticky))


def check(plan: Plan, tensors: tuple, settings, op: str, library_dirs: tuple, capturing: bool) -> list:
    """Check one access on the device. Returns the findings (sync path) or ``[]`` (deferred)."""
    mode = settings.mode
    deferred = capturing or settings.device_path == "deferred" or (settings.device_path == "auto" and mode == "log")
    ring = _rings.get(tensors[0].get_device())
    if ring is None:
        ring = ring_for(tensors[0].device)
        if ring is None:
            _warn_once("capture-first", "tsan_paged: the first device check of this GPU happened during CUDA graph "
                       "capture; the ring could not be made there, so this captured call is NOT checked. Make one "
                       "eager call (or tsan_paged.device.prepare(device)) before capturing.")
            return []
    errs = settings.errs
    if plan.info.get("reported_as") is not None:
        errs = err_mask(settings.severity, plan.info["reported_as"])
    if not deferred:
        slot = ring.sync_slot
        launch(ring, plan, tensors, slot, 0, 0, errs)
        words = ring.words[slot].tolist()  # the one sync of the sync path
        found = decode(plan, words, sticky=False)
        if found and found[0].check == "device-records-corrupted":
            ring.words[slot].zero_()  # the next launch starts from a clean slot (same stream)
        return found
    action_name = settings.device_action
    if action_name == "auto":
        action_name = "trap" if mode == "abort" else "guard"
    if action_name == "guard" and plan.guard is None:
        # No value the kernel reads (or writes through) harmlessly: in raise and abort mode stop on
        # the device, the nearest to "the kernel is not called"; in log mode report only.
        action_name = "none" if mode == "log" else "trap"
    action = K.ACTION_CODES[action_name]
    # A write through the table with no guard value, let through (log mode): an offending entry sends
    # the kernel's write past its buffer, anywhere in device memory, the device records included.
    # Its record goes to a host slot, out of that write's reach (Ring), so its finding survives it.
    host = action_name == "none" and plan.guard is None
    frame = caller_frame(library_dirs)
    # The sink's serial, not id(): a later sanitizer at a freed one's address must not inherit its
    # record slot (whose weak reference is dead, so its findings would go nowhere). The code object
    # and the plan by id (hashing them costs microseconds per call); the entry holds both, so neither
    # id can be reused while the key exists.
    code = frame.f_code if frame is not None else None
    sink = settings.sink
    key = (id(code), frame.f_lineno if frame is not None else 0, id(plan), op,
           sink.serial if sink is not None else 0, capturing)  # a captured call has its own record
    with _lock:  # an entry found here is not recycled by another thread before its launch
        entry = ring.entries.get(key)
        if entry is None:
            entry = _new_entry(ring, key, plan, op, describe(frame), sink, capturing, code, host)
        ring.launches += 1
        entry.last = ring.launches
        entry.stream = ring.stream_of(ring.index)
    del frame
    launch(ring, plan, tensors, entry.slot, 1, action, errs, entry.host)
    ring.poll_s = settings.poll_s
    if capturing:
        _patch_replay()
    elif ring.event is not None or time.monotonic() - ring.last_snapshot >= settings.poll_s:
        poll(ring)
    return []


def _new_entry(ring: Ring, key, plan, op, site, sink, captured, code=None, host: bool = False) -> Entry:
    with _lock:
        entry = ring.entries.get(key)
        if entry is not None:
            return entry
        slot = _host_slot(ring, captured) if host else None
        host = slot is not None
        if not host:
            slot = _device_slot(ring, captured)
        caller, stack = site
        entry = Entry(slot=slot, plan=plan, op=op, caller=caller, stack=stack,
                      sink=weakref.ref(sink) if sink is not None else (lambda: None), captured=captured, code=code,
                      host=host)
        ring.entries[key] = entry
        return entry


def _device_slot(ring: Ring, captured: bool) -> int:
    if ring.next_slot >= ring.slots and not ring.free_slots and not captured:
        _recycle(ring)
    if ring.free_slots:
        return ring.free_slots.pop()
    if ring.next_slot >= ring.slots:
        _warn_once("ring-full", f"tsan_paged: all {ring.slots} device record slots are taken by call sites "
                   "checked since the last report; later ones share the last slot (their reports may name "
                   "another call site)")
        return ring.slots - 1
    ring.next_slot += 1
    return ring.next_slot - 1


def _host_slot(ring: Ring, captured: bool) -> Optional[int]:
    """A free host slot (Ring), or ``None`` when all are taken (the entry's records then go to the
    device, where the write it lets through can reach them: warned once)."""
    total = ring.host_slots.shape[0]
    if ring.host_next >= total and not ring.host_free and not captured:
        _recycle(ring)
    if ring.host_free:
        return ring.host_free.pop()
    if ring.host_next < total:
        ring.host_next += 1
        return ring.host_next - 1
    _warn_once("host-slots-full", f"tsan_paged: all {total} host record slots are taken: later unguarded writes "
               "(log mode) keep their records on the device, where a write they let through can overwrite them")
    return None


def _recycle(ring: Ring) -> None:
    """Free the slots of eager entries whose records are all reported (Ring's docstring). Only
    with no snapshot in flight: one queued before the slots are handed out again would report
    their old records as the new owners'."""
    if ring.event is not None:
        if not ring.event.query():
            return
        _finish_snapshot(ring)
    _free(ring, lambda entry: entry.last <= ring.reported_launches and
          (ring.reported_stream is None or entry.stream == ring.reported_stream))


def _release(ring: Ring, sink) -> None:
    """After ``sink``'s flush: its eager entries' slots are free (captured ones stay)."""
    if torch.cuda.is_current_stream_capturing():
        return
    with _lock:
        try:
            _free(ring, lambda entry: entry.sink() is sink)
        except Exception:  # a dead context (its flush warned): the slots cannot be zeroed, keep them out
            ring.free_slots.clear()


def _free(ring: Ring, done) -> None:
    """Free the slots of the eager entries ``done`` says are reported, zeroing them now (queued
    before any later snapshot or launch)."""
    for key, entry in list(ring.entries.items()):
        if not entry.captured and done(entry):
            del ring.entries[key]
            if entry.host:  # its launches are done (reported, or flushed): zeroed now, on the host
                ring.host_slots[entry.slot].zero_()
                ring.host_free.append(entry.slot)
            elif entry.slot != ring.slots - 1:  # the shared overflow slot is never handed out
                ring.words[entry.slot].zero_()
                ring.free_slots.append(entry.slot)


def _finish_snapshot(ring: Ring) -> None:
    """Report a completed snapshot. It is ordered after the launches queued on its own stream
    only: launches on other streams (``reported_stream``) may not be in it."""
    _report(ring, ring.host[:ring.snap_slots])
    ring.event = None
    ring.reported_launches = ring.snap_launches
    ring.reported_stream = ring.snap_stream


# -- reading records ---------------------------------------------------------------------

def poll(ring: Ring, *, force_snapshot: bool = False) -> None:
    """Report what a finished snapshot holds; queue a new one when due. Never blocks."""
    if ring.event is not None:
        if not ring.event.query():
            return
        _finish_snapshot(ring)
    now = time.monotonic()
    if not ring.entries or (not force_snapshot and now - ring.last_snapshot < ring.poll_s):
        return
    if torch.cuda.is_current_stream_capturing():
        return
    n = ring.next_slot
    ring.host[:n].copy_(ring.words[:n], non_blocking=True)
    ring.event = torch.cuda.Event()
    ring.event.record()
    ring.snap_slots = n
    ring.snap_launches = ring.launches
    ring.snap_stream = ring.stream_of(ring.index)
    ring.last_snapshot = now


def flush(sink=None) -> None:
    """Read every device record now (this syncs), and report what is new (``sink``: only its own)."""
    for ring in list(_rings.values()):
        if not ring.entries:
            continue
        previous = torch.cuda.get_sync_debug_mode()
        try:
            torch.cuda.set_sync_debug_mode(0)  # a deliberate sync: don't trip the user's debug mode
            with torch.cuda.device(ring.device):
                torch.cuda.synchronize()  # every stream: checks may run on a forward stream
                if ring.event is not None:
                    ring.event.synchronize()
                    _finish_snapshot(ring)
                n = ring.next_slot
                launches = ring.launches
                words = ring.words[:n].cpu()
        except Exception as exc:  # a trapped or faulted context: nothing can be read any more
            _warn_once("flush-failed", f"tsan_paged: could not read device check records ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}); the CUDA context is probably dead "
                       "(a trap, or a fault the checks did not stop)")
            continue
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        _report(ring, words, only=sink)
        if sink is None:
            ring.reported_launches, ring.reported_stream = launches, None


def _report(ring: Ring, words: torch.Tensor, only=None) -> None:
    n = words.shape[0]
    by_sink: dict = {}
    for entry in list(ring.entries.values()):
        if entry.slot >= n and not entry.host:
            continue
        sink = entry.sink()
        if only is not None and sink is not only:
            continue
        shared = not entry.host and entry.slot == ring.slots - 1  # the overflow slot: several call sites'
        found = entry_findings(entry, (ring.host_slots if entry.host else words)[entry.slot].tolist(), shared)
        if not found:
            continue
        where = "capture" if entry.captured else "call"
        found = [v.replace(op=entry.op, caller=entry.caller, stack=entry.stack,
                           message=v.message + f" [device record, {where} site; reported deferred]")
                 for v in found]
        by_sink.setdefault(id(sink), (sink, []))[1].extend(found)
    for sink, found in by_sink.values():
        if sink is not None:
            sink.report_found(found, defer=True)
        else:  # its sanitizer is gone (a graph replayed after it exited): the process's reporter
            from .report import reporter

            for v in found:
                reporter.report(v)


def entry_findings(entry: Entry, rec: list, shared: bool = False) -> list:
    """What is new in an entry's record ``rec`` (its words): findings, or its
    ``device-records-corrupted`` report, once (the entry's records are not decoded after that).
    ``shared``: the ring's overflow slot, whose records come from several call sites and plans
    (the ring-full warning said so): not checked against this entry's plan."""
    if entry.corrupt:
        return []
    why = None if shared else corrupted(entry.plan, rec)
    if why is not None:
        entry.corrupt = True
        return [corrupted_finding(entry.plan, why)]
    entry.calls = rec[K.CALLS]
    found = entry.plan.decode(entry.plan, rec, entry.hits)
    for c in range(K.NCHECKS):
        entry.hits[c] = max(entry.hits[c], rec[K.RECORD + K.REC * c])
    return found


def _atexit_flush() -> None:
    try:
        flush()
    except Exception:
        pass


def on_leave(sink, last: bool) -> None:
    """``sink`` is leaving: read its records (sync); ``last``: no sanitizer is active any more."""
    if not _rings:
        return
    flush(sink)
    for ring in list(_rings.values()):
        _release(ring, sink)
    if last:
        _unpatch_replay()


# -- CUDA graph replays ---------------------------------------------------------------------

def _patch_replay() -> None:
    global _replay_patch
    if _replay_patch is not None:
        return
    with _lock:
        if _replay_patch is not None:
            return
        cls = torch.cuda.CUDAGraph
        original = cls.__dict__.get("replay")
        base = cls.replay

        def replay(self, *args, **kwargs):
            result = base(self, *args, **kwargs)
            for ring in _rings.values():
                if ring.entries:
                    poll(ring)
            return result

        replay.__wrapped__ = base
        cls.replay = replay
        _replay_patch = (cls, original)


def _unpatch_replay() -> None:
    global _replay_patch
    with _lock:
        if _replay_patch is None:
            return
        cls, original = _replay_patch
        if original is None:
            del cls.replay
        else:
            cls.replay = original
        _replay_patch = None


def _warn_once(key: str, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    from loguru import logger

    logger.bind(tsan_paged=True).warning(message)
