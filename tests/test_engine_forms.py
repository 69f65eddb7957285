"""Every access form through the device kernels, under Triton's interpreter, against the torch checks.

The engine (tsan_paged/engine.py) checks what rules describe (tsan_paged/access.py): the torch
checks on CPU, the Triton kernels of tsan_paged/kernels.py on CUDA. Here the same kernels run on
CPU tensors under Triton's interpreter (``CheckOptions.device_interpret``) and must give the
same findings as the torch checks (check ids, index, value, bound, count, message) for every
form: dense tables (with explicit regions and new tokens), lengths, CSR page lists (FlashInfer's
wrappers, TOML rules), slot mappings (vLLM, SGLang), tokens written through a CSR list
(``append_paged_kv_cache``). Then the real rules through the real entry points, on both paths.
"""

import inspect

import pytest
import torch
from hypothesis import given, settings, strategies as st

pytest.importorskip("triton", reason="Triton is not installed: the device kernels cannot be interpreted here")

import flashinfer.page  # noqa: E402

from tsan_paged import checks, device, engine  # noqa: E402
from tsan_paged import kernels as K  # noqa: E402
from tsan_paged.access import Buffer, CsrPages, Lengths, PageTable, Slots, Writes  # noqa: E402
from tsan_paged.registry import Call, CheckOptions  # noqa: E402
from tsan_paged.report import CHECKS  # noqa: E402

FIELDS = ("check", "arg", "index", "value", "bound", "count", "message", "severity")


LAUNCHES = []


@pytest.fixture(autouse=True)
def triton_interpret(monkeypatch):
    """The interpreter, and a count of the kernel launches (so that "same findings" cannot mean
    that both sides took the torch checks)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    run = device.run_interpreted
    monkeypatch.setattr(device, "run_interpreted", lambda *a, **k: LAUNCHES.append(1) or run(*a, **k))


def both(access_factory, launches=1):
    """The access's findings by the torch checks and by the interpreted kernel (fresh copies:
    neither path may change the inputs here)."""
    torch_call = Call("test::op", {}, CheckOptions())
    kernel_options = CheckOptions()
    kernel_options.device_interpret = True
    kernel_call = Call("test::op", {}, kernel_options)
    expected = engine.findings([access_factory()], torch_call)
    before = len(LAUNCHES)
    got = engine.findings([access_factory()], kernel_call)
    assert len(LAUNCHES) == before + launches  # one kernel launch per access (none: metadata alone)
    return expected, got


def assert_same(access_factory, launches=1):
    expected, got = both(access_factory, launches)
    assert [tuple(getattr(v, f) for f in FIELDS) for v in got] == [tuple(getattr(v, f) for f in FIELDS)
                                                                    for v in expected]
    for g, e in zip(got, expected):
        assert g.examples == e.examples[:1]
    return got


def plain(found):
    return [(v.check, v.arg, v.index, v.value, v.bound, v.count) for v in found]


# -- dense tables: explicit regions, new tokens, int64 tables ------------------------------

def test_explicit_region_and_index_mapping():
    """A Python rule's region (first/end tensors) and its own index mapping, as
    ``checks.check_pages_in_range`` describes them on CUDA."""
    table = torch.randint(0, 50, (6, 9), dtype=torch.int32)
    first = torch.tensor([0, 2, 0, 5, 1, 0])
    end = torch.tensor([9, 4, 1, 9, 3, 0])
    table[1, 3] = 50     # live
    table[1, 5] = 77     # dead (past end)
    table[3, 1] = -2     # dead (before first)
    table[5, 0] = 60     # dead (empty region)
    found = assert_same(lambda: PageTable(table.clone(), "pages_of", (Buffer("pool", 50),), first=first,
                                          end=end, explicit_region=True, index_of=lambda r, c: (r, 100 + c)))
    assert plain(found) == [("page-out-of-range", "pages_of", (1, 103), 50, 50, 1),
                            ("dead-page-out-of-range", "pages_of", (1, 105), 77, 50, 3)]


def test_new_tokens_extend_the_lengths_and_window_in_pages():
    """FlashAttention's region: L = cache_seqlens + new tokens, window start in whole pages."""
    table = torch.randint(0, 40, (3, 8), dtype=torch.int32)
    lens = torch.tensor([254, 500, 1], dtype=torch.int32)
    table[0, 1] = -1      # 254 + 4 = 258 tokens: page 1 is read
    table[1, 0] = 41      # window: L = 504, q 4, left 255: S = 245 -> page 0 read (256-token pages)
    table[2, 2] = 99      # row 2 reads 1 page: dead
    for window in (-1, 255, 300):
        found = assert_same(lambda: PageTable(table.clone(), "block_table", (Buffer("k_cache", 40),), 256,
                                              lengths=lens.clone(), lengths_arg="cache_seqlens", length_offset=4,
                                              window_left=window, q_len=4))
        assert ("page-out-of-range", (0, 1)) in [(v.check, v.index) for v in found]
    lens[1] = 8 * 256  # + 4 new tokens: past the table
    found = assert_same(lambda: PageTable(table.clone(), "block_table", (Buffer("k_cache", 40),), 256,
                                          lengths=lens.clone(), lengths_arg="cache_seqlens", length_offset=4))
    assert ("seq-len-exceeds-table", (1,), 8 * 256 + 4) in [(v.check, v.index, v.value) for v in found]


def test_int64_table_values_past_int32_are_saturated_in_the_record():
    table = torch.randint(0, 30, (4, 5), dtype=torch.int64)
    table[2, 1] = 31
    assert_same(lambda: PageTable(table.clone(), "block_table", (Buffer("kv", 30),), 16,
                                  lengths=torch.full((4,), 80)))
    table[3, 4] = 2**40
    expected, got = both(lambda: PageTable(table.clone(), "block_table", (Buffer("kv", 30),), 16,
                                           lengths=torch.full((4,), 80)))
    assert plain(expected) == [("page-out-of-range", "block_table", (2, 1), 31, 30, 2)]
    assert plain(got) == plain(expected)  # the first offender is an exact int32 value


def test_lengths_alone():
    lengths = torch.tensor([5, -3, 400, 12, 900])
    found = assert_same(lambda: Lengths(lengths.clone(), "seq_lens", max_len=500, page_size=16, width=32,
                                        table_arg="block_table"))
    assert [(v.check, v.index, v.value) for v in found] == [
        ("negative-seq-len", (1,), -3), ("seq-len-exceeds-max", (4,), 900), ("seq-len-exceeds-table", (4,), 900)]


# -- CSR page lists --------------------------------------------------------------------------

def csr(rows=5, per_row=(0, 6), pages=80, page_size=16, spare=7, seed=0):
    """A valid CSR list as FlashInfer's tests build one (random pages, last_page_len in 1..ps,
    empty rows with 0), with ``spare`` stale entries past indptr[-1] (SGLang over-allocates)."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(per_row[0], per_row[1] + 1, (rows,), generator=gen)
    indptr = torch.zeros(rows + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(counts, 0)
    nnz = int(indptr[-1])
    indices = torch.randint(0, pages, (nnz + spare,), generator=gen, dtype=torch.int32)
    indices[nnz:] = torch.randint(-9, 10**6, (spare,), generator=gen, dtype=torch.int32)
    last = torch.where(counts > 0, torch.randint(1, page_size + 1, (rows,), generator=gen), 0).to(torch.int32)
    return indptr, indices, last


def csr_access(indptr, indices, last, pages=(("kv", 80),), page_size=16, writes=None):
    return CsrPages(indptr.clone(), indices.clone(), tuple(Buffer(*p) for p in pages),
                    last.clone() if last is not None else None, page_size, writes=writes)


def test_csr_valid_lists_and_planted_faults():
    indptr, indices, last = csr(rows=40, seed=3)
    assert assert_same(lambda: csr_access(indptr, indices, last)) == []
    nnz = int(indptr[-1])
    indices[nnz - 1] = 80          # the last live entry
    indices[int(indptr[7]) if indptr[8] > indptr[7] else 0] = -1
    last[2] = 17                   # past a 16-token page
    last[5] = -1
    found = assert_same(lambda: csr_access(indptr, indices, last, pages=(("k", 80), ("v", 60))))
    assert {v.check for v in found} == {"page-out-of-range", "negative-seq-len", "seq-len-exceeds-table"}


def test_csr_entries_past_the_end_are_never_read():
    indptr, indices, last = csr(rows=6, spare=50, seed=4)
    indices[int(indptr[-1]):] = 10**9
    assert assert_same(lambda: csr_access(indptr, indices, last)) == []


@pytest.mark.parametrize("fault", ["decreasing", "negative-start", "past-indices"])
def test_csr_bad_indptr_is_a_shape_mismatch_alone(fault):
    indptr, indices, last = csr(rows=8, per_row=(1, 5), seed=5)
    indices[0] = 10**6  # would be a page finding: a broken indptr hides it, as in the torch checks
    if fault == "decreasing":
        indptr[4] = indptr[3] - 1
    elif fault == "negative-start":
        indptr[0] = -2
    else:
        indptr[-1] = indices.numel() + 3
    found = assert_same(lambda: csr_access(indptr, indices, last))
    assert [v.check for v in found] == ["shape-mismatch"]


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 30), st.integers(0, 40), st.integers(0, 2**31 - 1), st.sampled_from([1, 16]),
       st.booleans())
def test_property_csr_both_paths_agree(rows, spare, seed, page_size, mutate):
    indptr, indices, last = csr(rows=rows, spare=spare, seed=seed, page_size=page_size)
    gen = torch.Generator().manual_seed(seed)
    nnz = int(indptr[-1])
    if mutate and nnz:
        where = int(torch.randint(0, nnz, (1,), generator=gen))
        indices[where] = [-7, 80, 2**31 - 1][where % 3]
        if rows > 1:
            last[where % rows] = [page_size + 1, -1][where % 2]
    found = assert_same(lambda: csr_access(indptr, indices, last, page_size=page_size))
    if not mutate or not nnz:
        assert found == []


# -- slot mappings ----------------------------------------------------------------------------

def test_slot_mapping_padding_and_faults():
    slots = torch.randint(0, 1000, (40,), dtype=torch.int64)
    slots[5] = -1          # padding: skipped
    slots[30:] = -1
    assert assert_same(lambda: Slots(slots.clone(), "slot_mapping", Buffer("key_cache", 1000))) == []
    slots[7] = 1000
    slots[33] = 5000       # past tokens=32: never read
    found = assert_same(lambda: Slots(slots.clone(), "slot_mapping", Buffer("key_cache", 1000), tokens=32))
    assert plain(found) == [("page-out-of-range", "slot_mapping", (7,), 1000, 1000, 1)]


# -- tokens written through a CSR list (append_paged_kv_cache) -------------------------------

def appended(rows=6, seed=0, page_size=16):
    indptr, indices, last = csr(rows=rows, per_row=(1, 4), seed=seed, page_size=page_size)
    counts = (indptr[1:] - indptr[:-1]).long()
    kv_len = (counts - 1) * page_size + last.long()
    batch = torch.repeat_interleave(torch.arange(rows), kv_len)
    positions = torch.cat([torch.arange(n) for n in kv_len.tolist()])
    return indptr, indices, last, batch.to(torch.int32), positions.to(torch.int32)


def test_writes_each_token_to_its_page():
    indptr, indices, last, batch, positions = appended(seed=7)
    indices[int(indptr[-1]):] = 10**6  # stale, never written
    access = lambda: csr_access(indptr, indices, last, writes=Writes(batch.clone(), positions.clone(),  # noqa
                                                                        batch.numel()))
    assert assert_same(access) == []
    indices[int(indptr[2])] = 80      # row 2's first page: its first token writes there
    batch[3] = 99                     # not a request of the batch
    positions[-1] = -4
    positions[0] = 10**5              # past its request's KV
    found = assert_same(access)
    assert [v.check for v in found] == ["shape-mismatch", "negative-seq-len", "seq-len-exceeds-table",
                                        "page-out-of-range"]
    assert found[-1].index == (2, 0) and "is WRITTEN there" in found[-1].message


def test_real_append_rule_both_paths():
    """flashinfer.page.append_paged_kv_cache's rule, through FlashInfer's real signature."""
    from tsan_paged.rules import flashinfer as fi_rules

    indptr, indices, last, batch, positions = appended(seed=9)
    nnz = batch.numel()
    kwargs = dict(append_key=torch.zeros(nnz, 2, 8), append_value=torch.zeros(nnz, 2, 8), batch_indices=batch,
                  positions=positions, paged_kv_cache=(torch.zeros(80, 16, 2, 8), torch.zeros(80, 16, 2, 8)),
                  kv_indices=indices, kv_indptr=indptr, kv_last_page_len=last)
    indices[int(indptr[1]) + 0] = 200
    bound = inspect.signature(flashinfer.page.append_paged_kv_cache).bind(**kwargs)
    bound.apply_defaults()
    results = []
    for interpret in (False, True):
        options = CheckOptions()
        options.device_interpret = interpret
        call = Call(fi_rules.APPEND_PAGED_KV, dict(bound.arguments), options)
        results.append([tuple(getattr(v, f) for f in FIELDS)
                        for v in engine.findings(fi_rules.append_paged_kv_cache(call), call)])
    assert results[0] == results[1]
    assert [r[:3] for r in results[0]] == [("page-out-of-range", "kv_indices", (1, 0))]


# -- guards per form ----------------------------------------------------------------------------

def errs():
    return device.err_mask(lambda check: CHECKS[check])


def test_csr_guard_rewrites_bad_live_entries_and_clamps_last_pages():
    indptr, indices, last = csr(rows=10, per_row=(1, 4), spare=5, seed=11)
    nnz = int(indptr[-1])
    indices[1] = 90
    indices[nnz:] = 10**6  # stale: untouched
    last[3] = 20
    last[4] = -2
    access = csr_access(indptr, indices, last)
    plan = device.plan_for(access)
    tensors = device.launch_tensors(access)
    device.run_interpreted(plan, tensors, action="guard", errs=errs())
    assert int(access.indices[1]) == 0 and bool((access.indices[nnz:] == 10**6).all())
    assert int(access.last_page_len[3]) == 16 and int(access.last_page_len[4]) == 0
    assert device.run_interpreted(plan, tensors) == []


def test_slot_guard_turns_bad_slots_into_padding():
    slots = torch.tensor([3, 1000, -1, 7, 4000], dtype=torch.int64)
    access = Slots(slots, "slot_mapping", Buffer("key_cache", 1000))
    plan = device.plan_for(access)
    device.run_interpreted(plan, device.launch_tensors(access), action="guard", errs=errs())
    assert slots.tolist() == [3, -1, -1, 7, -1]


def test_writes_have_no_safe_guard():
    indptr, indices, last, batch, positions = appended(seed=12)
    access = csr_access(indptr, indices, last, writes=Writes(batch, positions, batch.numel()))
    assert device.plan_for(access).guard is None


# -- the documented primitives describe on CUDA, compute on CPU --------------------------------

def test_primitives_compute_on_cpu():
    table = torch.tensor([[1, 2], [3, 40]], dtype=torch.int32)
    [v] = checks.check_pages_in_range(table, "t", 40, "pool", lambda: (None, None))
    assert (v.check, v.index) == ("page-out-of-range", (1, 1))
    assert checks.check_slots(torch.tensor([1, -1, 50]), 50, "cache")[0].index == (2,)
    indptr, indices, last = csr(rows=3, per_row=(1, 2), seed=1)
    assert checks.check_csr_pages(indptr, indices, last, 80, 16, "kv") == []
    assert checks.check_lengths(torch.tensor([3, -1]), "lens")[0].check == "negative-seq-len"


def test_tensors_on_two_devices_are_a_finding_not_a_launch():
    """A table on a GPU with lengths on the CPU (a TOML rule checks no devices): the kernel would
    read a host pointer. Reported as bad-device; the engine launches nothing (meta tensors stand
    in for the GPU here)."""
    table = torch.zeros(4, 8, dtype=torch.int32, device="meta")
    access = PageTable(table, "block_table", (Buffer("kv", 30),), 16, lengths=torch.full((4,), 80))
    [v] = engine._on_device(access, access.tensors(), engine.Settings(), "test::op", (), False)
    assert (v.check, v.arg) == ("bad-device", "block_table") and "cpu" in v.message and "meta" in v.message


def test_writes_with_a_last_page_len_of_the_wrong_shape_are_not_followed():
    """Both paths report the shape and stop: a written token's KV length needs last_page_len."""
    indptr, indices, last, batch, positions = appended(seed=13)
    found = assert_same(lambda: csr_access(indptr, indices, last[:-1],
                                           writes=Writes(batch.clone(), positions.clone(), batch.numel())),
                        launches=0)
    assert [(v.check, v.arg) for v in found] == [("shape-mismatch", "last_page_len")]
