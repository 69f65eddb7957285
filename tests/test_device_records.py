"""Device records a write garbled are reported as corrupted, never decoded (issue 20, defect 3).

In log mode an ``append_paged_kv_cache`` with a page id past the cache writes its tokens past the
cache: where the sanitizer's device records lay, it left bf16 data that decoded as
``seq-len-exceeds-table kv_last_page_len[2147483647] = -1`` and
``page-out-of-range ... (row 1039482689, page 1057341216) = 1082441846`` with 4.5e18 offending
entries. The records here are written by the real check kernel (under Triton's interpreter) for
the real ``append_paged_kv_cache`` rule, then overwritten with the data such a write stores.
(Where the records of such a write live on a GPU, out of its reach: tests/gpu/append_child.py.)
"""

import inspect

import pytest
import torch
from hypothesis import given, settings, strategies as st

import flashinfer.page

from test_flashinfer_more import append_args
from tsan_paged import device, engine
from tsan_paged import kernels as K
from tsan_paged.access import Buffer, CsrPages, PageTable
from tsan_paged.registry import Call, CheckOptions
from tsan_paged.rules import flashinfer as fi_rules

pytest.importorskip("triton", reason="Triton is not installed: the device kernels cannot be interpreted here")


@pytest.fixture(autouse=True)
def triton_interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def append_access(args):
    """The access the real rule describes for a real ``append_paged_kv_cache`` call."""
    bound = inspect.signature(flashinfer.page.append_paged_kv_cache).bind(**args)
    bound.apply_defaults()
    call = Call(fi_rules.APPEND_PAGED_KV, dict(bound.arguments), CheckOptions())
    [access] = [a for a in fi_rules.append_paged_kv_cache(call) if isinstance(a, CsrPages)]
    return access


def seed_fault_record():
    """The record a log-mode replay leaves: the seed's fault (a page id equal to the page count)
    in the page list an append writes through, found by the check kernel (sticky, as deferred)."""
    args = append_args()
    args["append_key"] = torch.randn_like(args["append_key"])  # what the append writes: K data
    args["kv_indices"][6] = 40  # row 3's first page, of a 40-page cache: its tokens 0..15 are written there
    access = append_access(args)
    plan = device.plan_for(access)
    slot = torch.zeros(K.SLOT_WORDS, dtype=torch.int64)
    found = device.run_interpreted(plan, device.launch_tensors(access), sticky=1, slot=slot)
    assert [(v.check, v.index, v.value, v.bound) for v in found] == [("page-out-of-range", (3, 0), 40, 40)]
    return plan, slot, args["append_key"]


RECORD_BYTES = K.RECORD * 8
WHERE = {  # bytes of the slot the written tokens land on: (start, stop)
    "the whole slot": (0, K.SLOT_WORDS * 8),
    "one token's K row over the records": (RECORD_BYTES, RECORD_BYTES + 256),
    "the found check's record": (RECORD_BYTES + 8 * K.REC * K.PAGE0, RECORD_BYTES + 8 * K.REC * (K.PAGE0 + 1)),
    "its count alone": (RECORD_BYTES + 8 * (K.REC * K.PAGE0 + 1), RECORD_BYTES + 8 * (K.REC * K.PAGE0 + 2)),
    "the last check's record": (RECORD_BYTES + 8 * K.REC * (K.NCHECKS - 1), RECORD_BYTES + 8 * K.REC * K.NCHECKS),
}


@pytest.mark.parametrize("where", list(WHERE))
def test_records_overwritten_by_the_appended_data_are_reported_corrupted(where):
    plan, slot, data = seed_fault_record()
    start, stop = WHERE[where]
    raw = slot.view(torch.uint8)
    written = data.reshape(-1).view(torch.uint8)
    raw[start:stop] = written[:stop - start]
    [v] = device.decode(plan, slot.tolist())
    assert (v.check, v.severity, v.arg, v.index) == ("device-records-corrupted", "error", "kv_indices", None)
    assert "device memory was overwritten" in v.message and "not decoded" in v.message


def test_the_issues_garbage_is_refused():
    """The two records the issue saw decoded, as a kernel cannot have written them."""
    plan, slot, _ = seed_fault_record()
    words = slot.tolist()
    over = K.RECORD + K.REC * K.OVER_TABLE  # kv_last_page_len[2147483647] = -1 (4 rows)
    words[over:over + K.REC] = [1, 1, K.BIG - ((2**31 - 1) << 32 | 0xFFFFFFFF), 16, 0]
    assert "check 6 (seq-len-exceeds-table)" in device.corrupted(plan, words)
    words = slot.tolist()
    page = K.RECORD + K.REC * K.PAGE0  # 4.5e18 entries at (row 1039482689, page 1057341216) = 1082441846
    words[page:page + K.REC] = [1, 4_500_000_000_000_000_000, K.BIG - (5 << 32 | 1082441846), 40,
                                1039482689 << 32 | 1057341216]
    assert "4500000000000000000 offending entries" in device.corrupted(plan, words)


def test_a_corrupted_entry_is_reported_once_then_not_decoded():
    plan, slot, data = seed_fault_record()
    entry = device.Entry(slot=1, plan=plan, op="flashinfer.page.append_paged_kv_cache", caller="here", stack=(),
                         sink=lambda: None, captured=True)
    assert [v.check for v in device.entry_findings(entry, slot.tolist())] == ["page-out-of-range"]
    assert device.entry_findings(entry, slot.tolist()) == []  # nothing new
    slot.view(torch.uint8)[RECORD_BYTES:RECORD_BYTES + 256] = data.reshape(-1).view(torch.uint8)[:256]
    assert [v.check for v in device.entry_findings(entry, slot.tolist())] == ["device-records-corrupted"]
    assert device.entry_findings(entry, slot.tolist()) == [] and entry.corrupt


def test_the_shared_sync_slot_keeps_other_plans_records():
    """Slot 0 (the sync path, not sticky) serves every plan: the records of checks another kernel
    wrote there (a write's token checks) are not this plan's, and not corruption."""
    args = append_args()
    args["batch_indices"][99] = -1  # a token of no request: a token check's record (the dense kernel has none)
    access = append_access(args)
    slot = torch.zeros(K.SLOT_WORDS, dtype=torch.int64)
    found = device.run_interpreted(device.plan_for(access), device.launch_tensors(access), sticky=0, slot=slot)
    assert [(v.check, v.index) for v in found] == [("shape-mismatch", (99,))]
    table = torch.zeros(4, 8, dtype=torch.int32)
    table[2, 5] = 30
    access = PageTable(table, "block_tables", (Buffer("kv", 30),), 16, lengths=torch.full((4,), 128, dtype=torch.int32))
    dense = device.plan_for(access)
    found = device.run_interpreted(dense, device.launch_tensors(access), sticky=0, slot=slot)
    assert [(v.check, v.index) for v in found] == [("page-out-of-range", (2, 5))]
    assert "never writes" in device.corrupted(dense, slot.tolist(), sticky=True)  # in a call site's own slot


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**16), st.lists(st.tuples(st.integers(0, 3), st.integers(0, 7), st.integers(-5, 60)),
                                       max_size=6), st.integers(1, 3))
def test_records_of_real_findings_are_never_refused(seed, faults, launches):
    """Any faults, any number of sticky launches over one slot: the kernel's own records pass."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randint(0, 40, (4, 8), generator=gen, dtype=torch.int32)
    lengths = torch.randint(-3, 8 * 16 + 20, (4,), generator=gen, dtype=torch.int32)
    slot = torch.zeros(K.SLOT_WORDS, dtype=torch.int64)
    for i in range(launches):
        for row, col, value in faults[i::launches]:
            table[row, col] = value
        access = PageTable(table.clone(), "block_tables", (Buffer("k", 40), Buffer("v", 33)), 16, lengths=lengths,
                           max_len=100)
        plan = device.plan_for(access)
        device.run_interpreted(plan, device.launch_tensors(access), sticky=1, slot=slot)
        assert device.corrupted(plan, slot.tolist()) is None


def test_a_corrupted_record_is_what_the_engine_reports():
    """Through the engine's interpreted path (a rule's access): a record the kernel wrote is
    decoded; decoding goes through the check for corruption (no second decoder)."""
    options = CheckOptions()
    options.device_interpret = True
    args = append_args()
    args["kv_indices"][6] = 40
    access = append_access(args)
    found = engine.findings([access], Call("test::op", {}, options))
    assert [(v.check, v.index, v.value) for v in found] == [("page-out-of-range", (3, 0), 40)]
