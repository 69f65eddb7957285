"""GPU: sync-free page-table checks that work inside CUDA graphs.

When a rule's page table is a CUDA tensor, the decode rule's length and page-range checks
(``negative-seq-len``, ``seq-len-exceeds-max``, ``seq-len-exceeds-table``,
``page-out-of-range``, ``dead-page-out-of-range``) run as ONE Triton kernel per call,
:func:`_check_kernel`. It computes each row's read region on the device from ``seq_lens``,
the page size, ``window_left`` and ``q_len`` (the xqa region of
:mod:`tsan_paged.rules.flashinfer`: columns ``first <= j < ceil(seq_len / ps)`` with ``first`` from the window and the xqa kernel's tile (``_window_first_page``); the
whole row for trtllm-gen), checks every table entry of every row against the page counts of
K and V, and writes a small record to a preallocated device *ring slot*: per check a flag
(how many checked calls hit it), the count of offending entries, the first offending
(row, col, value) packed in one int64, and the bound. No ``.item()``, no allocation (the ring
is made once, before any capture), no host sync: ``torch.cuda.set_sync_debug_mode("error")``
stays silent on the sync-free path. The same kernel runs on CPU tensors under Triton's
interpreter (``TRITON_INTERPRET=1``; :func:`run_check` with ``interpret=True``), which is how
CI tests its logic against the torch implementation (``tests/test_device_kernel.py``).

What happens on a finding (config keys ``device_path``, ``device_action``, ``device_poll_s``):

- **sync path** (``device_path="auto"`` in ``raise`` and ``abort`` mode, eager): the kernel
  runs, the host reads the record (one sync, the only one) and decides before the attention
  kernel is called: findings are exactly the torch path's (first example only), raised or
  aborted on by the sanitizer as on CPU.
- **deferred path** (``log`` mode eager, and every mode while a CUDA graph is being
  captured): nothing waits. Each call site (the caller's ``file:line`` captured at call or
  at capture time, plus the table's shape) owns one ring slot; records there are sticky (the
  first finding is kept, later ones counted). They are read without blocking whenever the
  GPU has passed a snapshot point: a snapshot (one async copy of the used ring into pinned
  memory, and an event) is queued at most every ``device_poll_s`` seconds (default 0.1) by
  a checked call or by the end of a ``CUDAGraph.replay()``; the next checked call or replay
  after the GPU got there (i.e. after the program's next sync point, at the latest) reports
  it. ``PagedSanitizer.flush()`` reads everything now (it syncs), and the sanitizer's exit
  and process exit do the same. A report names op, check, index, value, bound and the call
  site of the call, or of the capture for a graph replay. ``abort`` mode ends the process
  when the report is read; ``raise`` mode raises the deferred errors from ``flush()`` or
  from the ``with`` block's exit.
- **device actions** (``device_action``), so a deferred finding cannot turn into an
  unrelated illegal memory access first:

  * ``trap``: the device prints one line (``tsan_paged trap: check C view V row R col C
    value X bound B``) and executes ``trap`` in the check kernel, before the attention
    kernel reads anything. The CUDA context is dead afterwards (every later CUDA call
    fails), but the last line on the console says why. Default in ``abort`` mode.
  * ``guard``: offending read-region entries are rewritten **in the caller's table** to
    the guard value before the attention kernel runs (``-1`` for xqa, its own
    ``kBAD_PAGE_INDEX``, read as an all-zero page; ``0``, an in-range page, for other
    backends), and offending lengths are clamped in the caller's ``seq_lens`` (negative -> 0,
    past the table -> its capacity, past ``max_seq_len`` -> it). The program survives, only
    the offending rows' outputs change (they were wrong anyway), and the finding is
    reported. The caller's tensors stay modified: a table reused by later layers of the
    same step reads the guarded values too (its checks report the ``-1`` entries again, from
    the same call site, counted). Safe for kernels that
    treat ``-1`` as "no page" (FlashInfer xqa, measured on an H100); for kernels that
    would dereference ``-1`` use ``trap``. Default in ``log`` and ``raise`` mode, because a
    deferred report is only useful if the process lives to read it: without it a far-out
    entry kills the context at the next sync and the records with it.
  * ``none``: report only (the kernel reads the bad entry; the report can be lost with the
    context).

``device_path="torch"`` turns the device path off (the torch checks, which sync); it is
also used for tables that are not int32, when ``duplicate-page`` is switched on, and while
``track_pages`` is on (the kernel has no page-state check).
The first check of each table-width bucket compiles the kernel (about a second): make the
first calls eagerly, before capturing graphs (serving engines warm up that way anyway).
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

from .callsite import caller_frame, describe

try:  # Triton ships with torch on Linux; without it the device path is off (torch checks)
    import triton
    import triton.language as tl
except Exception as _exc:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    TRITON_ERROR = f"{type(_exc).__name__}: {_exc}"
else:
    TRITON_ERROR = ""

# Checks the kernel computes, in the order the torch rule reports them.
PAGE0, PAGE1, DEAD0, DEAD1, NEGATIVE, OVER_MAX, OVER_TABLE = range(7)
NCHECKS = 7
CHECK_IDS = ("page-out-of-range", "page-out-of-range", "dead-page-out-of-range", "dead-page-out-of-range",
             "negative-seq-len", "seq-len-exceeds-max", "seq-len-exceeds-table")
REPORT_ORDER = (NEGATIVE, OVER_MAX, OVER_TABLE, PAGE0, DEAD0, PAGE1, DEAD1)

# Ring slot layout (int64 words). Scratch (reset by the last program of each launch):
TICKET = 0            # programs done in this launch
SCRATCH = 1           # per check: count, encoded first (2 words)
FOUND_MASK = 15       # bit per check found in this launch
TRAP_CLAIM = 16       # first program to trap prints
# Record (kept across launches; read by the host):
CALLS = 17            # launches of this slot
HIT_CALLS = 18        # launches with any finding
RECORD = 19           # per check: hits, count, encoded first, bound (4 words)
SLOT_WORDS = 48
BIG = 0x7FFFFFFFFFFFFFFF
INT32_MAX = 2**31 - 1

ACTION_CODES = {"none": 0, "trap": 1, "guard": 2}
ACTION_TRAP = ACTION_CODES["trap"]
REGION_XQA, REGION_END, REGION_ROW = 0, 1, 2
XQA_TILE_TOKENS = 256  # default sliding-window tile (mha.cu); rules pass the kernel's own (64 for mha_sm90.cu)


if triton is not None:
    _K_BIG = tl.constexpr(BIG)
    _K_TICKET = tl.constexpr(TICKET)
    _K_SCRATCH = tl.constexpr(SCRATCH)
    _K_FOUND_MASK = tl.constexpr(FOUND_MASK)
    _K_TRAP_CLAIM = tl.constexpr(TRAP_CLAIM)
    _K_CALLS = tl.constexpr(CALLS)
    _K_HIT_CALLS = tl.constexpr(HIT_CALLS)
    _K_RECORD = tl.constexpr(RECORD)

    @triton.jit
    def _tally(count, first, bad, packed):
        """``(count, first)`` of one check, updated with a tile: how many entries are ``bad``, and
        the first of them, encoded as BIG - packed so that a max keeps the lowest index."""
        count += tl.reduce(bad.to(tl.int64), None, tl.standard._sum_combine)
        lowest = tl.reduce(tl.where(bad, _K_BIG - packed, 0), None, tl.standard._elementwise_max)
        first = tl.maximum(first, lowest)
        return count, first

    @triton.jit
    def _merge_finding(scratch_ptr, count, first):
        """One check's findings of this program into the launch's scratch: count, first (encoded)."""
        if count > 0:
            tl.atomic_add(scratch_ptr, count)
            tl.atomic_max(scratch_ptr + 1, first)

    def _check_kernel_src(table_ptr, lengths_ptr, slot_ptr,
                          R, W, ROW_STRIDE, VIEW1_OFF, NVIEWS,
                          P0, P1, PMIN, PAGE_SIZE, CAP, MAXLEN, REGION, WINDOW_LEFT, QLEN,
                          LEN_UNSIGNED, STICKY, ACTION, ERR_MASK, GUARD, BLOCK_R,
                          SUB_R: tl.constexpr, BLOCK_W: tl.constexpr, LBLOCK: tl.constexpr,
                          FBLOCK: tl.constexpr, ALIGN: tl.constexpr, TILE: tl.constexpr,
                          TRAP_ENABLED: tl.constexpr, PDL: tl.constexpr):
        """One program checks BLOCK_R whole rows: a fast pass, then (only if it saw anything) the full checks.

        Fast pass: the program's lengths and its rows' table entries (one flat contiguous range) are
        loaded once and OR-reduced to one "anything out of range" flag (entries against the smaller
        page count; whether an entry is live does not matter: any bad entry is a finding of some
        check). A clean program does no atomics (one ticket add when the grid has several programs)
        and writes nothing but the launch counter. A program that saw something re-reads its rows
        in [SUB_R, BLOCK_W] tiles and computes every check exactly (region, counts, first offending
        entry, guard, trap), merging into the slot's scratch; the last program writes the record.
        """
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        zero = pid.to(tl.int64) * 0
        r0 = pid * BLOCK_R
        # -- fast pass: lengths ----------------------------------------------------------
        lidx = tl.arange(0, LBLOCK)
        lrows = r0 + lidx
        lmask = (lidx < BLOCK_R) & (lrows < R)
        l32 = tl.load(lengths_ptr + lrows, mask=lmask, other=0)
        lflag = lmask & ((l32 < 0) | (l32 > CAP) | ((MAXLEN >= 0) & (l32 > MAXLEN)))
        acc_l = lflag.to(tl.int32)
        # -- fast pass: the rows' entries, one contiguous range ---------------------------
        start = r0.to(tl.int64) * ROW_STRIDE
        stop = tl.minimum(start + BLOCK_R * ROW_STRIDE, R.to(tl.int64) * ROW_STRIDE)
        start = start // ALIGN * ALIGN  # no-ops (the host checked): tell the compiler 16-byte loads are safe
        stop = stop // ALIGN * ALIGN
        acc = tl.zeros([FBLOCK], dtype=tl.int32)
        for off in range(start, stop, FBLOCK):
            idx = off + tl.arange(0, FBLOCK)
            v = tl.load(table_ptr + idx, mask=idx < stop, other=0)
            acc = acc | ((v < 0) | (v >= PMIN)).to(tl.int32)
        flag = tl.reduce(acc, None, tl.standard._elementwise_max) | tl.reduce(acc_l, None,
                                                                             tl.standard._elementwise_max)

        mask_bits = zero
        if flag != 0:
            # -- slow path: every check, exactly (this program only) ----------------------
            g_p0 = (ACTION == 2) & (((ERR_MASK >> 0) & 1) != 0)
            g_p1 = (ACTION == 2) & (((ERR_MASK >> 1) & 1) != 0)
            g_d0 = (ACTION == 2) & (((ERR_MASK >> 2) & 1) != 0)
            g_d1 = (ACTION == 2) & (((ERR_MASK >> 3) & 1) != 0)
            c_neg = zero
            e_neg = zero
            c_max = zero
            e_max = zero
            c_tab = zero
            e_tab = zero
            c_p0 = zero
            e_p0 = zero
            c_p1 = zero
            e_p1 = zero
            c_d0 = zero
            e_d0 = zero
            c_d1 = zero
            e_d1 = zero
            r_end = tl.minimum(r0 + BLOCK_R, R)
            for rs in range(r0, r_end, SUB_R):
                rows = rs + tl.arange(0, SUB_R)
                rmask = rows < r_end
                raw = tl.load(lengths_ptr + rows, mask=rmask, other=0).to(tl.int64)
                if LEN_UNSIGNED != 0:
                    lens = raw & 0xFFFFFFFF
                else:
                    lens = raw
                rows64 = rows.to(tl.int64)
                low32 = lens & 0xFFFFFFFF

                # lengths
                neg = rmask & (lens < 0)
                omax = rmask & (MAXLEN >= 0) & (lens > MAXLEN)
                otab = rmask & (lens > CAP)
                packed_len = (rows64 << 32) | low32
                c_neg, e_neg = _tally(c_neg, e_neg, neg, packed_len)
                c_max, e_max = _tally(c_max, e_max, omax, packed_len)
                c_tab, e_tab = _tally(c_tab, e_tab, otab, packed_len)

                # read region
                end = tl.minimum((tl.maximum(lens, 0) + PAGE_SIZE - 1) // PAGE_SIZE, W)
                first = lens * 0
                if REGION == 0:
                    if WINDOW_LEFT >= 0:
                        skipped = tl.maximum(lens - (QLEN - 1) - (WINDOW_LEFT + 1), 0)
                        first = (skipped // TILE * TILE) // PAGE_SIZE
                if REGION == 2:
                    end = lens * 0 + W

                for c0 in range(0, W, BLOCK_W):
                    cols = c0 + tl.arange(0, BLOCK_W)
                    m = rmask[:, None] & (cols[None, :] < W)
                    live = (cols[None, :] >= first[:, None]) & (cols[None, :] < end[:, None])
                    lin = rows64[:, None] * W + cols[None, :]
                    ptrs = table_ptr + rows64[:, None] * ROW_STRIDE + cols[None, :]
                    vals = tl.load(ptrs, mask=m, other=0)
                    packed = (lin << 32) | (vals.to(tl.int64) & 0xFFFFFFFF)
                    bad = m & ((vals < 0) | (vals >= P0))
                    lb = bad & live
                    db = bad & (~live)
                    c_p0, e_p0 = _tally(c_p0, e_p0, lb, packed)
                    c_d0, e_d0 = _tally(c_d0, e_d0, db, packed)
                    gmask = (lb & g_p0) | (db & g_d0)
                    if NVIEWS == 2:
                        ptrs1 = ptrs + VIEW1_OFF
                        vals1 = tl.load(ptrs1, mask=m, other=0)
                        packed1 = (lin << 32) | (vals1.to(tl.int64) & 0xFFFFFFFF)
                        bad1 = m & ((vals1 < 0) | (vals1 >= P1))
                        lb1 = bad1 & live
                        db1 = bad1 & (~live)
                        c_p1, e_p1 = _tally(c_p1, e_p1, lb1, packed1)
                        c_d1, e_d1 = _tally(c_d1, e_d1, db1, packed1)
                        gmask1 = (lb1 & g_p1) | (db1 & g_d1)
                        if VIEW1_OFF == 0:  # K and V read the same table: guard once
                            gmask = gmask | gmask1
                        else:
                            tl.store(ptrs1, tl.where(gmask1, GUARD, vals1), mask=gmask1)
                    tl.store(ptrs, tl.where(gmask, GUARD, vals), mask=gmask)

                if ACTION == 2:  # clamp offending lengths (after the region was computed from them)
                    fixed = lens
                    if ((ERR_MASK >> 5) & 1) != 0:
                        fixed = tl.where(omax, tl.minimum(fixed, MAXLEN), fixed)
                    if ((ERR_MASK >> 6) & 1) != 0:
                        fixed = tl.where(otab, tl.minimum(fixed, CAP), fixed)
                    if ((ERR_MASK >> 4) & 1) != 0:
                        fixed = tl.where(neg, 0, fixed)
                    tl.store(lengths_ptr + rows, fixed.to(tl.int32), mask=rmask & (fixed != lens))

            # this program's findings into the slot's scratch
            mask_bits = ((c_p0 > 0).to(tl.int64) | ((c_p1 > 0).to(tl.int64) << 1)
                         | ((c_d0 > 0).to(tl.int64) << 2) | ((c_d1 > 0).to(tl.int64) << 3)
                         | ((c_neg > 0).to(tl.int64) << 4) | ((c_max > 0).to(tl.int64) << 5)
                         | ((c_tab > 0).to(tl.int64) << 6))
            if mask_bits != 0:
                if TRAP_ENABLED:
                    if (ACTION == 1) & ((mask_bits & ERR_MASK) != 0):
                        claim = tl.atomic_cas(slot_ptr + _K_TRAP_CLAIM, zero, zero + 1)
                        tid = tl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r,r", [pid], dtype=tl.int32,
                                                        is_pure=True, pack=1)
                        if (claim == 0) & (tid == 0):
                            err = mask_bits & ERR_MASK
                            which = tl.where((err & 1) != 0, 0, tl.where((err & 2) != 0, 1, tl.where(
                                (err & 4) != 0, 2, tl.where((err & 8) != 0, 3, tl.where(
                                    (err & 16) != 0, 4, tl.where((err & 32) != 0, 5, 6))))))
                            enc = tl.where(which == 0, e_p0, tl.where(which == 1, e_p1, tl.where(
                                which == 2, e_d0, tl.where(which == 3, e_d1, tl.where(
                                    which == 4, e_neg, tl.where(which == 5, e_max, e_tab))))))
                            p = _K_BIG - enc
                            where = p >> 32
                            value = (p & 0xFFFFFFFF).to(tl.int32)
                            row = tl.where(which < 4, where // W, where)
                            col = tl.where(which < 4, where % W, -1)
                            bound = tl.where((which == 0) | (which == 2), P0, tl.where(which < 4, P1, tl.where(
                                which == 4, 0, tl.where(which == 5, MAXLEN, CAP))))
                            tl.device_print("tsan_paged trap: check view row col value bound", which, row, col,
                                            value, bound)
                            tl.inline_asm_elementwise("trap;", "=r,r", [pid], dtype=tl.int32, is_pure=False,
                                                      pack=1)
                tl.atomic_or(slot_ptr + _K_FOUND_MASK, mask_bits)
                _merge_finding(slot_ptr + _K_SCRATCH + 0, c_p0, e_p0)
                _merge_finding(slot_ptr + _K_SCRATCH + 2, c_p1, e_p1)
                _merge_finding(slot_ptr + _K_SCRATCH + 4, c_d0, e_d0)
                _merge_finding(slot_ptr + _K_SCRATCH + 6, c_d1, e_d1)
                _merge_finding(slot_ptr + _K_SCRATCH + 8, c_neg, e_neg)
                _merge_finding(slot_ptr + _K_SCRATCH + 10, c_max, e_max)
                _merge_finding(slot_ptr + _K_SCRATCH + 12, c_tab, e_tab)
            if PDL:  # the guard's stores reach the GPU before the dependent kernel may start
                tl.debug_barrier()
                tl.inline_asm_elementwise("fence.acq_rel.gpu;", "=r,r", [pid], dtype=tl.int32, is_pure=False,
                                          pack=1)

        if PDL:
            # Programmatic dependent launch (xqa is launched with it): this program wrote all that the
            # attention kernel reads; it may start launching (it still waits for our grid with
            # griddepcontrol.wait before reading anything, in mha.cu).
            tl.inline_asm_elementwise("griddepcontrol.launch_dependents;", "=r,r", [pid], dtype=tl.int32,
                                      is_pure=False, pack=1)

        # -- record: the last program to finish (the only one, for a single-program grid) ------
        # The ticket's low 32 bits count programs, the high bits programs that found something.
        ticket = zero
        if nprog > 1:
            ticket = tl.atomic_add(slot_ptr + _K_TICKET, 1 + ((mask_bits != 0).to(tl.int64) << 32))
        if (ticket & 0xFFFFFFFF) == nprog - 1:
            tl.atomic_add(slot_ptr + _K_CALLS, 1, sem="relaxed")
            if ((ticket >> 32) != 0) | (mask_bits != 0):
                found = tl.atomic_xchg(slot_ptr + _K_FOUND_MASK, 0)
                tl.atomic_add(slot_ptr + _K_HIT_CALLS, 1, sem="relaxed")
                for c in tl.static_range(7):
                    rec = slot_ptr + _K_RECORD + 4 * c
                    if ((found >> c) & 1) != 0:
                        cnt = tl.atomic_xchg(slot_ptr + _K_SCRATCH + 2 * c, 0)
                        enc = tl.atomic_xchg(slot_ptr + _K_SCRATCH + 2 * c + 1, 0)
                        if c == 0 or c == 2:
                            bnd = P0
                        elif c == 1 or c == 3:
                            bnd = P1
                        elif c == 4:
                            bnd = P0 * 0
                        elif c == 5:
                            bnd = MAXLEN
                        else:
                            bnd = CAP
                        hits = tl.load(rec)
                        if (STICKY == 0) | (hits == 0):
                            tl.store(rec + 1, cnt)
                            tl.store(rec + 2, enc)
                            tl.store(rec + 3, bnd.to(tl.int64))
                        tl.atomic_xchg(rec, hits + 1)  # last: a flag seen set has its fields written
                    elif STICKY == 0:
                        tl.store(rec + 1, zero)
                        tl.store(rec, zero)
            elif STICKY == 0:  # a clean launch of the sync path: no findings in the record
                for c in tl.static_range(7):
                    tl.store(slot_ptr + _K_RECORD + 4 * c + 1, zero)
                    tl.store(slot_ptr + _K_RECORD + 4 * c, zero)
            if nprog > 1:
                tl.store(slot_ptr + _K_TICKET, zero)

    _KERNELS: dict = {}

    def _kernel(interpret: bool):
        """The JIT kernel, or the same source under Triton's interpreter (CPU tensors)."""
        kernel = _KERNELS.get(interpret)
        if kernel is None:
            if interpret:
                from triton.runtime.interpreter import InterpretedFunction

                kernel = InterpretedFunction(_check_kernel_src)
            else:
                kernel = triton.jit(_check_kernel_src, do_not_specialize=list(range(3, 23)))
            _KERNELS[interpret] = kernel
        return kernel


def available() -> bool:
    return triton is not None


# ------------------------------------------------------------------------------------------
# One check's launch parameters
# ------------------------------------------------------------------------------------------

@dataclass
class View:
    """A 2D view of the table the kernel checks against one buffer."""

    buffer: str
    num_pages: int
    kv: Optional[int] = None  # 0/1 in a [B, 2, W] table: reported as index (row, kv, col)


@dataclass
class Plan:
    """What to launch for one table form, and how to turn a record into Violations."""

    rows: int
    width: int
    row_stride: int
    view1_off: int
    views: list
    page_size: int
    capacity: int
    max_len: Optional[int]
    region: int
    window_left: int
    q_len: int
    len_unsigned: bool
    sparse_batch: Optional[int] = None  # [H, B, W] tables: report (h, b[, col])
    guard_value: int = -1
    tile: int = XQA_TILE_TOKENS  # xqa skips whole leading tiles of this many tokens under a window
    key: tuple = ()
    block_r: int = 1       # rows per program
    block_w: int = 16      # slow path tile: [sub_r, block_w]
    grid: int = 1
    sub_r: int = 1
    lblock: int = 1        # fast pass: lengths per program (power of 2 >= block_r)
    fblock: int = 128      # fast pass: entries per load step
    align: int = 1         # 4 when every program's entry range starts and ends on a 16-byte boundary
    num_warps: int = 4
    tails: dict = field(default_factory=dict)  # (sticky, action, errs, align) -> launch args after the pointers

    def index_of(self, r: int, c: int, view: int) -> tuple:
        if self.sparse_batch:
            return (r // self.sparse_batch, r % self.sparse_batch, c)
        kv = self.views[view].kv
        return (r, kv, c) if kv is not None else (r, c)

    def length_index(self, r: int) -> tuple:
        return (r // self.sparse_batch, r % self.sparse_batch) if self.sparse_batch else (r,)


def make_plan(rows: int, width: int, views: list, page_size: int, max_len, region: int, window_left,
              q_len: int, len_unsigned: bool, *, kv_split: bool = False, sparse_batch=None,
              guard_value: int = -1, entries: Optional[int] = None, num_warps: Optional[int] = None,
              tile: int = XQA_TILE_TOKENS) -> Plan:
    block_w = 16
    while block_w < width and block_w < SLOW_TILE:
        block_w *= 2
    pow2 = triton.next_power_of_2 if triton else (lambda n: 1 << max(0, int(n) - 1).bit_length())
    rows = max(rows, 0)
    row_stride = 2 * width if kv_split else width
    # Fast pass: ~PROGRAM_ENTRIES entries and at most MAX_ROWS rows per program, spread evenly.
    per_program = max(1, min(MAX_ROWS, (entries or PROGRAM_ENTRIES) // max(row_stride, 1)))
    grid = max(1, -(-rows // per_program))
    block_r = max(1, -(-rows // grid))
    sub_r = max(1, min(SLOW_TILE // block_w, pow2(block_r)))
    span = block_r * row_stride
    return Plan(rows=rows, width=width, row_stride=row_stride,
                view1_off=width if kv_split else 0, views=views, page_size=page_size,
                capacity=width * page_size, max_len=max_len, region=region,
                window_left=-1 if window_left is None else int(window_left), q_len=int(q_len),
                len_unsigned=len_unsigned, sparse_batch=sparse_batch, guard_value=guard_value, tile=tile,
                block_r=block_r, block_w=block_w, grid=grid, sub_r=sub_r, lblock=pow2(block_r),
                fblock=min(FBLOCK_MAX, max(128, pow2(span))),
                align=4 if span % 4 == 0 and (rows * row_stride) % 4 == 0 else 1,
                num_warps=num_warps or NUM_WARPS)


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


# Tuning knobs for benchmarks (docs/gpu.md): entries per program, warps per program.
PROGRAM_ENTRIES = _env_int("TSAN_PAGED_PROGRAM_ENTRIES", 1024, range(16, 1 << 20), "an integer from 16 to 2**20 - 1")
MAX_ROWS = 128
FBLOCK_MAX = 1024   # fast pass: entries per load step
SLOW_TILE = 128     # slow path: entries per [sub_r, block_w] tile (one per thread at 4 warps)
NUM_WARPS = _env_int("TSAN_PAGED_NUM_WARPS", 4, (1, 2, 4, 8, 16), "1, 2, 4, 8 or 16")
# Signal programmatic dependent launch (sm90+) at the end of the check: xqa is launched with PDL.
PDL = os.environ.get("TSAN_PAGED_PDL", "1") != "0"


_PLANS: dict = {}
_ERRS: dict = {}  # id(config) -> (config, err_mask)


def plan_for(rows: int, width: int, views: tuple, page_size: int, max_len, region: int, window_left, q_len: int,
             len_unsigned: bool, kv_split: bool = False, sparse_batch=None, guard_value: int = -1,
             tile: int = XQA_TILE_TOKENS) -> Plan:
    """:func:`make_plan`, cached on its arguments (a decode loop builds one plan per table form)."""
    key = (rows, width, views, page_size, max_len, region, window_left, q_len, len_unsigned, kv_split,
           sparse_batch, guard_value, tile)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 4096:
            _PLANS.clear()
        plan = make_plan(rows, width, [View(*v) for v in views], page_size, max_len, region, window_left, q_len,
                         len_unsigned, kv_split=kv_split, sparse_batch=sparse_batch, guard_value=guard_value,
                         tile=tile)
        plan.key = key
        _PLANS[key] = plan
    return plan


def enabled(table: torch.Tensor, lengths: torch.Tensor) -> bool:
    """Whether this call's tables take the device path (CUDA, int32, packed; config allows it)."""
    if triton is None or not table.is_cuda or table.dtype != torch.int32:
        return False
    if not (table.is_contiguous() and lengths.is_contiguous()):
        return False
    san = _modules()[0].current()
    return san is None or getattr(san.config, "device_path", "auto") != "torch"


def interpretable(table: torch.Tensor, lengths: torch.Tensor) -> bool:
    """Whether the kernel can check these CPU tensors under Triton's interpreter."""
    return (triton is not None and table.device.type == "cpu" and table.dtype == torch.int32
            and table.is_contiguous() and lengths.is_contiguous())


def err_mask(severity) -> int:
    """Bit per kernel check whose configured severity is "error" (what trap/guard act on)."""
    return sum(1 << c for c in range(NCHECKS) if severity(CHECK_IDS[c]) == "error")


def _tail(plan: Plan, sticky: int, action: int, errs: int, align: int, trap_enabled: bool, pdl: bool) -> tuple:
    """The kernel's arguments after the three pointers (cached per plan: they only depend on it)."""
    key = (sticky, action, errs, align, trap_enabled, pdl)
    tail = plan.tails.get(key)
    if tail is None:
        views = plan.views
        max_len = min(plan.max_len, INT32_MAX) if plan.max_len is not None else -1
        p0, p1 = views[0].num_pages, views[-1].num_pages
        tail = plan.tails[key] = (
            plan.rows, plan.width, plan.row_stride, plan.view1_off, len(views), p0, p1, min(p0, p1),
            plan.page_size, plan.capacity, max_len, plan.region, plan.window_left, plan.q_len,
            int(plan.len_unsigned), sticky, action, errs, plan.guard_value, plan.block_r,
            plan.sub_r, plan.block_w, plan.lblock, plan.fblock, align, plan.tile, trap_enabled, pdl)
    return tail


def _args(plan: Plan, table, lengths, slot, sticky: int, action: int, errs: int, trap_enabled: bool,
          align: int = 1, pdl: bool = False) -> tuple:
    return (table, lengths, slot) + _tail(plan, sticky, action, errs, align, trap_enabled, pdl)


def _pdl(device) -> bool:
    return PDL and capability(device)[0] >= 9


def run_check(plan: Plan, table: torch.Tensor, lengths: torch.Tensor, slot: torch.Tensor, *, sticky: int = 0,
              action: str = "none", errs: int = 0, interpret: Optional[bool] = None,
              trap_enabled: Optional[bool] = None, pdl: Optional[bool] = None) -> None:
    """Launch the check kernel once (the slow, general launcher: tests and first calls)."""
    if interpret is None:
        interpret = table.device.type != "cuda"
    if lengths.dtype != torch.int32:  # uint32 lengths: same bits, read as unsigned
        lengths = lengths.view(torch.int32)
    kernel = _kernel(interpret)
    if trap_enabled is None:  # the trap code (device_print + trap) is compiled in only where it can run
        trap_enabled = not interpret and action == "trap"
    if interpret:
        pdl = False
    elif pdl is None:
        pdl = _pdl(table.device)
    align = plan.align if table.data_ptr() % 16 == 0 else 1
    args = _args(plan, table, lengths, slot, sticky, ACTION_CODES[action], errs, trap_enabled, align, pdl)
    if interpret:
        return kernel[(plan.grid,)](*args)
    return kernel[(plan.grid,)](*args, num_warps=plan.num_warps)


def decode(plan: Plan, words, *, previous_hits=None) -> list:
    """Violations from a slot's record words (``slot[CALLS:]`` as Python ints), torch-rule order."""
    from .report import Violation

    out = []
    for c in REPORT_ORDER:
        if c in (PAGE1, DEAD1) and len(plan.views) < 2:
            continue
        base = RECORD - CALLS + 4 * c
        hits, count, enc, bound = words[base:base + 4]
        if hits <= (previous_hits[c] if previous_hits else 0) or count <= 0:
            continue
        packed = BIG - enc
        where, low = packed >> 32, packed & 0xFFFFFFFF
        if c >= NEGATIVE:
            value = low if plan.len_unsigned else (low - (1 << 32) if low >= 1 << 31 else low)
            index = plan.length_index(where)
            arg = "seq_lens"
            if c == NEGATIVE:
                message = f"{arg}[{where}] = {value} is negative"
            elif c == OVER_MAX:
                message = f"{arg}[{where}] = {value} exceeds max_seq_len = {plan.max_len}"
            else:
                message = (f"{arg}[{where}] = {value} needs {-(-value // plan.page_size)} pages of "
                           f"{plan.page_size}, block_tables rows hold {plan.width} ({plan.capacity} tokens)")
        else:
            value = low - (1 << 32) if low >= 1 << 31 else low
            view = 0 if c in (PAGE0, DEAD0) else 1
            r, col = divmod(where, plan.width)
            index = plan.index_of(r, col, view)
            arg = "block_tables"
            buffer, pages = plan.views[view].buffer, plan.views[view].num_pages
            state = "read by the kernel" if c in (PAGE0, PAGE1) else "outside the read region (stale, not read)"
            message = (f"{arg}[{', '.join(map(str, index))}] = {value}, {buffer} has {pages} pages "
                       f"(valid 0..{pages - 1}); entry is {state}")
        out.append(Violation(CHECK_IDS[c], arg, message, index=index, value=value, bound=bound, count=count,
                             examples=((index, value),)))
    return out


# ------------------------------------------------------------------------------------------
# The ring, fast launches, deferred records
# ------------------------------------------------------------------------------------------

@dataclass
class Entry:
    """A ring slot owned by one call site (+ table form): sticky records, read later."""

    slot: int
    plan: Plan
    op: str
    caller: str
    stack: tuple
    sanitizer: object  # weakref to the PagedSanitizer that checked the call
    captured: bool
    hits: list = field(default_factory=lambda: [0] * NCHECKS)
    calls: int = 0
    code: object = None  # the call site's code object: keeps the id in the entry's key its own


class Ring:
    """Preallocated device slots for one CUDA device (made once, outside any capture)."""

    def __init__(self, device: torch.device, slots: int = 4096):
        self.device = device
        self.slots = slots
        self.words = torch.zeros(slots, SLOT_WORDS, dtype=torch.int64, device=device)
        self.host = torch.zeros(slots, SLOT_WORDS, dtype=torch.int64).pin_memory()
        self.sync_slot = 0  # slot 0: the sync path (one call at a time)
        self.next_slot = 1
        self.entries: dict = {}  # (site, plan key) -> Entry
        self.event: Optional[torch.cuda.Event] = None
        self.snap_slots = 0
        self.last_snapshot = 0.0
        self.launchers: dict = {}  # constexprs + pointer alignment -> compiled kernel
        self.base = self.words.data_ptr()
        self.index = device.index
        self.stream_of = torch._C._cuda_getCurrentRawStream
        self.pdl = _pdl(device)

    def slot_ptr(self, slot: int) -> int:
        return self.base + slot * SLOT_WORDS * 8


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


def prepare(device: torch.device) -> None:
    """Make the ring now (call before capturing graphs if no eager check ran yet)."""
    ring_for(device)


def launch(ring: Ring, plan: Plan, table: torch.Tensor, lengths: torch.Tensor, slot: int, sticky: int,
           action: int, errs: int) -> None:
    """Launch through a pre-bound compiled handle (no Triton Python launcher on the hot path)."""
    tptr = table.data_ptr()
    lptr = lengths.data_ptr()
    align = plan.align if tptr % 16 == 0 else 1
    # The trap code (device_print + trap) only in the trap action's kernel: the guard and none
    # kernels are smaller and print nothing.
    trap_enabled = action == ACTION_TRAP
    key = (plan.block_w, plan.sub_r, plan.lblock, plan.fblock, plan.num_warps, align, tptr % 16 == 0, lptr % 16 == 0,
           ring.pdl, trap_enabled)
    compiled = ring.launchers.get(key)
    tail = _tail(plan, sticky, action, errs, align, trap_enabled, ring.pdl)
    if compiled is not None:
        compiled.run(plan.grid, 1, 1, ring.stream_of(ring.index), compiled.function, compiled.packed_metadata,
                     None, None, None, tptr, lptr, ring.base + slot * SLOT_WORDS * 8, *tail)
        return
    if lengths.dtype != torch.int32:
        lengths = lengths.view(torch.int32)
    compiled = _kernel(False)[(plan.grid,)](table, lengths, ring.words[slot], *tail, num_warps=plan.num_warps)
    if getattr(compiled, "packed_metadata", None) is not None and hasattr(compiled, "function"):
        ring.launchers[key] = compiled


_mods: list = []  # (sanitizer module, interposer), imported on the first check


def _modules() -> list:
    """``[sanitizer module, interposer]`` (imported late: they import this module)."""
    if not _mods:
        from . import sanitizer as sanitizer_mod
        from .interpose import interposer

        _mods[:] = [sanitizer_mod, interposer]
    return _mods


def check(call_target: str, plan: Plan, table: torch.Tensor, lengths: torch.Tensor):
    """Check one call on the device. Returns the findings (sync path) or ``[]`` (deferred)."""
    if not table.is_cuda:  # Triton's interpreter (tests): one call, read at once
        slot = torch.zeros(SLOT_WORDS, dtype=torch.int64)
        run_check(plan, table, lengths, slot, interpret=True)
        return decode(plan, slot[CALLS:].tolist())
    sanitizer_mod, interposer = _modules()
    san = sanitizer_mod.current()
    config = san.config if san is not None else None
    path = getattr(config, "device_path", "auto") if config is not None else "auto"
    mode = san.mode if san is not None else "raise"
    capturing = torch.cuda.is_current_stream_capturing()
    errs = _ERRS.get(id(config))
    if errs is None or errs[0] is not config:
        errs = _ERRS[id(config)] = (config, err_mask(config.severity if config is not None else _default_severity))
    errs = errs[1]
    deferred = capturing or path == "deferred" or (path == "auto" and mode == "log")
    ring = _rings.get(table.get_device())
    if ring is None:
        ring = ring_for(table.device)
        if ring is None:
            _warn_once("capture-first", "tsan_paged: the first device check of this GPU happened during CUDA graph "
                       "capture; the ring could not be made there, so this captured call is NOT checked. Make one "
                       "eager call (or tsan_paged.device.prepare(device)) before capturing.")
            return []
    if not deferred:
        slot = ring.sync_slot
        launch(ring, plan, table, lengths, slot, 0, 0, errs)
        words = ring.words[slot, CALLS:].tolist()  # the one sync of the sync path
        return decode(plan, words)
    action_name = getattr(config, "device_action", "auto") if config is not None else "none"
    if action_name == "auto":
        action_name = "trap" if mode == "abort" else "guard"
    action = ACTION_CODES[action_name]
    patched = interposer.patched.get(call_target)
    frame = caller_frame(patched.library_dirs if patched is not None else ())
    # The sanitizer's serial, not id(): a later sanitizer at a freed one's address must not
    # inherit its record slot (whose weak reference is dead, so its findings would go nowhere).
    # The code object and the plan by id (hashing them costs microseconds per call); the entry
    # holds both, so neither id can be reused while the key exists.
    code = frame.f_code if frame is not None else None
    key = (id(code), frame.f_lineno if frame is not None else 0, id(plan), call_target,
           san.serial if san is not None else 0)
    entry = ring.entries.get(key)
    if entry is None:
        entry = _new_entry(ring, key, plan, call_target, describe(frame), san, capturing, code)
    del frame
    launch(ring, plan, table, lengths, entry.slot, 1, action, errs)
    if capturing:
        _patch_replay()
    elif ring.event is not None or time.monotonic() - ring.last_snapshot >= (
            getattr(config, "device_poll_s", 0.1) if config is not None else 0.1):
        poll(ring)
    return []


def _default_severity(check_id: str) -> str:
    from .report import CHECKS

    return CHECKS[check_id]


def _new_entry(ring: Ring, key, plan, op, site, san, captured, code=None) -> Entry:
    with _lock:
        entry = ring.entries.get(key)
        if entry is not None:
            return entry
        if ring.next_slot >= ring.slots:
            slot = ring.slots - 1
            _warn_once("ring-full", f"tsan_paged: all {ring.slots} device record slots are taken; later call sites "
                       "share the last slot (their reports may name another call site)")
        else:
            slot = ring.next_slot
            ring.next_slot += 1
        caller, stack = site
        entry = Entry(slot=slot, plan=plan, op=op, caller=caller, stack=stack,
                      sanitizer=weakref.ref(san) if san is not None else (lambda: None), captured=captured,
                      code=code)
        ring.entries[key] = entry
        return entry


# -- reading records ---------------------------------------------------------------------

def poll(ring: Ring, *, force_snapshot: bool = False) -> None:
    """Report what a finished snapshot holds; queue a new one when due. Never blocks."""
    if ring.event is not None:
        if not ring.event.query():
            return
        _report(ring, ring.host[:ring.snap_slots])
        ring.event = None
    now = time.monotonic()
    period = _poll_period()
    if not ring.entries or (not force_snapshot and now - ring.last_snapshot < period):
        return
    if torch.cuda.is_current_stream_capturing():
        return
    n = ring.next_slot
    ring.host[:n].copy_(ring.words[:n], non_blocking=True)
    ring.event = torch.cuda.Event()
    ring.event.record()
    ring.snap_slots = n
    ring.last_snapshot = now


def _poll_period() -> float:
    from . import sanitizer as sanitizer_mod

    san = sanitizer_mod.current()
    return getattr(san.config, "device_poll_s", 0.1) if san is not None else 0.1


def flush(sanitizer=None) -> None:
    """Read every device record now (this syncs), and report what is new."""
    for ring in list(_rings.values()):
        if not ring.entries:
            continue
        previous = torch.cuda.get_sync_debug_mode()
        try:
            torch.cuda.set_sync_debug_mode(0)  # a deliberate sync: don't trip the user's debug mode
            with torch.cuda.device(ring.device):
                torch.cuda.current_stream().synchronize()
                if ring.event is not None:
                    ring.event.synchronize()
                    _report(ring, ring.host[:ring.snap_slots])
                    ring.event = None
                n = ring.next_slot
                words = ring.words[:n].cpu()
        except Exception as exc:  # a trapped or faulted context: nothing can be read any more
            _warn_once("flush-failed", f"tsan_paged: could not read device check records ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}); the CUDA context is probably dead "
                       "(a trap, or a fault the checks did not stop)")
            continue
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        _report(ring, words, only=sanitizer)


def _report(ring: Ring, words: torch.Tensor, only=None) -> None:
    n = words.shape[0]
    by_sanitizer: dict = {}
    for entry in list(ring.entries.values()):
        if entry.slot >= n:
            continue
        san = entry.sanitizer()
        if only is not None and san is not only:
            continue
        rec = words[entry.slot, CALLS:].tolist()
        entry.calls = rec[0]
        found = decode(entry.plan, rec, previous_hits=entry.hits)
        for c in range(NCHECKS):
            entry.hits[c] = max(entry.hits[c], rec[RECORD - CALLS + 4 * c])
        if not found:
            continue
        where = "capture" if entry.captured else "call"
        found = [v.replace(op=entry.op, caller=entry.caller, stack=entry.stack,
                           message=v.message + f" [device record, {where} site; reported deferred]")
                 for v in found]
        by_sanitizer.setdefault(id(san), (san, []))[1].extend(found)
    for san, found in by_sanitizer.values():
        if san is not None:
            san.report_found(found, defer=True)
        else:
            from .report import reporter

            for v in found:
                reporter.report(v)


def _atexit_flush() -> None:
    try:
        flush()
    except Exception:
        pass


def on_leave(sanitizer) -> None:
    """The sanitizer is leaving: read its records (sync), drop its slots' entries, unpatch replay."""
    if not _rings:
        return
    flush(sanitizer)
    from . import sanitizer as sanitizer_mod

    if sanitizer_mod.current() is None:
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
