"""The built-in rule for trtllm_batch_decode_with_kv_cache, through the real FlashInfer entry point."""

import inspect

import flashinfer.decode
import pytest
import torch
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st

from batches import by_check, call_kernel, errors, make_batch
from tsan_paged import PagedSanitizer, PageTableViolation

FORMS = [("tuple", True), ("single2", True), ("single1", True), ("tuple", False), ("single2", False)]


def live_cell(batch, row):
    """The last column row `row` reads (its length's last page)."""
    ps = batch["max_seq_len"] // batch["block_tables"].shape[-1]
    return row, (int(batch["seq_lens"][row]) + ps - 1) // ps - 1


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("kv_form,shared", FORMS)
def test_valid_tables_pass_to_flashinfer(kv_form, shared, layout):
    batch = make_batch(kv_form=kv_form, shared=shared, layout=layout, stale="garbage")
    with PagedSanitizer(mode="raise") as san:
        assert call_kernel(batch)
    assert errors(san) == []
    assert all(v.check == "dead-page-out-of-range" for v in san.reports)


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("kv_form,shared", FORMS)
@pytest.mark.parametrize("bad", ["past-end", "minus-one"])
def test_live_fault_caught_at_its_index(kv_form, shared, layout, bad):
    batch = make_batch(kv_form=kv_form, shared=shared, layout=layout, num_pages=50)
    row, col = live_cell(batch, 2)
    value = 50 if bad == "past-end" else -1
    if shared:
        batch["block_tables"][row, col] = value
        index = (row, col)
    else:
        batch["block_tables"][row, 1, col] = value  # a V-side fault
        index = (row, 1, col)
    with PagedSanitizer(mode="raise") as san:
        with pytest.raises(PageTableViolation) as info:
            call_kernel(batch)
    found = info.value.violations
    assert [(v.check, v.index, v.value, v.bound) for v in found] == [("page-out-of-range", index, value, 50)]
    assert san.reports[0].caller.startswith("tests/batches.py:")  # the line that called FlashInfer


def test_page_size_comes_from_the_layouts_dimension():
    # HND [P, H, ps, D] vs NHD [P, ps, H, D]: with H=2, ps=16 a wrong pick would use 2.
    for layout in ("HND", "NHD"):
        batch = make_batch(layout=layout, kv_heads=2, page_size=16, lengths=[16 * 16] * 4, width=16)
        with PagedSanitizer(mode="raise") as san:
            call_kernel(batch)
        assert san.reports == []


def test_the_seeds_off_by_one():
    from tsan_paged.demo import NUM_PAGES, seed_batch

    batch = seed_batch()
    with PagedSanitizer(mode="raise"):
        with pytest.raises(PageTableViolation) as info:
            call_kernel(batch)
    v = info.value.violations[0]
    assert (v.check, v.arg, v.index, v.value, v.bound) == ("page-out-of-range", "block_tables", (5, 127), NUM_PAGES, NUM_PAGES)
    assert "block_tables[5, 127] = 8657, kv_cache has 8657 pages (valid 0..8656)" in str(info.value)
    assert "caller" in str(info.value)


def test_mtp_rows():
    batch = make_batch(q_len=2, lengths=[40, 17, 255, 2])
    with PagedSanitizer(mode="raise") as san:
        call_kernel(batch)
    assert san.reports == []
    batch["query"] = batch["query"][:-1]
    with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation) as info:
        call_kernel(batch)
    v = info.value.violations[0]
    assert (v.check, v.arg, v.value, v.bound) == ("shape-mismatch", "query", 7, 8)


def test_v_cache_smaller_than_k():
    batch = make_batch(num_pages=100, v_pages=60)
    batch["block_tables"][1, 0] = 70  # a valid K page, past the end of V
    with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation) as info:
        call_kernel(batch)
    v = info.value.violations[0]
    assert (v.check, v.index, v.value, v.bound) == ("page-out-of-range", (1, 0), 70, 60)
    assert "kv_cache[1] has 60 pages" in v.message


def test_dead_entries_are_warnings_and_the_call_goes_on():
    batch = make_batch(lengths=[16, 1, 100, 33])
    batch["block_tables"][0, 5] = 10**6
    with PagedSanitizer(mode="raise") as san:
        assert call_kernel(batch)
    [v] = san.reports
    assert (v.check, v.severity, v.index, v.value) == ("dead-page-out-of-range", "warning", (0, 5), 10**6)


def test_dead_entries_are_errors_under_strict_checks():
    batch = make_batch(lengths=[16, 1, 100, 33])
    batch["block_tables"][0, 5] = 10**6
    with PagedSanitizer(mode="raise", config={"checks": {"dead-page-out-of-range": "error"}}):
        with pytest.raises(PageTableViolation):
            call_kernel(batch)


@pytest.mark.parametrize("mutate,check,arg,index,value,bound", [
    (lambda b: b["seq_lens"].__setitem__(3, 16 * 16 + 1), "seq-len-exceeds-table", "seq_lens", (3,), 257, 256),
    (lambda b: b.__setitem__("max_seq_len", 100) or b["seq_lens"].__setitem__(1, 101), "seq-len-exceeds-max", "seq_lens", (1,), 101, 100),
    (lambda b: b["seq_lens"].__setitem__(2, -3), "negative-seq-len", "seq_lens", (2,), -3, 0),
])
def test_length_checks(mutate, check, arg, index, value, bound):
    batch = make_batch(lengths=[10, 20, 30, 40])
    mutate(batch)
    with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation) as info:
        call_kernel(batch)
    [v] = [v for v in info.value.violations if v.check == check]
    assert (v.arg, v.index, v.value, v.bound) == (arg, index, value, bound)


@pytest.mark.parametrize("mutate,check,arg", [
    (lambda b: b.__setitem__("seq_lens", b["seq_lens"][:3]), "shape-mismatch", "seq_lens"),
    (lambda b: b.__setitem__("kv_cache", (b["kv_cache"][0], b["kv_cache"][1][..., :4])), "shape-mismatch", "kv_cache"),
    (lambda b: b.__setitem__("block_tables", b["block_tables"][:, None]), "shape-mismatch", "block_tables"),
    (lambda b: b.__setitem__("block_tables", b["block_tables"].long()), "bad-dtype", "block_tables"),
    (lambda b: b.__setitem__("seq_lens", b["seq_lens"].long()), "bad-dtype", "seq_lens"),
    (lambda b: b.__setitem__("block_tables", b["block_tables"].to("meta")), "bad-device", "block_tables"),
    (lambda b: b.__setitem__("block_tables", torch.cat([b["block_tables"], b["block_tables"]], 1)[:, :16]), "bad-layout", "block_tables"),
])
def test_whole_argument_checks(mutate, check, arg):
    batch = make_batch(lengths=[10, 20, 30, 40])
    mutate(batch)
    with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation) as info:
        call_kernel(batch)
    v = info.value.violations[0]
    assert (v.check, v.arg, v.index) == (check, arg, None)


def test_uint32_lengths_are_accepted():
    batch = make_batch(lengths=[10, 20, 30, 40])
    batch["seq_lens"] = batch["seq_lens"].to(torch.uint32)
    with PagedSanitizer(mode="raise") as san:
        call_kernel(batch)
    assert san.reports == []


def test_sliding_window_read_region_xqa():
    # bf16 KV (mha.cu, 256-token tiles); page 16, window_left 99 (win 100), seq_len 600, q_len 1:
    # S = 600 - 100 = 500 tokens skipped in tiles of 256 -> first token 256 -> first page 16; last 37.
    batch = make_batch(lengths=[600, 600, 600, 600], width=40, page_size=16)
    batch["window_left"] = 99
    batch["block_tables"][0, 15] = 10**6   # before the first loaded tile: dead
    batch["block_tables"][1, 16] = 10**6   # the loaded (partly masked) tile: live
    with PagedSanitizer(mode="raise") as san:
        with pytest.raises(PageTableViolation) as info:
            call_kernel(batch)
    assert [(v.check, v.index) for v in info.value.violations] == [("page-out-of-range", (1, 16))]
    assert [(v.check, v.index) for v in by_check(san, "dead-page-out-of-range")] == [("dead-page-out-of-range", (0, 15))]


def test_sliding_window_with_mtp_starts_earlier():
    # q_len 250: S = 600 - 249 - 100 = 251 -> first token 0 -> page 0: every column up to 37 is read
    batch = make_batch(lengths=[600] * 2, width=40, page_size=16, q_len=250)
    batch["window_left"] = 99
    batch["block_tables"][0, 4] = 10**6
    with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation) as info:
        call_kernel(batch)
    assert info.value.violations[0].index == (0, 4)


def test_sliding_window_tile_of_the_hopper_fp8_kernel():
    """fp8 KV on sm90 runs mha_sm90.cu (64-token tiles): S = 500 -> first token 448 -> page 28."""
    from tsan_paged import engine
    from tsan_paged.registry import Call, CheckOptions
    from tsan_paged.rules.flashinfer import TRTLLM_DECODE, trtllm_batch_decode_with_kv_cache as rule_fn

    batch = make_batch(lengths=[600, 600], width=40, page_size=16)
    batch["kv_cache"] = tuple(t.to(torch.float8_e4m3fn) for t in batch["kv_cache"])
    batch["window_left"] = 99
    batch["block_tables"][0, 27] = 10**6   # dead with 64-token tiles (live with 256)
    batch["block_tables"][1, 28] = 10**6   # live
    arguments = inspect.signature(flashinfer.decode.trtllm_batch_decode_with_kv_cache).bind(**batch)
    arguments.apply_defaults()
    def findings(capability):
        call = Call(TRTLLM_DECODE, dict(arguments.arguments), CheckOptions(cuda_capability=capability))
        return sorted((v.check, v.index, v.count) for v in engine.findings(rule_fn(call), call))

    assert findings((9, 0)) == [("dead-page-out-of-range", (0, 27), 1), ("page-out-of-range", (1, 28), 1)]
    assert findings(None) == [("page-out-of-range", (0, 27), 2)]  # unknown GPU: 256-token tiles, both read


def test_trtllm_gen_reads_the_whole_row():
    batch = make_batch(lengths=[16, 1, 100, 33])
    batch["backend"] = "trtllm-gen"
    batch["block_tables"][0, 5] = 10**6  # past row 0's length: read by trtllm-gen
    with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation) as info:
        call_kernel(batch)
    assert (info.value.violations[0].check, info.value.violations[0].index) == ("page-out-of-range", (0, 5))


def test_duplicate_pages_when_asked_for():
    batch = make_batch(lengths=[64, 64, 16, 16], width=8, page_size=16, num_pages=1000)
    batch["block_tables"][:] = torch.arange(32, dtype=torch.int32).view(4, 8)
    batch["block_tables"][1, 3] = batch["block_tables"][1, 1]   # live duplicate
    batch["block_tables"][2, 5] = batch["block_tables"][2, 0]   # dead column: not a duplicate read
    with PagedSanitizer(mode="log") as san:
        call_kernel(batch)
    assert san.reports == []  # off by default
    with PagedSanitizer(mode="log", config={"checks": {"duplicate-page": "warning"}}) as san:
        call_kernel(batch)
    assert [(v.check, v.index, v.value) for v in san.reports] == [("duplicate-page", (1, 3), 9)]


def test_sglang_style_tables_over_many_steps_have_no_errors():
    """Tables wider than needed with stale tails, rebuilt every step as requests grow."""
    gen = torch.Generator().manual_seed(1)
    with PagedSanitizer(mode="raise") as san:
        for step in range(50):
            lengths = torch.randint(1, 64 * 32, (16,), generator=gen)
            batch = make_batch(lengths=lengths, width=40, page_size=64, num_pages=500, stale="garbage", seed=step)
            call_kernel(batch)
    assert errors(san) == []


# -- properties ---------------------------------------------------------------------------
batches = st.builds(
    dict,
    batch=st.integers(1, 6), width=st.integers(1, 12), page_size=st.sampled_from([1, 4, 16, 64]),
    num_pages=st.integers(1, 300), layout=st.sampled_from(["HND", "NHD"]),
    kv_form=st.sampled_from(["tuple", "single2", "single1"]), q_len=st.integers(1, 3), seed=st.integers(0, 2**16),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=batches)
def test_property_valid_tables_have_no_errors(spec):
    batch = make_batch(**spec, stale="garbage")
    with PagedSanitizer(mode="raise") as san:
        call_kernel(batch)
    assert errors(san) == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=batches, data=st.data())
def test_property_one_mutation_is_found_at_its_index(spec, data):
    batch = make_batch(**spec)
    table, ps = batch["block_tables"], spec["page_size"]
    pages_needed = ((batch["seq_lens"] + ps - 1) // ps).tolist()
    row = data.draw(st.integers(0, table.shape[0] - 1))
    col = data.draw(st.integers(0, table.shape[1] - 1))
    value = data.draw(st.one_of(st.integers(-(2**31), -1), st.integers(spec["num_pages"], 2**31 - 1)))
    table[row, col] = value
    live = col < pages_needed[row]
    with PagedSanitizer(mode="log") as san:
        call_kernel(batch)
    [v] = san.reports
    assert (v.index, v.value) == ((row, col), value)
    assert v.check == ("page-out-of-range" if live else "dead-page-out-of-range")
    assert v.severity == ("error" if live else "warning")
