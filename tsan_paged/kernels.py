"""The Triton check kernels, and the layout of the records they write.

Two kernels check every access form of :mod:`tsan_paged.access` on a CUDA device, with no
host sync (:mod:`tsan_paged.device` launches them and reads the records):

- :func:`_dense_kernel_src`: a dense page table ``[rows, W]`` (K and V views, block-sparse
  rows), each row's read region computed from its length (sliding window, tile, q_len) or
  given as ``first`` / ``end`` tensors, plus the per-row length checks.
- :func:`_flat_kernel_src`: a flat array of entries: a CSR page list (entries segmented by
  ``indptr``, per-row ``indptr`` and ``last_page_len`` checks), a slot mapping (negative
  entries are padding), and the tokens written through a CSR list (``append_paged_kv_cache``).

Both run a cheap fast pass first (load, compare, OR-reduce; no atomics) and the exact checks
only in a program that saw something. Each program merges its findings into its record slot's
scratch; the last program to finish writes the record: per check, how many launches hit it,
how many entries offend, the first offending (position, value) packed in one int64, the bound
and one auxiliary word the host needs for the report (the first CSR entry's row and column,
a token's row). Values wider than 32 bits are saturated to the int32 range in the record.
The same source runs on CPU tensors under Triton's interpreter (the tests).

Bounds (page counts, lengths, max_len, window) are runtime scalar arguments, which Triton types
by value: int32, uint32 in ``[2**31, 2**32)``, int64 beyond. An int32 entry compared with an
int64 bound is widened to int64; with a uint32 bound both are compared as uint32, so a negative
entry reads as ``>= bound``, which only ever adds it to "out of range" (where it is anyway).
Where the sign matters (negative slots skipped, lengths, written positions) values are widened
to int64 before any comparison. Python ints in the source (literals, constexprs) out of an
operand's range fail to compile, never wrap. (The torch path's comparisons:
``checks.at_least``.)
"""

from __future__ import annotations

try:  # Triton ships with torch on Linux; without it the device path is off (torch checks)
    import triton
    import triton.language as tl
except Exception as _exc:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    TRITON_ERROR = f"{type(_exc).__name__}: {_exc}"
else:
    TRITON_ERROR = ""

# The checks a record holds (one record per check), in no particular order.
PAGE0, PAGE1, DEAD0, DEAD1, NEGATIVE, OVER_MAX, OVER_TABLE, SHAPE, SHAPE_END, TOKEN_BATCH, TOKEN_NEG, TOKEN_OVER = \
    range(12)
NCHECKS = 12
CHECK_IDS = ("page-out-of-range", "page-out-of-range", "dead-page-out-of-range", "dead-page-out-of-range",
             "negative-seq-len", "seq-len-exceeds-max", "seq-len-exceeds-table", "shape-mismatch",
             "shape-mismatch", "shape-mismatch", "negative-seq-len", "seq-len-exceeds-table")

# Record slot layout (int64 words).
TICKET = 0        # programs done in this launch (scratch, reset by the last program)
FOUND_MASK = 1    # bit per check found in this launch (scratch)
TRAP_CLAIM = 2    # the first program to trap prints
CALLS = 3         # launches of this slot
HIT_CALLS = 4     # launches with any finding
SCRATCH = 8       # per check: count, encoded first (2 words; reset by the last program)
RECORD = 32       # per check: hits, count, encoded first, bound, aux (5 words), kept across launches
REC = 5
SLOT_WORDS = 96
BIG = 0x7FFFFFFFFFFFFFFF
INT32_MIN, INT32_MAX = -2**31, 2**31 - 1

ACTION_CODES = {"none": 0, "trap": 1, "guard": 2}
ACTION_TRAP, ACTION_GUARD = ACTION_CODES["trap"], ACTION_CODES["guard"]
REGION_LENGTHS, REGION_ROW, REGION_BOUNDS = 0, 2, 3


def unpack(enc: int) -> tuple:
    """``(position, value)`` of a record's encoded first finding (value: signed 32 bits)."""
    packed = BIG - enc
    low = packed & 0xFFFFFFFF
    return packed >> 32, low - (1 << 32) if low >= 1 << 31 else low


if triton is not None:
    _K_BIG = tl.constexpr(BIG)
    _K_TICKET = tl.constexpr(TICKET)
    _K_FOUND_MASK = tl.constexpr(FOUND_MASK)
    _K_TRAP_CLAIM = tl.constexpr(TRAP_CLAIM)
    _K_CALLS = tl.constexpr(CALLS)
    _K_HIT_CALLS = tl.constexpr(HIT_CALLS)
    _K_SCRATCH = tl.constexpr(SCRATCH)
    _K_RECORD = tl.constexpr(RECORD)
    _K_REC = tl.constexpr(REC)
    _K_PAGE0 = tl.constexpr(PAGE0)
    _K_PAGE1 = tl.constexpr(PAGE1)
    _K_DEAD0 = tl.constexpr(DEAD0)
    _K_DEAD1 = tl.constexpr(DEAD1)
    _K_NEGATIVE = tl.constexpr(NEGATIVE)
    _K_OVER_MAX = tl.constexpr(OVER_MAX)
    _K_OVER_TABLE = tl.constexpr(OVER_TABLE)
    _K_SHAPE_END = tl.constexpr(SHAPE_END)
    _K_SHAPE = tl.constexpr(SHAPE)
    _K_TOKEN_BATCH = tl.constexpr(TOKEN_BATCH)
    _K_TOKEN_NEG = tl.constexpr(TOKEN_NEG)
    _K_TOKEN_OVER = tl.constexpr(TOKEN_OVER)
    _K_NCHECKS = tl.constexpr(NCHECKS)

    @triton.jit
    def _sat32(v):
        """An int64 value saturated to the int32 range (what a record keeps of a value)."""
        return tl.minimum(tl.maximum(v, -2147483648), 2147483647)

    @triton.jit
    def _tally(count, first, bad, packed):
        """``(count, first)`` of one check, updated with a tile: how many entries are ``bad``, and
        the first of them, encoded as BIG - packed so that a max keeps the lowest position."""
        count += tl.reduce(bad.to(tl.int64), None, tl.standard._sum_combine)
        lowest = tl.reduce(tl.where(bad, _K_BIG - packed, 0), None, tl.standard._elementwise_max)
        first = tl.maximum(first, lowest)
        return count, first

    @triton.jit
    def _merge_finding(slot_ptr, c: tl.constexpr, count, first):
        """One check's findings of this program into the launch's scratch: count, first (encoded)."""
        if count > 0:
            tl.atomic_add(slot_ptr + _K_SCRATCH + 2 * c, count)
            tl.atomic_max(slot_ptr + _K_SCRATCH + 2 * c + 1, first)

    @triton.jit
    def _last_program(slot_ptr, mask_bits, nprog):
        """The ticket: True in the last program of the launch to get here (the only one of a
        single-program grid). Its low 32 bits count programs, the high bits those that found
        something."""
        ticket = mask_bits * 0
        if nprog > 1:
            ticket = tl.atomic_add(slot_ptr + _K_TICKET, 1 + ((mask_bits != 0).to(tl.int64) << 32))
        return (ticket & 0xFFFFFFFF) == nprog - 1, ((ticket >> 32) != 0) | (mask_bits != 0)

    @triton.jit
    def _count_launch(slot_ptr, any_found):
        """In the last program: count the launch (and a launch with findings); the checks found,
        taken out of the scratch (0 for a clean launch)."""
        tl.atomic_add(slot_ptr + _K_CALLS, 1, sem="relaxed")
        found = any_found.to(tl.int64) * 0
        if any_found:
            found = tl.atomic_xchg(slot_ptr + _K_FOUND_MASK, 0)
            tl.atomic_add(slot_ptr + _K_HIT_CALLS, 1, sem="relaxed")
        return found

    @triton.jit
    def _take(slot_ptr, c: tl.constexpr):
        """The launch's count and encoded first of check ``c``, taken out of the scratch."""
        count = tl.atomic_xchg(slot_ptr + _K_SCRATCH + 2 * c, 0)
        enc = tl.atomic_xchg(slot_ptr + _K_SCRATCH + 2 * c + 1, 0)
        return count, enc

    @triton.jit
    def _store_record(slot_ptr, c: tl.constexpr, count, enc, bound, aux, STICKY):
        """Write check ``c``'s record. Sticky records (deferred path) keep the first finding and
        count later hits; the sync path overwrites. The hit counter is written last: a flag seen
        set has its fields written."""
        rec = slot_ptr + _K_RECORD + _K_REC * c
        hits = tl.load(rec)
        if (STICKY == 0) | (hits == 0):
            tl.store(rec + 1, count)
            tl.store(rec + 2, enc)
            tl.store(rec + 3, bound.to(tl.int64))
            tl.store(rec + 4, aux.to(tl.int64))
        tl.atomic_xchg(rec, hits + 1)

    @triton.jit
    def _clear_record(slot_ptr, c: tl.constexpr):
        tl.store(slot_ptr + _K_RECORD + _K_REC * c + 1, 0)
        tl.store(slot_ptr + _K_RECORD + _K_REC * c, 0)

    @triton.jit
    def _pdl_signal(pid, PDL: tl.constexpr):
        """Programmatic dependent launch (xqa is launched with it): this program wrote all that the
        attention kernel reads (guard stores included); it may start launching (it still waits for
        our grid with griddepcontrol.wait before reading anything, in mha.cu)."""
        if PDL:
            tl.debug_barrier()
            tl.inline_asm_elementwise("fence.acq_rel.gpu;", "=r,r", [pid], dtype=tl.int32, is_pure=False, pack=1)
            tl.inline_asm_elementwise("griddepcontrol.launch_dependents;", "=r,r", [pid], dtype=tl.int32,
                                      is_pure=False, pack=1)

    @triton.jit
    def _trap(slot_ptr, pid, which, position, value, bound):
        """Print one finding (one thread of one program) and stop the device before the attention
        kernel reads anything. The CUDA context is dead afterwards."""
        zero = pid.to(tl.int64) * 0
        claim = tl.atomic_cas(slot_ptr + _K_TRAP_CLAIM, zero, zero + 1)
        tid = tl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r,r", [pid], dtype=tl.int32, is_pure=True, pack=1)
        if (claim == 0) & (tid == 0):  # one thread prints, then stops the device (the others finish)
            tl.device_print("tsan_paged trap: check position value bound", which, position, value, bound)
            tl.inline_asm_elementwise("trap;", "=r,r", [pid], dtype=tl.int32, is_pure=False, pack=1)

    def _dense_kernel_src(table_ptr, lengths_ptr, first_ptr, end_ptr, slot_ptr,
                          R, W, ROW_STRIDE, VIEW1_OFF, NVIEWS, P0, P1, PMIN, PAGE_SIZE, CAP, MAXLEN, REGION,
                          WINDOW_LEFT, QLEN, LEN_OFFSET, LEN_UNSIGNED, STICKY, ACTION, ERR_MASK, GUARD, BLOCK_R,
                          SUB_R: tl.constexpr, BLOCK_W: tl.constexpr, LBLOCK: tl.constexpr, FBLOCK: tl.constexpr,
                          ALIGN: tl.constexpr, TILE: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                          HAS_FIRST: tl.constexpr, HAS_END: tl.constexpr, TRAP_ENABLED: tl.constexpr,
                          PDL: tl.constexpr):
        """One program checks BLOCK_R whole rows: a fast pass, then (only if it saw anything) the full checks.

        Fast pass: the program's lengths and its rows' table entries (one flat contiguous range) are
        loaded once and OR-reduced to one "anything out of range" flag (entries against the smaller
        page count; whether an entry is live does not matter: any bad entry is a finding of some
        check). A clean program does no atomics (one ticket add when the grid has several programs)
        and writes nothing but the launch counter. A program that saw something re-reads its rows
        in [SUB_R, BLOCK_W] tiles and computes every check exactly (region, counts, first offending
        entry, guard, trap), merging into the slot's scratch; the last program writes the record.
        Positions: row * W + col for entries, the row for lengths.
        """
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        zero = pid.to(tl.int64) * 0
        r0 = pid * BLOCK_R
        # -- fast pass: lengths ----------------------------------------------------------
        flag = zero.to(tl.int32)
        if HAS_LENGTHS:
            lidx = tl.arange(0, LBLOCK)
            lrows = r0 + lidx
            lmask = (lidx < BLOCK_R) & (lrows < R)
            l64 = tl.load(lengths_ptr + lrows, mask=lmask, other=0).to(tl.int64)
            if LEN_UNSIGNED != 0:
                l64 = l64 & 0xFFFFFFFF
            l64 = l64 + LEN_OFFSET
            lflag = lmask & ((l64 < 0) | (l64 > CAP) | ((MAXLEN >= 0) & (l64 > MAXLEN)))
            flag = tl.reduce(lflag.to(tl.int32), None, tl.standard._elementwise_max)
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
        flag = flag | tl.reduce(acc, None, tl.standard._elementwise_max)

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
                rows64 = rows.to(tl.int64)
                end = rows64 * 0 + W
                first = rows64 * 0
                lens = rows64 * 0
                if HAS_LENGTHS:
                    raw = tl.load(lengths_ptr + rows, mask=rmask, other=0).to(tl.int64)
                    if LEN_UNSIGNED != 0:
                        raw = raw & 0xFFFFFFFF
                    lens = raw + LEN_OFFSET
                    neg = rmask & (lens < 0)
                    omax = rmask & (MAXLEN >= 0) & (lens > MAXLEN)
                    otab = rmask & (lens > CAP)
                    if LEN_UNSIGNED != 0:
                        packed_len = (rows64 << 32) | (lens & 0xFFFFFFFF)
                    else:
                        packed_len = (rows64 << 32) | (_sat32(lens) & 0xFFFFFFFF)
                    c_neg, e_neg = _tally(c_neg, e_neg, neg, packed_len)
                    c_max, e_max = _tally(c_max, e_max, omax, packed_len)
                    c_tab, e_tab = _tally(c_tab, e_tab, otab, packed_len)
                    if REGION == 0:
                        end = tl.minimum((tl.maximum(lens, 0) + PAGE_SIZE - 1) // PAGE_SIZE, W)
                        if WINDOW_LEFT >= 0:
                            skipped = tl.maximum(lens - QLEN - WINDOW_LEFT, 0)
                            first = (skipped // TILE * TILE) // PAGE_SIZE
                if REGION == 3:
                    if HAS_FIRST:
                        first = tl.load(first_ptr + rows, mask=rmask, other=0).to(tl.int64)
                    if HAS_END:
                        end = tl.load(end_ptr + rows, mask=rmask, other=0).to(tl.int64)

                for c0 in range(0, W, BLOCK_W):
                    cols = c0 + tl.arange(0, BLOCK_W)
                    m = rmask[:, None] & (cols[None, :] < W)
                    live = (cols[None, :] >= first[:, None]) & (cols[None, :] < end[:, None])
                    lin = rows64[:, None] * W + cols[None, :]
                    ptrs = table_ptr + rows64[:, None] * ROW_STRIDE + cols[None, :]
                    vals = tl.load(ptrs, mask=m, other=0)
                    v64 = vals.to(tl.int64)
                    packed = (lin << 32) | (_sat32(v64) & 0xFFFFFFFF)
                    bad = m & ((v64 < 0) | (v64 >= P0))
                    lb = bad & live
                    db = bad & (~live)
                    c_p0, e_p0 = _tally(c_p0, e_p0, lb, packed)
                    c_d0, e_d0 = _tally(c_d0, e_d0, db, packed)
                    gmask = (lb & g_p0) | (db & g_d0)
                    if NVIEWS == 2:
                        ptrs1 = ptrs + VIEW1_OFF
                        vals1 = tl.load(ptrs1, mask=m, other=0)
                        v164 = vals1.to(tl.int64)
                        packed1 = (lin << 32) | (_sat32(v164) & 0xFFFFFFFF)
                        bad1 = m & ((v164 < 0) | (v164 >= P1))
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

                if HAS_LENGTHS:
                    if ACTION == 2:  # clamp offending lengths (after the region was computed from them)
                        fixed = lens
                        if ((ERR_MASK >> _K_OVER_MAX) & 1) != 0:
                            fixed = tl.where(omax, tl.minimum(fixed, MAXLEN), fixed)
                        if ((ERR_MASK >> _K_OVER_TABLE) & 1) != 0:
                            fixed = tl.where(otab, tl.minimum(fixed, CAP), fixed)
                        if ((ERR_MASK >> _K_NEGATIVE) & 1) != 0:
                            fixed = tl.where(neg, 0, fixed)
                        fixed = tl.maximum(fixed - LEN_OFFSET, 0)
                        tl.store(lengths_ptr + rows, fixed.to(lengths_ptr.dtype.element_ty),
                                 mask=rmask & (fixed + LEN_OFFSET != lens))

            # this program's findings into the slot's scratch
            mask_bits = ((c_p0 > 0).to(tl.int64) | ((c_p1 > 0).to(tl.int64) << 1)
                         | ((c_d0 > 0).to(tl.int64) << 2) | ((c_d1 > 0).to(tl.int64) << 3)
                         | ((c_neg > 0).to(tl.int64) << 4) | ((c_max > 0).to(tl.int64) << 5)
                         | ((c_tab > 0).to(tl.int64) << 6))
            if mask_bits != 0:
                if TRAP_ENABLED:
                    if (ACTION == 1) & ((mask_bits & ERR_MASK) != 0):
                        err = mask_bits & ERR_MASK
                        which = tl.where((err & 1) != 0, 0, tl.where((err & 2) != 0, 1, tl.where(
                            (err & 4) != 0, 2, tl.where((err & 8) != 0, 3, tl.where(
                                (err & 16) != 0, 4, tl.where((err & 32) != 0, 5, 6))))))
                        enc = tl.where(which == 0, e_p0, tl.where(which == 1, e_p1, tl.where(
                            which == 2, e_d0, tl.where(which == 3, e_d1, tl.where(
                                which == 4, e_neg, tl.where(which == 5, e_max, e_tab))))))
                        p = _K_BIG - enc
                        bound = tl.where((which == 0) | (which == 2), P0, tl.where(which < 4, P1, tl.where(
                            which == 4, 0, tl.where(which == 5, MAXLEN, CAP))))
                        _trap(slot_ptr, pid, which, p >> 32, (p & 0xFFFFFFFF).to(tl.int32), bound)
                tl.atomic_or(slot_ptr + _K_FOUND_MASK, mask_bits)
                _merge_finding(slot_ptr, _K_PAGE0, c_p0, e_p0)
                _merge_finding(slot_ptr, _K_PAGE1, c_p1, e_p1)
                _merge_finding(slot_ptr, _K_DEAD0, c_d0, e_d0)
                _merge_finding(slot_ptr, _K_DEAD1, c_d1, e_d1)
                _merge_finding(slot_ptr, _K_NEGATIVE, c_neg, e_neg)
                _merge_finding(slot_ptr, _K_OVER_MAX, c_max, e_max)
                _merge_finding(slot_ptr, _K_OVER_TABLE, c_tab, e_tab)

        _pdl_signal(pid, PDL)

        # -- record: the last program to finish ----------------------------------------------
        last, any_found = _last_program(slot_ptr, mask_bits, nprog)
        if last:
            found = _count_launch(slot_ptr, any_found)
            for c in tl.static_range(7):
                if ((found >> c) & 1) != 0:
                    cnt, enc = _take(slot_ptr, c)
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
                    _store_record(slot_ptr, c, cnt, enc, bnd, zero, STICKY)
                elif STICKY == 0:  # the sync path's record holds this launch's findings only
                    _clear_record(slot_ptr, c)
            if nprog > 1:
                tl.store(slot_ptr + _K_TICKET, zero)

    def _flat_kernel_src(entries_ptr, indptr_ptr, last_ptr, bidx_ptr, pos_ptr, slot_ptr,
                         N, B, T, P0, P1, PMIN, NVIEWS, PAGE_SIZE, NEG_OK, STICKY, ACTION, ERR_MASK, GUARD,
                         E_BLOCK, R_BLOCK, T_BLOCK, FBLOCK: tl.constexpr, RBLOCK: tl.constexpr,
                         TBLOCK: tl.constexpr, CHECK_ENTRIES: tl.constexpr, HAS_INDPTR: tl.constexpr,
                         HAS_LAST: tl.constexpr, HAS_TOKENS: tl.constexpr, TRAP_ENABLED: tl.constexpr,
                         PDL: tl.constexpr):
        """Program p checks entries [p * E_BLOCK, ...) of a flat array (clipped to
        [indptr[0], indptr[B]) for a CSR list), rows [p * R_BLOCK, ...) of indptr and
        last_page_len, and written tokens [p * T_BLOCK, ...). Positions: the entry's index for
        entries, the row for per-row checks, the token for written tokens; the last program
        finds the row and column of the first offending entry (aux)."""
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        zero = pid.to(tl.int64) * 0
        g_p0 = (ACTION == 2) & (((ERR_MASK >> _K_PAGE0) & 1) != 0)
        g_p1 = (ACTION == 2) & (((ERR_MASK >> _K_PAGE1) & 1) != 0)
        c_p0 = zero
        e_p0 = zero
        c_p1 = zero
        e_p1 = zero
        c_neg = zero
        e_neg = zero
        c_tab = zero
        e_tab = zero
        c_shp = zero
        e_shp = zero
        c_end = zero
        e_end = zero
        c_tb = zero
        e_tb = zero
        c_tn = zero
        e_tn = zero
        c_to = zero
        e_to = zero
        # -- entries ---------------------------------------------------------------------
        if CHECK_ENTRIES:
            start = zero + pid * E_BLOCK
            stop = tl.minimum(start + E_BLOCK, N)
            if HAS_INDPTR:
                start = tl.maximum(start, tl.maximum(tl.load(indptr_ptr).to(tl.int64), 0))
                stop = tl.minimum(stop, tl.load(indptr_ptr + B).to(tl.int64))
            acc = tl.zeros([FBLOCK], dtype=tl.int32)
            for off in range(start, stop, FBLOCK):
                idx = off + tl.arange(0, FBLOCK)
                v = tl.load(entries_ptr + idx, mask=idx < stop, other=0).to(tl.int64)
                acc = acc | ((((v < 0) & (NEG_OK == 0)) | (v >= PMIN)).to(tl.int32))
            if tl.reduce(acc, None, tl.standard._elementwise_max) != 0:
                for off in range(start, stop, FBLOCK):
                    idx = off + tl.arange(0, FBLOCK)
                    m = idx < stop
                    raw = tl.load(entries_ptr + idx, mask=m, other=0)
                    v = raw.to(tl.int64)
                    packed = (idx.to(tl.int64) << 32) | (_sat32(v) & 0xFFFFFFFF)
                    bad0 = m & (((v < 0) & (NEG_OK == 0)) | (v >= P0))
                    c_p0, e_p0 = _tally(c_p0, e_p0, bad0, packed)
                    gmask = bad0 & g_p0
                    if NVIEWS == 2:
                        bad1 = m & (((v < 0) & (NEG_OK == 0)) | (v >= P1))
                        c_p1, e_p1 = _tally(c_p1, e_p1, bad1, packed)
                        gmask = gmask | (bad1 & g_p1)
                    tl.store(entries_ptr + idx, tl.where(gmask, GUARD, raw), mask=gmask)
        # -- rows: indptr in order and within the entries, last_page_len within a page -------
        if HAS_INDPTR:
            r_lo = pid * R_BLOCK
            r_hi = tl.minimum(r_lo + R_BLOCK, B)
            for rs in range(r_lo, r_hi, RBLOCK):
                rows = rs + tl.arange(0, RBLOCK)
                rm = rows < r_hi
                rows64 = rows.to(tl.int64)
                a = tl.load(indptr_ptr + rows, mask=rm, other=0).to(tl.int64)
                b = tl.load(indptr_ptr + rows + 1, mask=rm, other=0).to(tl.int64)
                order = rm & ((b < a) | ((rows == 0) & (a < 0)))
                c_shp, e_shp = _tally(c_shp, e_shp, order, (rows64 << 32) | (_sat32(b) & 0xFFFFFFFF))
                past = rm & (rows == B - 1) & (b > N)
                c_end, e_end = _tally(c_end, e_end, past, (rows64 << 32) | (_sat32(b) & 0xFFFFFFFF))
                if HAS_LAST:
                    lraw = tl.load(last_ptr + rows, mask=rm, other=0)
                    l64 = lraw.to(tl.int64)
                    lpacked = (rows64 << 32) | (_sat32(l64) & 0xFFFFFFFF)
                    neg = rm & (l64 < 0)
                    over = rm & (l64 > PAGE_SIZE)
                    c_neg, e_neg = _tally(c_neg, e_neg, neg, lpacked)
                    c_tab, e_tab = _tally(c_tab, e_tab, over, lpacked)
                    if ACTION == 2:
                        fixed = l64
                        if ((ERR_MASK >> _K_NEGATIVE) & 1) != 0:
                            fixed = tl.where(neg, 0, fixed)
                        if ((ERR_MASK >> _K_OVER_TABLE) & 1) != 0:
                            fixed = tl.where(over, PAGE_SIZE, fixed)
                        tl.store(last_ptr + rows, fixed.to(lraw.dtype), mask=rm & (fixed != l64))
        # -- written tokens --------------------------------------------------------------
        if HAS_TOKENS:
            t_lo = pid * T_BLOCK
            t_hi = tl.minimum(t_lo + T_BLOCK, T)
            for ts in range(t_lo, t_hi, TBLOCK):
                tok = ts + tl.arange(0, TBLOCK)
                tm = tok < t_hi
                tok64 = tok.to(tl.int64)
                bi = tl.load(bidx_ptr + tok, mask=tm, other=0).to(tl.int64)
                pos = tl.load(pos_ptr + tok, mask=tm, other=0).to(tl.int64)
                badb = tm & ((bi < 0) | (bi >= B))
                c_tb, e_tb = _tally(c_tb, e_tb, badb, (tok64 << 32) | (_sat32(bi) & 0xFFFFFFFF))
                okb = tm & (~badb)
                bs = tl.where(okb, bi, 0)
                a = tl.load(indptr_ptr + bs, mask=okb, other=0).to(tl.int64)
                e = tl.load(indptr_ptr + bs + 1, mask=okb, other=0).to(tl.int64)
                lp = tl.load(last_ptr + bs, mask=okb, other=0).to(tl.int64)
                kv_len = tl.maximum((e - a - 1) * PAGE_SIZE + lp, 0)
                tpacked = (tok64 << 32) | (_sat32(pos) & 0xFFFFFFFF)
                tneg = okb & (pos < 0)
                tover = okb & (~tneg) & (pos >= kv_len)
                c_tn, e_tn = _tally(c_tn, e_tn, tneg, tpacked)
                c_to, e_to = _tally(c_to, e_to, tover, tpacked)
                ok = okb & (~tneg) & (~tover)
                entry = a + tl.maximum(pos, 0) // PAGE_SIZE
                page = tl.load(entries_ptr + entry, mask=ok & (entry < N), other=0).to(tl.int64)
                wpacked = (tok64 << 32) | (_sat32(page) & 0xFFFFFFFF)
                wbad0 = ok & ((page < 0) | (page >= P0))
                c_p0, e_p0 = _tally(c_p0, e_p0, wbad0, wpacked)
                if NVIEWS == 2:
                    wbad1 = ok & ((page < 0) | (page >= P1))
                    c_p1, e_p1 = _tally(c_p1, e_p1, wbad1, wpacked)

        mask_bits = ((c_p0 > 0).to(tl.int64) | ((c_p1 > 0).to(tl.int64) << _K_PAGE1)
                     | ((c_neg > 0).to(tl.int64) << _K_NEGATIVE) | ((c_tab > 0).to(tl.int64) << _K_OVER_TABLE)
                     | ((c_shp > 0).to(tl.int64) << _K_SHAPE) | ((c_end > 0).to(tl.int64) << _K_SHAPE_END)
                     | ((c_tb > 0).to(tl.int64) << _K_TOKEN_BATCH) | ((c_tn > 0).to(tl.int64) << _K_TOKEN_NEG)
                     | ((c_to > 0).to(tl.int64) << _K_TOKEN_OVER))
        if mask_bits != 0:
            if TRAP_ENABLED:
                if (ACTION == 1) & ((mask_bits & ERR_MASK) != 0):
                    err = mask_bits & ERR_MASK
                    enc = tl.where((err & 1) != 0, e_p0, tl.where((err & 2) != 0, e_p1, tl.where(
                        ((err >> _K_SHAPE) & 1) != 0, e_shp, tl.where(((err >> _K_SHAPE_END) & 1) != 0, e_end, tl.where(
                            ((err >> _K_TOKEN_BATCH) & 1) != 0, e_tb, tl.where(((err >> _K_TOKEN_NEG) & 1) != 0, e_tn,
                                tl.where(((err >> _K_TOKEN_OVER) & 1) != 0, e_to, tl.where(
                                    ((err >> _K_NEGATIVE) & 1) != 0, e_neg, e_tab))))))))
                    p = _K_BIG - enc
                    _trap(slot_ptr, pid, err, p >> 32, (p & 0xFFFFFFFF).to(tl.int32), P0)
            tl.atomic_or(slot_ptr + _K_FOUND_MASK, mask_bits)
            _merge_finding(slot_ptr, _K_PAGE0, c_p0, e_p0)
            _merge_finding(slot_ptr, _K_PAGE1, c_p1, e_p1)
            _merge_finding(slot_ptr, _K_NEGATIVE, c_neg, e_neg)
            _merge_finding(slot_ptr, _K_OVER_TABLE, c_tab, e_tab)
            _merge_finding(slot_ptr, _K_SHAPE, c_shp, e_shp)
            _merge_finding(slot_ptr, _K_SHAPE_END, c_end, e_end)
            _merge_finding(slot_ptr, _K_TOKEN_BATCH, c_tb, e_tb)
            _merge_finding(slot_ptr, _K_TOKEN_NEG, c_tn, e_tn)
            _merge_finding(slot_ptr, _K_TOKEN_OVER, c_to, e_to)

        _pdl_signal(pid, PDL)

        # -- record: the last program; it also finds what the host needs to name the first finding
        last, any_found = _last_program(slot_ptr, mask_bits, nprog)
        if last:
            found = _count_launch(slot_ptr, any_found)
            for c in tl.static_range(_K_NCHECKS):
                if ((found >> c) & 1) != 0:
                    cnt, enc = _take(slot_ptr, c)
                    where = (_K_BIG - enc) >> 32
                    aux = zero
                    if c == 0 or c == 1:
                        if c == 0:
                            bnd = zero + P0
                        else:
                            bnd = zero + P1
                        if HAS_TOKENS:  # (row, column) of the written token's page
                            wb = tl.load(bidx_ptr + where).to(tl.int64)
                            wp = tl.load(pos_ptr + where).to(tl.int64)
                            aux = (wb << 32) | (wp // PAGE_SIZE)
                        elif HAS_INDPTR:  # the entry's row: rows whose list ends at or before it
                            row = zero
                            for r0 in range(0, B, RBLOCK):
                                rr = r0 + tl.arange(0, RBLOCK)
                                ends = tl.load(indptr_ptr + rr + 1, mask=rr < B, other=0).to(tl.int64)
                                row += tl.reduce(((rr < B) & (ends <= where)).to(tl.int64), None,
                                                 tl.standard._sum_combine)
                            aux = (row << 32) | (where - tl.load(indptr_ptr + row).to(tl.int64))
                    elif c == 4:
                        bnd = zero
                    elif c == 6:
                        bnd = zero + PAGE_SIZE
                    elif c == 7:  # the row's start
                        bnd = tl.load(indptr_ptr + where).to(tl.int64)
                    elif c == 8:
                        bnd = zero + N
                    elif c == 9:
                        bnd = zero + B
                    elif c == 10 or c == 11:  # the token's request and its KV length
                        tb = tl.load(bidx_ptr + where).to(tl.int64)
                        ta = tl.load(indptr_ptr + tb).to(tl.int64)
                        te = tl.load(indptr_ptr + tb + 1).to(tl.int64)
                        tlp = tl.load(last_ptr + tb).to(tl.int64)
                        bnd = tl.maximum((te - ta - 1) * PAGE_SIZE + tlp, 0)
                        aux = tb
                    else:
                        bnd = zero
                    _store_record(slot_ptr, c, cnt, enc, bnd, aux, STICKY)
                elif STICKY == 0:
                    _clear_record(slot_ptr, c)
            if nprog > 1:
                tl.store(slot_ptr + _K_TICKET, zero)

    def _not_allocated_src(table_ptr, lengths_ptr, state_ptr, out_ptr, n, width, stride_r, stride_c, pages,
                           short_len, BLOCK: tl.constexpr):
        """track_pages' derived table (:mod:`tsan_paged.tracking`), one launch: ``out[r, c]`` is
        ``table[r, c] + 1`` where the pool's state of that page is not allocated (1), else 0; a
        page-0 entry of a row of at most ``short_len`` tokens (graph padding) counts as allocated."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        r = offs // width
        c = offs % width
        e = tl.load(table_ptr + r.to(tl.int64) * stride_r + c.to(tl.int64) * stride_c, mask=mask, other=0)
        e = e.to(tl.int64)
        length = tl.load(lengths_ptr + r, mask=mask, other=0).to(tl.int64)
        inside = (e >= 0) & (e < pages)
        got = tl.load(state_ptr + tl.where(inside, e, 0), mask=mask, other=1)
        padding = (e == 0) & (length <= short_len)
        bad = inside & (got != 1) & (padding == 0)
        tl.store(out_ptr + offs, tl.where(bad, e + 1, 0).to(tl.int32), mask=mask)

    def _not_allocated_list_src(indices_ptr, indptr_ptr, state_ptr, out_ptr, n, rows, per_page, pages, short_len,
                                BLOCK: tl.constexpr, SEARCH_STEPS: tl.constexpr):
        """track_pages' derived CSR list, one launch over the live entries
        ``[indptr[0], indptr[rows])`` only (what the check kernel reads; the rest of ``out`` is
        left unwritten): ``indices[i] + 1`` where the pool's state of page
        ``indices[i] // per_page`` is not allocated (1), else 0; a page-0 entry of a row of at most
        ``short_len`` entries (graph padding) counts as allocated. Each entry's row is found by a
        binary search of ``indptr`` (``SEARCH_STEPS >= log2(rows) + 1``)."""
        offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        start = tl.load(indptr_ptr).to(tl.int64)
        stop = tl.load(indptr_ptr + rows).to(tl.int64)
        live = (offs >= start) & (offs < stop) & (offs < n)
        e = tl.load(indices_ptr + offs, mask=live, other=0).to(tl.int64)
        page = e // per_page
        inside = (e >= 0) & (page < pages)
        got = tl.load(state_ptr + tl.where(inside, page, 0), mask=live, other=1)
        lo = tl.zeros([BLOCK], dtype=tl.int64)
        hi = tl.zeros([BLOCK], dtype=tl.int64) + rows
        for _ in tl.static_range(SEARCH_STEPS):  # the last row r with indptr[r] <= offs
            mid = (lo + hi) // 2
            go = (hi - lo > 1) & (tl.load(indptr_ptr + mid, mask=live, other=0).to(tl.int64) <= offs)
            stay = (hi - lo > 1) & (go == 0)
            lo = tl.where(go, mid, lo)
            hi = tl.where(stay, mid, hi)
        length = tl.load(indptr_ptr + lo + 1, mask=live, other=0).to(tl.int64) - \
            tl.load(indptr_ptr + lo, mask=live, other=0).to(tl.int64)
        padding = (page == 0) & (length <= short_len)
        bad = inside & (got != 1) & (padding == 0)
        tl.store(out_ptr + offs, tl.where(bad, e + 1, 0).to(tl.int32), mask=live)

    def _mark_src(ids_ptr, state_ptr, stack_ptr, n, per_page, pages, status, sid, BLOCK: tl.constexpr,
                  HAS_STACK: tl.constexpr):
        """track_pages' allocator shadow (:meth:`tsan_paged.tracking.PoolState.mark`), one launch:
        ``state[p] = status`` (and ``stack[p] = sid``) for each ``p = ids[i] // per_page``; an id
        out of the pool (negative, or past the end) lands in the extra last entry ``pages``."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        ids = tl.load(ids_ptr + offs, mask=mask, other=0).to(tl.int64)
        page = tl.where(ids < 0, pages, tl.minimum(ids // per_page, pages))
        tl.store(state_ptr + page, status.to(tl.uint8), mask=mask)
        if HAS_STACK:
            tl.store(stack_ptr + page, sid, mask=mask)

    _KERNELS: dict = {}
    _SOURCES = {"dense": (_dense_kernel_src, 5, 26), "flat": (_flat_kernel_src, 6, 22),
                "not_allocated": (_not_allocated_src, 4, 10), "mark": (_mark_src, 3, 8),
                "not_allocated_list": (_not_allocated_list_src, 4, 9)}

    def kernel(name: str, interpret: bool):
        """The JIT kernel ``name``, or the same source under Triton's interpreter (CPU tensors)."""
        key = (name, interpret)
        compiled = _KERNELS.get(key)
        if compiled is None:
            source, first_int, last_int = _SOURCES[name]
            if interpret:
                from triton.runtime.interpreter import InterpretedFunction

                compiled = InterpretedFunction(source)
            else:  # scalars are not specialized: one compile per launch shape, not per value
                compiled = triton.jit(source, do_not_specialize=list(range(first_int, last_int)))
            _KERNELS[key] = compiled
        return compiled


def available() -> bool:
    return triton is not None
