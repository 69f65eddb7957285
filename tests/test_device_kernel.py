"""The device check kernel (tsan_paged/device.py) on CPU, under Triton's interpreter.

The same Triton kernel the GPU runs is run here on CPU tensors (``TRITON_INTERPRET=1``), through
the real rule (the call is bound from FlashInfer's real signature) and compared with the torch
implementation of the checks: same findings, same check ids, indices, values, bounds, counts
and messages. Guard rewriting and the sticky ring records are checked entry by entry.
"""

import inspect
import os

import pytest
import torch

from batches import make_batch

triton = pytest.importorskip("triton", reason="Triton is not installed: the device kernel cannot be built or "
                                              "interpreted here")

import flashinfer.decode  # noqa: E402

from tsan_paged import device, engine  # noqa: E402
from tsan_paged import kernels as K  # noqa: E402
from tsan_paged.access import Buffer, PageTable  # noqa: E402
from tsan_paged.registry import Call, CheckOptions  # noqa: E402
from tsan_paged.rules import flashinfer as fi_rules  # noqa: E402

SIG = inspect.signature(flashinfer.decode.trtllm_batch_decode_with_kv_cache)
@pytest.fixture(autouse=True)
def triton_interpret(monkeypatch):
    """TRITON_INTERPRET=1 for each test, restored after it (never process-wide: SGLang's own Triton
    kernels, imported by other tests, would turn into interpreted ones). The kernel is built as an
    InterpretedFunction explicitly, so it runs whether triton was imported before this or not;
    it uses tl.reduce with Triton's standard combine functions rather than tl.sum / tl.max,
    which the interpreter can only call when TRITON_INTERPRET=1 was set before triton's import."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


FIELDS = ("check", "arg", "index", "value", "bound", "count", "message", "severity")


def bind(kwargs):
    bound = SIG.bind(**kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def rule_findings(kwargs, options):
    call = Call(fi_rules.TRTLLM_DECODE, bind(kwargs), options)
    return engine.findings(fi_rules.trtllm_batch_decode_with_kv_cache(call), call)


def torch_findings(kwargs, capability=None):
    return rule_findings(kwargs, CheckOptions(cuda_capability=capability))


def kernel_findings(kwargs, capability=None):
    options = CheckOptions(cuda_capability=capability)
    options.device_interpret = True
    return rule_findings(kwargs, options)


def assert_same(kwargs):
    expected = torch_findings(kwargs)
    got = kernel_findings(kwargs)
    assert [tuple(getattr(v, f) for f in FIELDS) for v in got] == [tuple(getattr(v, f) for f in FIELDS) for v in expected]
    for g, e in zip(got, expected):
        assert g.examples == e.examples[:1]  # the device record keeps the first offending entry
    return got


def test_interpreter_really_runs_the_kernel():
    """Not vacuous: a planted entry is found by the interpreted kernel with its exact index."""
    batch = make_batch(batch=3, width=8, page_size=16, num_pages=50, lengths=[100, 16, 128])
    batch["block_tables"][2, 7] = 50
    got = kernel_findings(batch)
    assert [(v.check, v.index, v.value, v.bound, v.count) for v in got] == [("page-out-of-range", (2, 7), 50, 50, 1)]
    assert got[0].message.endswith("entry is read by the kernel")


def test_seed_case_one_past_the_end():
    lengths = torch.full((8,), 127 * 64 + 5, dtype=torch.int32)
    batch = make_batch(batch=8, width=128, page_size=64, num_pages=8657, lengths=lengths, seed=3)
    batch["block_tables"][5, 127] = 8657
    got = assert_same(batch)
    assert [(v.check, v.index, v.value, v.bound) for v in got] == [("page-out-of-range", (5, 127), 8657, 8657)]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_random_faults_match_torch(seed, layout):
    gen = torch.Generator().manual_seed(100 + seed)
    batch = make_batch(batch=5 + seed, width=9 + 3 * seed, page_size=16, num_pages=300, stale="garbage",
                       seed=seed, layout=layout)
    table, lens = batch["block_tables"], batch["seq_lens"]
    for _ in range(4):
        r = int(torch.randint(0, table.shape[0], (1,), generator=gen))
        c = int(torch.randint(0, table.shape[1], (1,), generator=gen))
        table[r, c] = [-1, 300, 301, 2**31 - 1][int(torch.randint(0, 4, (1,), generator=gen))]
    if seed % 2:
        lens[seed % lens.shape[0]] = table.shape[1] * 16 + 1 + seed  # past the table (and max_seq_len)
    if seed % 3 == 0:
        lens[0] = -7
    found = assert_same(batch)
    assert found  # every seed plants something


# Launch shapes: (entries per program, slow-path tile, fast-pass load step). The GPU cost of the kernel
# depends on them (docs/gpu.md); its findings must not. The defaults are the third.
SHAPES = [(16, 16, 128), (64, 32, 128), (1024, 128, 1024), (8192, 2048, 8192)]


@pytest.mark.parametrize("entries,slow_tile,fblock_max", SHAPES)
@pytest.mark.parametrize("seed", range(3))
def test_launch_shapes_find_the_same(monkeypatch, entries, slow_tile, fblock_max, seed):
    monkeypatch.setattr(device, "PROGRAM_ENTRIES", entries)
    monkeypatch.setattr(device, "SLOW_TILE", slow_tile)
    monkeypatch.setattr(device, "FBLOCK_MAX", fblock_max)
    monkeypatch.setattr(device, "_PLANS", {})
    monkeypatch.setattr(fi_rules, "_FORMS", {})
    gen = torch.Generator().manual_seed(200 + seed)
    batch = make_batch(batch=7 + 11 * seed, width=5 + 60 * seed, page_size=16, num_pages=500, stale="garbage",
                       seed=40 + seed)
    table, lens = batch["block_tables"], batch["seq_lens"]
    for _ in range(5):
        r = int(torch.randint(0, table.shape[0], (1,), generator=gen))
        c = int(torch.randint(0, table.shape[1], (1,), generator=gen))
        table[r, c] = [-1, 500, 2**31 - 1][int(torch.randint(0, 3, (1,), generator=gen))]
    lens[-1] = table.shape[1] * 16 + 3  # past the table: the whole last row is read
    table[-1, -1] = 500
    plan = device.plan_for(PageTable(table, "block_tables", (Buffer("kv_cache", 500),), 16, lengths=lens,
                                     max_len=batch["max_seq_len"]))
    block_r, sub_r, block_w, lblock, fblock = plan.block[:5]
    assert fblock <= fblock_max and sub_r * block_w <= max(slow_tile, 16)
    assert plan.grid > 1 or entries >= table.numel()
    found = assert_same(batch)
    assert {v.check for v in found} >= {"page-out-of-range", "seq-len-exceeds-table"}


def test_wide_table_several_column_blocks():
    batch = make_batch(batch=9, width=1100, page_size=16, num_pages=20000, seed=21)
    batch["block_tables"][8, 1099] = 20000
    batch["block_tables"][0, 600] = -1
    batch["seq_lens"][8] = 1100 * 16
    batch["seq_lens"][0] = 601 * 16
    got = assert_same(batch)
    assert [(v.check, v.index, v.count) for v in got if v.check == "page-out-of-range"] == [
        ("page-out-of-range", (0, 600), 2)]


def test_valid_batch_no_findings():
    batch = make_batch(batch=16, width=40, page_size=16, num_pages=1000, seed=9)
    assert kernel_findings(batch) == [] == torch_findings(batch)


def test_v_side_fault_with_fewer_v_pages():
    batch = make_batch(batch=4, width=16, page_size=16, num_pages=200, v_pages=120, lengths=[250, 30, 64, 1])
    batch["block_tables"][1, 1] = 150  # a K page, not a V page
    batch["block_tables"][2, 3] = 130
    got = assert_same(batch)
    v_side = [(v.check, v.index, v.value, v.bound) for v in got]
    assert v_side == [("page-out-of-range", (1, 1), 150, 120)]
    assert "kv_cache[1] has 120 pages" in got[0].message


@pytest.mark.parametrize("kv_form", ["single2", "single1"])
def test_single_tensor_caches(kv_form):
    batch = make_batch(batch=4, width=12, page_size=16, num_pages=64, kv_form=kv_form, stale="garbage", seed=5)
    batch["block_tables"][3, 0] = 64
    assert ("page-out-of-range", (3, 0)) in [(v.check, v.index) for v in assert_same(batch)]


def test_kv_split_table():
    batch = make_batch(batch=4, width=10, page_size=16, num_pages=90, v_pages=70, shared=False, stale="garbage", seed=2)
    batch["block_tables"][2, 1, 0] = 80  # a V id past V's pages
    batch["block_tables"][1, 0, 0] = -1
    got = assert_same(batch)
    assert ("page-out-of-range", (2, 1, 0), 80, 70) in [(v.check, v.index, v.value, v.bound) for v in got]
    assert ("page-out-of-range", (1, 0, 0), -1, 90) in [(v.check, v.index, v.value, v.bound) for v in got]


@pytest.mark.parametrize("window_left,q_len,page_size", [(127, 1, 16), (500, 3, 16), (63, 2, 64), (1000, 1, 32)])
def test_sliding_window_region(window_left, q_len, page_size):
    width = 64
    lengths = [width * page_size - 3, 70, 1500, 129, 900]
    batch = make_batch(batch=5, width=width, page_size=page_size, num_pages=500, lengths=lengths, q_len=q_len,
                       stale="garbage", seed=7)
    batch["window_left"] = window_left
    table = batch["block_tables"]
    table[0, :3] = 500  # before the window: dead (or live inside the first loaded tile)
    table[2, 1] = -1
    got = assert_same(batch)
    assert any(v.check == "dead-page-out-of-range" for v in got)


def test_sliding_window_tile_follows_the_xqa_kernel():
    """fp8 KV on sm90 runs mha_sm90.cu (64-token tiles), else 256: the device plan uses the same tile."""
    batch = make_batch(batch=2, width=40, page_size=16, num_pages=500, lengths=[600, 600], seed=3)
    batch["kv_cache"] = tuple(t.to(torch.float8_e4m3fn) for t in batch["kv_cache"])
    batch["window_left"] = 99  # S = 500 skipped tokens: first page 28 (64-token tiles) or 16 (256)
    batch["block_tables"][0, 27] = 10**6
    for capability, expected in (((9, 0), "dead-page-out-of-range"), (None, "page-out-of-range")):
        expect = torch_findings(batch, capability)
        got = kernel_findings(batch, capability)
        assert [(v.check, v.index) for v in got] == [(v.check, v.index) for v in expect] == [(expected, (0, 27))]


def test_trtllm_gen_whole_row_is_read():
    batch = make_batch(batch=3, width=8, page_size=16, num_pages=40, lengths=[16, 17, 100], seed=1)
    batch["block_tables"][0, 7] = 40  # past row 0's length: dead for xqa, read by trtllm-gen
    batch["backend"] = "trtllm-gen"
    got = assert_same(batch)
    assert [(v.check, v.index) for v in got] == [("page-out-of-range", (0, 7))]
    batch["backend"] = "xqa"
    assert [(v.check, v.index) for v in assert_same(batch)] == [("dead-page-out-of-range", (0, 7))]


def test_uint32_lengths():
    batch = make_batch(batch=4, width=8, page_size=16, num_pages=40, lengths=[16, 17, 90, 128], seed=4)
    batch["seq_lens"] = batch["seq_lens"].to(torch.uint32)
    batch["block_tables"][2, 6] = 40
    batch["block_tables"][3, 7] = 41
    got = assert_same(batch)
    assert [(v.check, v.index) for v in got] == [("page-out-of-range", (3, 7)), ("dead-page-out-of-range", (2, 6))]


def test_block_sparse_table():
    heads, batch, width, page_size = 2, 3, 6, 16
    kw = make_batch(batch=batch, width=width, page_size=page_size, num_pages=30, seed=8, lengths=[40, 90, 16])
    table = torch.randint(0, 30, (heads, batch, width), dtype=torch.int32)
    table[1, 2, 0] = 30
    table[0, 1, 5] = 99  # row (0, 1) reads ceil(90 / 16) = 6 pages: live
    table[0, 0, 4] = -3  # row (0, 0) reads 3 pages: dead
    kw.update(block_tables=table.contiguous(), seq_lens=torch.tensor([[40, 90, 16], [40, 90, 16]], dtype=torch.int32),
              enable_block_sparse_attention=True)
    got = assert_same(kw)
    assert [(v.check, v.index, v.value, v.count) for v in got] == [("page-out-of-range", (0, 1, 5), 99, 2),
                                                                   ("dead-page-out-of-range", (0, 0, 4), -3, 1)]


def _access(batch):
    table = batch["block_tables"]
    return PageTable(table, "block_tables", (Buffer("kv_cache", 100),), 16, lengths=batch["seq_lens"],
                     max_len=batch["max_seq_len"], guard=-1)


def severity(check):
    from tsan_paged.report import CHECKS

    return CHECKS[check]


def test_guard_rewrites_exactly_the_read_entries():
    batch = make_batch(batch=150, width=20, page_size=16, num_pages=100, stale="garbage", seed=11)
    table, lens = batch["block_tables"], batch["seq_lens"]
    table[3, 0] = 100
    table[139, 2] = -5
    lens[7] = 20 * 16 + 9  # past the table: every column of row 7 is read, and the length is clamped
    lens[8] = -2
    access = _access(batch)
    plan = device.plan_for(access)
    assert plan.grid > 1  # several programs: exercises the last-program-writes-the-record path
    ends = ((lens.clamp(min=0).long() + 15) // 16).clamp(max=20)
    live = torch.arange(20) < ends.unsqueeze(1)
    bad = (table < 0) | (table >= 100)
    expected_table = torch.where(live & bad, torch.full_like(table, -1), table)
    expected_lens = lens.clone()
    expected_lens[7] = 20 * 16
    expected_lens[8] = 0
    slot = torch.zeros(K.SLOT_WORDS, dtype=torch.int64)
    found = device.run_interpreted(plan, device.launch_tensors(access), action="guard",
                                   errs=device.err_mask(severity), slot=slot)
    assert torch.equal(table, expected_table)  # dead stale entries untouched
    assert torch.equal(lens, expected_lens)
    assert [(v.check, v.index, v.value) for v in found if v.severity == "error"][:3] == [
        ("negative-seq-len", (8,), -2), ("seq-len-exceeds-max", (7,), 329), ("seq-len-exceeds-table", (7,), 329)]
    assert slot[K.TICKET] == 0 and slot[K.FOUND_MASK] == 0  # scratch reset for the next launch
    # Guarded, every read entry that was bad is now xqa's "no page" -1 and the lengths fit.
    again = {v.check: v for v in device.run_interpreted(plan, device.launch_tensors(access))}
    assert set(again) == {"page-out-of-range", "dead-page-out-of-range"}
    assert again["page-out-of-range"].count == int((live & bad).sum()) and again["page-out-of-range"].value == -1


def test_sticky_records_keep_the_first_finding_and_count_calls():
    batch = make_batch(batch=6, width=8, page_size=16, num_pages=100, lengths=[128] * 6, seed=12)
    table = batch["block_tables"]
    access = _access(batch)
    plan = device.plan_for(access)
    slot = torch.zeros(K.SLOT_WORDS, dtype=torch.int64)
    device.run_interpreted(plan, device.launch_tensors(access), sticky=1, slot=slot)  # clean
    table[4, 2] = 100
    device.run_interpreted(plan, device.launch_tensors(access), sticky=1, slot=slot)
    table[1, 1] = 101
    device.run_interpreted(plan, device.launch_tensors(access), sticky=1, slot=slot)
    words = slot.tolist()
    assert words[K.CALLS] == 3 and words[K.HIT_CALLS] == 2  # calls, calls with a finding
    found = plan.decode(plan, words)
    assert [(v.check, v.index, v.value, v.count) for v in found] == [("page-out-of-range", (4, 2), 100, 1)]
    # Already reported hits are not reported again.
    hits = [words[K.RECORD + K.REC * c] for c in range(K.NCHECKS)]
    assert hits[K.PAGE0] == 2
    assert plan.decode(plan, words, hits) == []


def test_bad_tuning_knobs_warn_and_keep_the_defaults():
    """TSAN_PAGED=... imports tsan_paged into every process: a bad knob must not make the import fail."""
    import subprocess
    import sys

    env = dict(os.environ, TSAN_PAGED_NUM_WARPS="3", TSAN_PAGED_PROGRAM_ENTRIES="many")
    out = subprocess.run([sys.executable, "-c", "from tsan_paged import device; print(device.NUM_WARPS, "
                          "device.PROGRAM_ENTRIES)"], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["4", "1024"]
    assert "TSAN_PAGED_NUM_WARPS='3' is not 1, 2, 4, 8 or 16; using 4" in out.stderr
    assert "TSAN_PAGED_PROGRAM_ENTRIES='many' is not an integer from 16 to 2**20 - 1; using 1024" in out.stderr
    env["TSAN_PAGED_NUM_WARPS"], env["TSAN_PAGED_PROGRAM_ENTRIES"] = "8", "4096"
    out = subprocess.run([sys.executable, "-c", "from tsan_paged import device; print(device.NUM_WARPS, "
                          "device.PROGRAM_ENTRIES)"], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["8", "4096"] and "tsan_paged:" not in out.stderr


# -- the decode rule's memo of call forms (rules/flashinfer.py _DEVICE_PLANS) -----------------------

def _variants():
    """(name, change to a clean batch) pairs: each changes what the host analysis reads."""
    def wider(b):  # a 7th column, read by row 0 and bad there
        b["block_tables"] = torch.cat([b["block_tables"], torch.full_like(b["block_tables"][:, :1], 100)], dim=1)
        b["seq_lens"] = b["seq_lens"].clone()
        b["seq_lens"][0] = 6 * 64 + 10

    def strided(b):
        t = b["block_tables"]
        b["block_tables"] = torch.cat([t, t], dim=1)[:, :t.shape[1]]  # same shape, not contiguous

    def int64_lengths(b):
        b["seq_lens"] = b["seq_lens"].long()

    def fewer_pages(b):
        k, v = b["kv_cache"]
        b["kv_cache"] = (k[:40], v[:40])

    def query_rows(b):
        b["query"] = b["query"][:-1]

    def layout(b):
        b["kv_layout"] = "NHD"

    def window(b):  # row 0 (380 tokens) skips one 256-token tile: columns 0-3 become dead
        b["window_left"] = 20
        b["block_tables"][0, 0] = 100

    def short_max(b):
        b["max_seq_len"] = 17

    def fault(b):
        b["block_tables"][1, 0] = 100

    return [(f.__name__, f) for f in (wider, strided, int64_lengths, fewer_pages, query_rows, layout, window,
                                      short_max, fault)]


@pytest.mark.parametrize("name,change", _variants())
def test_call_form_memo_never_changes_findings(monkeypatch, name, change):
    """A clean call stores its form; a call that differs in anything the analysis reads gets the
    findings a fresh analysis gets (values, as in ``fault``, are read by the kernel on every call)."""
    monkeypatch.setattr(fi_rules, "_FORMS", {})

    def findings(kwargs):
        return [tuple(getattr(v, f) for f in FIELDS) for v in kernel_findings(kwargs)]

    base = make_batch(batch=4, width=6, page_size=64, num_pages=100, lengths=[380, 64, 200, 300], seed=31)
    assert findings(base) == [] and len(fi_rules._FORMS) == 1
    changed = dict(base, block_tables=base["block_tables"].clone())
    change(changed)
    with_memo = findings(changed)
    monkeypatch.setattr(fi_rules, "_FORMS", {})
    assert with_memo == findings(changed)
    assert with_memo  # every variant changes what is found (or the test would prove nothing)


def test_call_form_memo_skips_the_analysis(monkeypatch):
    monkeypatch.setattr(fi_rules, "_FORMS", {})
    analysed = []
    split = fi_rules.split_kv_cache
    monkeypatch.setattr(fi_rules, "split_kv_cache", lambda *a: analysed.append(1) or split(*a))
    options = CheckOptions()
    options.device_interpret = True
    batch = make_batch(batch=3, width=5, page_size=16, num_pages=60, lengths=[70, 16, 33], seed=32)
    for _ in range(3):
        assert rule_findings(batch, options) == []
    assert len(analysed) == 1
    options.disabled = frozenset()  # duplicate-page on (a host check): analysed again
    batch["block_tables"][0, 1] = batch["block_tables"][0, 0]
    found = rule_findings(batch, options)
    assert [v.check for v in found] == ["duplicate-page"] and len(analysed) == 2
