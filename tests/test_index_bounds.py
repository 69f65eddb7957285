"""Page ids and lengths compared with bounds past their dtype's range (issue 20, defect 2).

torch casts a Python int to a tensor's dtype before comparing: ``int32_tensor >= 2**62`` is
``int32_tensor >= 0`` and ``int32_tensor >= 2**31`` is ``>= -2**31``. A plan() page list checked
before the cache's page count is known (bound ``NO_PAGE_BOUND = 2**62``) with one ``-1`` in it
reported every entry. Each check is run by the torch path and by the device kernel under
Triton's interpreter (bounds passed to Triton as runtime scalars: i32, u32 or i64 by value).
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import flashinfer

from test_flashinfer_more import make_wrapper, reached
from tsan_paged import PagedSanitizer, checks, engine
from tsan_paged.access import Buffer, CsrPages, Lengths, PageTable, Slots
from tsan_paged.registry import Call, CheckOptions
from tsan_paged.rules.flashinfer import NO_PAGE_BOUND

pytest.importorskip("triton", reason="Triton is not installed: the device kernels cannot be interpreted here")

PATHS = ["torch", "kernel"]
HUGE = [2**31, 2**31 + 5, 2**32 - 1, 2**32 + 3, NO_PAGE_BOUND]


@pytest.fixture(autouse=True)
def triton_interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def found(violations):
    return [(v.check, v.arg, v.index, v.value, v.bound, v.count) for v in violations]


def findings(access_factory, path):
    options = CheckOptions()
    options.device_interpret = path == "kernel"
    return engine.findings([access_factory()], Call("test::op", {}, options))


def flashinfer_decode_batch(batch_size=4, kv_len=54, page_size=16):
    """indptr, indices, last_page_len as FlashInfer's decode tests build them
    (tests/attention/test_batch_decode_kernels.py): ``num_pages_per_seq`` pages per request."""
    pages_per_seq = (kv_len + page_size - 1) // page_size
    indptr = torch.arange(0, batch_size + 1, dtype=torch.int32) * pages_per_seq
    indices = torch.arange(0, pages_per_seq * batch_size, dtype=torch.int32)
    last = torch.full((batch_size,), (kv_len - 1) % page_size + 1, dtype=torch.int32)
    return indptr, indices, last, pages_per_seq


@pytest.mark.parametrize("path", PATHS)
def test_a_negative_plan_entry_is_one_error_at_its_position(path, monkeypatch):
    """The issue's case: a -1 at row 2, position 3 of the decode wrapper's plan() list, before any
    run() told the page count: ONE page-out-of-range at (2, 3), not one per entry."""
    indptr, indices, last, per_seq = flashinfer_decode_batch()
    indices[2 * per_seq + 3] = -1
    with PagedSanitizer(mode="log") as san:
        san.options.device_interpret = path == "kernel"
        wrapper = make_wrapper(flashinfer.BatchDecodeWithPagedKVCacheWrapper, monkeypatch)
        reached(wrapper.plan, indptr, indices, last, 4, 4, 64, 16)
    assert found(san.reports) == [("page-out-of-range", "indices", (2, 3), -1, NO_PAGE_BOUND, 1)]
    assert "page count is not known yet (valid >= 0)" in san.reports[0].message, san.reports[0].message


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bound", HUGE)
def test_int32_tables_against_bounds_past_int32(path, bound):
    """Every form: one negative entry among valid ones is the only finding, whatever the bound."""
    table = torch.arange(32, dtype=torch.int32).reshape(4, 8).contiguous()
    table[2, 3] = -1
    lengths = torch.full((4,), 128, dtype=torch.int32)
    assert found(findings(lambda: PageTable(table.clone(), "block_tables", (Buffer("kv", bound),), 16,
                                            lengths=lengths.clone()), path)) == [
        ("page-out-of-range", "block_tables", (2, 3), -1, bound, 1)]

    indices = torch.arange(16, dtype=torch.int32)
    indices[11] = -1
    indptr, last = torch.arange(5, dtype=torch.int32) * 4, torch.full((4,), 5, dtype=torch.int32)
    assert found(findings(lambda: CsrPages(indptr.clone(), indices.clone(), (Buffer("kv", bound),), last.clone(), 16),
                          path)) == [("page-out-of-range", "indices", (2, 3), -1, bound, 1)]

    slots = torch.arange(10, dtype=torch.int32)
    slots[4] = -3
    assert found(findings(lambda: Slots(slots.clone(), "loc", Buffer("kv", bound), negative_skipped=False),
                          path)) == [("page-out-of-range", "loc", (4,), -3, bound, 1)]
    assert findings(lambda: Slots(slots.clone(), "loc", Buffer("kv", bound)), path) == []  # -3: padding


@pytest.mark.parametrize("path", PATHS)
def test_uint32_lengths_against_a_max_len_past_int32(path):
    """uint32 lengths (trtllm decode takes them) reach 2**32 - 1: a max_len of 3.5e9 passes 3e9 and
    flags 4e9 only (the device kernel clamped its bound to int32's max)."""
    lengths = torch.tensor([5, 3_000_000_000, 4_000_000_000], dtype=torch.int64).to(torch.uint32)
    assert found(findings(lambda: Lengths(lengths.clone(), "seq_lens", max_len=3_500_000_000), path)) == [
        ("seq-len-exceeds-max", "seq_lens", (2,), 4_000_000_000, 3_500_000_000, 1)]
    table = torch.zeros(3, 8, dtype=torch.int32)
    assert found(findings(lambda: PageTable(table.clone(), "block_tables", (Buffer("kv", 10),), 2**29,
                                            lengths=lengths.clone(), max_len=3_500_000_000), path)) == [
        ("seq-len-exceeds-max", "seq_lens", (2,), 4_000_000_000, 3_500_000_000, 1)]


@pytest.mark.parametrize("path", PATHS)
def test_a_window_past_int32_reads_every_column(path):
    """window_left >= 2**31 (wider than any length: no column is skipped) against int32 lengths:
    the bad entry in column 0 is read, an error (the window arithmetic wrapped in int32)."""
    table = torch.zeros(3, 8, dtype=torch.int32)
    table[1, 0] = 50
    lengths = torch.tensor([5, 100, 128], dtype=torch.int32)
    assert found(findings(lambda: PageTable(table.clone(), "block_tables", (Buffer("kv", 10),), 16,
                                            lengths=lengths.clone(), window_left=2**31 + 100), path)) == [
        ("page-out-of-range", "block_tables", (1, 0), 50, 10, 1)]


DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint32]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(DTYPES), st.data(), st.integers(-2**70, 2**70))
def test_comparisons_are_exact_for_any_dtype_and_bound(dtype, data, bound):
    info = torch.iinfo(dtype)
    values = data.draw(st.lists(st.integers(info.min, info.max), min_size=0, max_size=20))
    tensor = torch.tensor(values, dtype=torch.int64).to(dtype)
    assert checks.at_least(tensor, bound).tolist() == [v >= bound for v in values]
    assert checks.above(tensor, bound).tolist() == [v > bound for v in values]
    assert checks.out_of_range(tensor, bound).tolist() == [v < 0 or v >= bound for v in values]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(-2**31, 2**31 - 1), min_size=1, max_size=40), st.integers(1, 2**63 - 1))
def test_csr_lists_find_exactly_the_entries_out_of_range(values, bound):
    """Any int32 list, any page count: both paths report exactly the entries < 0 or >= bound."""
    indices = torch.tensor(values, dtype=torch.int32)
    indptr = torch.tensor([0, len(values) // 2, len(values)], dtype=torch.int32)
    bad = [i for i, v in enumerate(values) if v < 0 or v >= bound]
    for path in PATHS:
        got = findings(lambda: CsrPages(indptr.clone(), indices.clone(), (Buffer("kv", bound),)), path)
        if not bad:
            assert got == []
            continue
        [v] = got
        first = bad[0]
        row = 0 if first < len(values) // 2 else 1
        assert (v.index, v.value, v.count) == ((row, first - int(indptr[row])), values[first], len(bad)), path
