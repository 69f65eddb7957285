"""track_pages: SGLang 0.5.23's real allocators shadowed (tsan_paged/tracking.py).

Everything runs SGLang's own objects through ``sglang_driver``: pools, allocators (their
``alloc``/``alloc_extend``/``alloc_decode``/``free``), tables built by the trtllm_mha
backend, and its kernel calls. Bugs are planted only through SGLang's own methods or the
allocator's own attributes (its free list).

- zero ``page-not-allocated`` over the realistic sequence (page 1 and 64, SWA + MTP), and
  the shadow equals each allocator's own free list at the end;
- a request freed (SGLang's ``free``) while a batch still reads its pages: caught at its
  (row, col), with the free's stack in the report;
- a tracker started after the allocator was built (adopted from its free list);
- an allocator whose free list hands out a page past its pool: ``alloc-out-of-range`` with
  the caller, for the SWA sub-allocator (the seed's trap) and the page-1 allocator;
- restore: after exit the allocator classes hold their original methods.

Steps per configuration: ``TSAN_PAGED_TRACKING_STEPS`` (default 200).
"""

import os

import pytest

import needs_sglang  # noqa: E402,F401 - skips this module without SGLang

import torch  # noqa: E402

import sglang_driver as sd  # noqa: E402
from tsan_paged import PagedSanitizer, PageTableViolation, tracking  # noqa: E402
from tsan_paged.config import ConfigError  # noqa: E402

STEPS = int(os.environ.get("TSAN_PAGED_TRACKING_STEPS", "200"))
SGLANG_CALL_SITE = "trtllm_mha_backend.py:1511 in run_group"

TRACKED = ("page64-swa-mtp3", "page1-swa-mtp2", "page64-full-decode")  # sglang_driver.CONFIGS run with track_pages


def leaves(allocator):
    if hasattr(allocator, "swa_attn_allocator"):
        return [allocator.full_attn_allocator, allocator.swa_attn_allocator]
    return [allocator]


def assert_shadow_matches(engine):
    """The tracker's state of every page equals the allocator's own free list."""
    for leaf in leaves(engine.allocator):
        state = tracking.tracker.pools[leaf]
        expected = torch.ones(state.pages, dtype=torch.bool)
        expected[0] = False  # the padding page is never handed out
        expected[leaf.get_all_free_pages().long()] = False
        assert torch.equal(state.state[:state.pages] == tracking.ALLOCATED, expected), state.role


def kernel_buffers_map_to_pools(engine):
    """Each layer's K buffer, as the backend hands it to the kernel, maps to its pool."""
    for layer in engine.layers:
        k, v = engine.backend._reshape_paged_kv_cache(*engine.pool.get_kv_buffer(layer.layer_id), layer,
                                                      layer.head_dim)
        state = tracking.tracker.pool_of(k)
        assert state is not None and state.pages == k.shape[0]
        leaf = state.allocator()
        if engine.swa:
            side = engine.allocator.swa_attn_allocator if layer.layer_id == 0 else engine.allocator.full_attn_allocator
            assert leaf is side
        else:
            assert leaf is engine.allocator


@pytest.mark.parametrize("name", TRACKED)
def test_realistic_sequence_has_no_page_not_allocated(name):
    engine, sched = sd.realistic_scheduler(name)
    with PagedSanitizer(mode="raise", track_pages=True) as san:
        stats = sched.run(STEPS)
        kernel_buffers_map_to_pools(engine)
        assert_shadow_matches(engine)
        sched.drain()
        assert_shadow_matches(engine)  # everything freed: no page left allocated
    assert [v for v in san.reports if v.severity == "error"] == []
    assert {v.check for v in san.reports} <= {"dead-page-out-of-range"}
    assert stats.finished > 0 and stats.calls > STEPS // 2


@pytest.mark.parametrize("name", ["page64-swa-mtp3", "page1-full-decode"])
def test_graph_padded_batches_read_the_padding_page_without_a_report(name):
    """Issue 13: SGLang's CUDA-graph runner pads batches with rows that read ReqToTokenPool's
    reserved row 0, i.e. the padding page 0; a graph-mode server under track_pages in raise mode
    must not die on its first padded batch."""
    kwargs, draft = sd.CONFIGS[name]
    engine = sd.make_engine(draft_tokens=draft, **kwargs)
    sched = sd.Scheduler(engine, seed=11, draft_tokens=draft, max_running=6, on_call=sd.call_through,
                         pad_batches=True)
    padded = []
    sched.before_forward = lambda reqs, *_: padded.append(sd._padded(len(reqs)) > len(reqs))
    with PagedSanitizer(mode="raise", track_pages=True) as san:
        sched.run(120)
    assert any(padded), "no padded batch"
    assert san.errors == []


def planted_double_use(engine, sched, row=1):
    """In a decode batch of 3+, free request ``row``'s slots with SGLang's own free while the
    batch (already allocated, its tables not built yet) still holds it."""
    planted = {}

    def free_while_read(reqs, seq_lens, tokens_per_req):
        if not planted and len(reqs) >= 3:
            page = int(engine.req_to_token[reqs[row].row, 0]) // engine.page_size  # its first full-pool page
            sd.plant_use_after_free(engine, reqs, seq_lens, tokens_per_req, row)
            planted.update(row=row, page=page)

    sched.before_forward = free_while_read
    return planted


@pytest.mark.parametrize("page_size,device_table", [(64, False), (1, False), (64, True)])
def test_request_freed_while_read_is_caught_with_the_free_stack(page_size, device_table, dump_dir):
    """device_table: the tables as if on a GPU (the device kernel's path, under Triton's
    interpreter): track_pages still checks them (through the torch path)."""
    engine = sd.make_engine(page_size=page_size, swa=False)
    sched = sd.Scheduler(engine, seed=7, max_running=6, on_call=sd.call_through)
    planted = planted_double_use(engine, sched)
    with PagedSanitizer(mode="raise", track_pages=True, dump_dir=dump_dir) as san:
        san.options.device_interpret = device_table
        with pytest.raises(PageTableViolation) as info:
            for _ in range(300):
                sched.step()
    assert planted, "no decode batch of 3+ requests"
    [v] = info.value.violations
    assert (v.check, v.severity, v.arg, v.index, v.value) == (
        "page-not-allocated", "error", "block_tables", (planted["row"], 0), planted["page"])
    assert v.caller.endswith(SGLANG_CALL_SITE), v.caller
    text = str(info.value)
    assert f"block_tables[{planted['row']}, 0] = {planted['page']}: page {planted['page']} is FREE" in text
    assert "freed by (most recent call last)" in text
    assert "test_tracking.py" in text and "in free_while_read" in text  # the free's stack
    if page_size > 1:  # the release inside SGLang's free
        assert "allocator/paged.py" in text and " in free\n" in text
    assert san.errors == [v]


def test_tracker_started_after_the_allocator_was_built():
    """Pages handed out before tracking started are adopted as allocated (from the free list);
    freed after, and still read: caught."""
    engine = sd.make_engine(page_size=64, swa=True, draft_tokens=2)
    sched = sd.Scheduler(engine, seed=4, draft_tokens=2, max_running=6, on_call=sd.call_through)
    for _ in range(40):
        sched.step()
    assert sched.running
    with PagedSanitizer(mode="raise", track_pages=True) as san:
        assert_shadow_matches(engine)  # adopted at start (gc scan), before any call
        kernel_buffers_map_to_pools(engine)
        sched.run(80)
        assert_shadow_matches(engine)
    assert san.errors == []


@pytest.mark.parametrize("pad_batches", [False, True])
def test_swa_request_freed_while_read_is_caught(pad_batches):
    """SGLang's SWA free of a request still in the batch: its SWA layer reads the freed slots
    through the cleared full->SWA mapping (the padding page), its full layer the freed pages.
    In a graph-padded batch too: the padding rows are quiet, the live row is not."""
    engine = sd.make_engine(page_size=64, swa=True, draft_tokens=2)
    sched = sd.Scheduler(engine, seed=8, draft_tokens=2, max_running=6, on_call=sd.call_through,
                         pad_batches=pad_batches)
    planted = planted_double_use(engine, sched)
    with PagedSanitizer(mode="log", track_pages=True) as san:
        for _ in range(300):
            sched.step()
            if planted:
                break
    assert planted
    found = [v for v in san.reports if v.check == "page-not-allocated"]
    assert len(found) == 2  # the SWA layer (0) and the full layer (1)
    swa, full = found
    assert swa.index[0] == planted["row"] and swa.value == 0 and "padding page" in swa.message
    assert full.index == (planted["row"], 0) and full.value == planted["page"] and "is FREE" in full.message
    assert "full_attn_allocator" in full.message and "in free_while_read" in full.message


@pytest.mark.parametrize("case", ["swa-sub-allocator-page64", "token-allocator-page1"])
def test_allocator_handing_out_an_index_past_its_pool(case):
    """The seed's trap, checked at every hand-out: the free list (the allocator's own attribute)
    holds one page past the pool; the next allocation that takes it is reported with its caller."""
    if case == "swa-sub-allocator-page64":
        engine = sd.make_engine(page_size=64, swa=True, draft_tokens=3)
        leaf, ps = engine.allocator.swa_attn_allocator, 64
        sched = sd.Scheduler(engine, seed=3, draft_tokens=3, max_running=6, on_call=sd.call_through)
    else:
        engine = sd.make_engine(page_size=1, swa=False)
        leaf, ps = engine.allocator, 1
        sched = sd.Scheduler(engine, seed=3, max_running=6, on_call=sd.call_through)
    for _ in range(20):
        sched.step()
    pages = leaf.size // ps + 1  # the pool's buffer: pages 0..pages-1
    with PagedSanitizer(mode="raise", track_pages=True) as san:
        leaf.free_pages = torch.cat([torch.tensor([pages], dtype=leaf.free_pages.dtype), leaf.free_pages])
        with pytest.raises(PageTableViolation) as info:
            for _ in range(200):
                sched.step()
    [v] = info.value.violations
    assert (v.check, v.severity, v.value // ps, v.bound) == ("alloc-out-of-range", "error", pages, pages * ps)
    assert v.caller.split(":")[0].endswith("sglang_driver.py") and v.caller.endswith("in _alloc"), v.caller
    assert v.op.split(":")[1].split(".")[1] in ("alloc", "alloc_extend", "alloc_decode")
    if case == "swa-sub-allocator-page64":
        assert "SWATokenToKVPoolAllocator.swa_attn_allocator" in v.message
        assert any("allocator/swa.py" in f for f in v.stack)
    assert f"(page {pages})" in v.message and "an allocator bug, not a table-building one" in v.message
    assert san.errors == [v]


def test_restore_puts_the_original_methods_back():
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
    from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

    classes = (TokenToKVPoolAllocator, PagedTokenToKVPoolAllocator, SWATokenToKVPoolAllocator)
    before = [dict(c.__dict__) for c in classes]
    outer = PagedSanitizer(track_pages=True)
    with outer:
        assert PagedTokenToKVPoolAllocator.__dict__["alloc_decode"] is not before[1]["alloc_decode"]
        with PagedSanitizer(track_pages=True):  # nested: still one set of patches
            assert PagedTokenToKVPoolAllocator.alloc_decode.__tsan_paged_original__ is before[1]["alloc_decode"]
        assert PagedTokenToKVPoolAllocator.__dict__["alloc_decode"] is not before[1]["alloc_decode"]
    for cls, saved in zip(classes, before):
        assert {k: v for k, v in cls.__dict__.items()} == saved, cls
    assert not tracking.tracker.active and not tracking.tracker.patches
    with PagedSanitizer():  # track_pages off: nothing patched
        assert TokenToKVPoolAllocator.__dict__["alloc"] is before[0]["alloc"]


def test_config_key():
    with PagedSanitizer(config={"track_pages": True}) as san:
        assert san.options.page_tracker is tracking.tracker and tracking.tracker.active
    assert san.options.page_tracker is None and not tracking.tracker.active
    with pytest.raises(ConfigError, match="track_pages"):
        PagedSanitizer(config={"track_pages": "yes"})


@pytest.mark.parametrize("seed", range(6))
def test_derived_table_kernel_matches_the_torch_ops(seed):
    """track_pages' derived table: the Triton kernel a CUDA table gets (here under Triton's
    interpreter) and the torch ops a CPU table gets agree entry for entry, on K/V views of a
    [B, 2, W] table (strided), negative and out-of-pool entries and graph-padding rows."""
    g = torch.Generator().manual_seed(seed)
    pages, rows, width, q_len = 40, 7, 9, 2
    state = torch.randint(0, 3, (pages,), generator=g, dtype=torch.uint8)
    table = torch.randint(-3, pages + 4, (rows, 2, width), generator=g, dtype=torch.int32)
    table[0] = 0  # a padding row: page 0 everywhere, at length <= q_len + 1
    lengths = torch.randint(0, 200, (rows,), generator=g, dtype=torch.int32)
    lengths[0] = q_len + 1
    for kv in (0, 1):
        view = table[:, kv, :]
        expected = tracking.not_allocated(view, lengths, state, q_len)
        assert torch.equal(tracking.not_allocated(view, lengths, state, q_len, interpret=True), expected)
        assert int(expected[0].abs().sum()) == 0 and (expected > 0).any()


def test_an_out_of_pool_index_marks_nothing_of_the_pool():
    """A negative or past-the-end id (an allocator bug) lands in the state's spare last entry,
    never on a page of the pool (page 0 included)."""
    class Pool:
        page_size, size, device = 1, 9, "cpu"

    state = tracking.PoolState(Pool(), "a pool")
    state.mark(torch.tensor([-1, -7, 10, 10**9, 3]), tracking.FREED, sid=5)
    assert state.state.tolist() == [0, 0, 0, tracking.FREED] + [0] * 6 + [tracking.FREED]
    assert state.stack[:10].tolist() == [-1, -1, -1, 5] + [-1] * 6


@pytest.mark.parametrize("severity", ["off", "warning"])
def test_page_not_allocated_severity_is_honoured(severity):
    engine, scheduler = sd.realistic_scheduler("page64-full-decode")
    scheduler.run(40)
    with PagedSanitizer(mode="raise", track_pages=True, config={"checks": {"page-not-allocated": severity}}) as san:
        r = scheduler.running[0]
        engine.allocator.free(engine.req_to_token[r.row, :64].to(torch.int64))  # its first page, still read
        scheduler.step()
    reported = [v for v in san.reports if v.check == "page-not-allocated"]
    assert (reported == []) if severity == "off" else (reported and reported[0].severity == "warning")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("per_page,stack", [(64, True), (1, False)])
def test_mark_kernel_matches_the_torch_update(dtype, per_page, stack):
    """The Triton ``mark`` kernel a CUDA pool's allocations and frees launch (here under Triton's
    interpreter) writes what a CPU pool's torch ops write: ids past the pool and negative ids land
    in the extra last entry; nothing else changes."""
    from tsan_paged import kernels
    from tsan_paged.tracking import ALLOCATED, FREED

    if not kernels.available():
        pytest.skip(f"no Triton: {kernels.TRITON_ERROR}")
    pages = 10
    ids = torch.tensor([3, 0, -5, 9 * per_page + per_page - 1, 11 * per_page, 10 * per_page, 2 * per_page + 1, -1],
                       dtype=dtype)
    status, sid = (FREED, 7) if stack else (ALLOCATED, None)
    state = torch.full((pages + 1,), 9, dtype=torch.uint8)
    marks = torch.full((pages + 1,), -1, dtype=torch.int32)
    kernels.kernel("mark", True)[(1,)](ids, state, marks, ids.numel(), per_page, pages, status,
                                       sid if stack else 0, BLOCK=16, HAS_STACK=stack)
    expected_state = torch.full((pages + 1,), 9, dtype=torch.uint8)
    expected_marks = torch.full((pages + 1,), -1, dtype=torch.int32)
    torch_ids = torch.div(ids.long(), per_page, rounding_mode="floor").clamp(-1, pages)
    expected_state.index_fill_(0, torch_ids, status)
    if stack:
        expected_marks.index_fill_(0, torch_ids, sid)
    assert torch.equal(state, expected_state) and torch.equal(marks, expected_marks)
    assert state[pages] == status  # the out-of-pool ids' entry


def test_derived_list_kernel_matches_the_torch_derivation():
    """The Triton kernel a CUDA slot list's ``track_pages`` check launches (here under Triton's
    interpreter) derives what the torch ops of a CPU list derive, on the live entries
    ``[indptr[0], indptr[B])``: lists starting past 0, empty rows, graph-padding rows of page 0,
    entries out of the pool, freed and never-allocated pages; entries outside are not read."""
    from tsan_paged import kernels
    from tsan_paged.tracking import ALLOCATED, FREED, not_allocated_entries

    if not kernels.available():
        pytest.skip(f"no Triton: {kernels.TRITON_ERROR}")
    g = torch.Generator().manual_seed(3)
    pages, per_page = 50, 4
    for trial in range(6):
        state = torch.randint(0, 3, (pages,), generator=g, dtype=torch.uint8)
        state[torch.randint(0, pages, (20,), generator=g)] = ALLOCATED
        state[7] = FREED
        lengths = torch.randint(0, 6, (7,), generator=g)
        lengths[2] = 0  # an empty row
        lengths[4] = 1 + trial % 2  # a row short enough to be graph padding
        start = trial  # the list's live entries start past 0
        indptr = torch.cat([torch.tensor([start]), start + lengths.cumsum(0)]).to(torch.int32)
        total = int(indptr[-1]) + 5  # entries past the end are never read
        indices = torch.randint(-3, pages * per_page + 9, (total,), generator=g)
        indices[int(indptr[4]):int(indptr[5])] = 0  # the padding row reads slot 0
        live = slice(int(indptr[0]), int(indptr[-1]))
        for dtype in (torch.int64, torch.int32):
            expected = not_allocated_entries(indptr, indices.to(dtype), state, per_page, 1, rows=7)
            got = not_allocated_entries(indptr, indices.to(dtype), state, per_page, 1, rows=7, interpret=True)
            assert torch.equal(got[live], expected[live]), (trial, dtype)
        assert (expected[int(indptr[4]):int(indptr[5])] == 0).all()  # padding: not reported
        assert expected[live].any()  # the case has findings to compare
