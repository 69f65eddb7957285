"""The dispatcher catcher, proved with a real torch.library op with a real CPU kernel."""

import pytest
import torch

from paged_ops import OP, paged_gather_cpu, registry as op_registry
from tsan_paged import PagedSanitizer, PageTableViolation
from tsan_paged.registry import Registry, rule


def inputs(bad=None):
    kv_pages = torch.randn(10, 4, 3)
    table = torch.tensor([[3, 1, 7], [0, 9, 5]], dtype=torch.int32)
    seq_lens = torch.tensor([9, 5])
    if bad is not None:
        table[bad] = 10
    return kv_pages, table, seq_lens, 4


def dispatch_stack_depth():
    return torch._C._len_torch_dispatch_stack()


def test_valid_call_runs_the_real_kernel_unchanged():
    args = inputs()
    expected = paged_gather_cpu(*args)
    with PagedSanitizer(mode="raise", registry=op_registry) as san:
        out = torch.ops.tsan_test.paged_gather(*args)
    assert torch.equal(out, expected)
    assert san.reports == []


def test_live_fault_caught_before_the_kernel():
    with PagedSanitizer(mode="raise", registry=op_registry) as san:
        with pytest.raises(PageTableViolation) as info:
            torch.ops.tsan_test.paged_gather(*inputs(bad=(1, 1)))  # row 1 reads 2 pages
    v = info.value.violations[0]
    assert (v.op, v.check, v.index, v.value, v.bound) == (OP, "page-out-of-range", (1, 1), 10, 10)
    assert v.caller.startswith("tests/test_dispatch.py")
    assert len(san.reports) == 1


def test_keyword_arguments_bind_by_schema_name():
    kv_pages, table, seq_lens, ps = inputs(bad=(0, 2))
    with PagedSanitizer(mode="raise", registry=op_registry), pytest.raises(PageTableViolation) as info:
        torch.ops.tsan_test.paged_gather.default(kv_pages, table, seq_lens=seq_lens, page_size=ps)
    assert info.value.violations[0].index == (0, 2)


def test_log_mode_reports_then_runs_the_kernel():
    with PagedSanitizer(mode="log", registry=op_registry) as san:
        with pytest.raises(IndexError):  # the real CPU kernel reading page 10 of 10
            torch.ops.tsan_test.paged_gather(*inputs(bad=(1, 1)))
    assert [v.check for v in san.reports] == ["page-out-of-range"]


def test_dead_entry_is_a_warning():
    with PagedSanitizer(mode="raise", registry=op_registry) as san:
        torch.ops.tsan_test.paged_gather(*inputs(bad=(1, 2)))  # row 1 holds 5 tokens: 2 pages
    assert [(v.check, v.index) for v in san.reports] == [("dead-page-out-of-range", (1, 2))]


def test_no_dispatch_mode_and_no_aten_tax():
    """The op is caught by a kernel registered for it alone: no TorchDispatchMode at all."""
    before = dispatch_stack_depth()
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(OP, "BackendSelect")
    with PagedSanitizer(registry=op_registry) as san:
        assert dispatch_stack_depth() == before
        assert torch._C._dispatch_has_kernel_for_dispatch_key(OP, "BackendSelect")
        assert torch.add(torch.ones(2), 1).tolist() == [2.0, 2.0]  # aten ops untouched
        torch.ops.tsan_test.paged_gather(*inputs(bad=(1, 2)))
    assert [v.check for v in san.reports] == ["dead-page-out-of-range"]
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(OP, "BackendSelect")  # restored
    args = inputs()
    assert torch.equal(torch.ops.tsan_test.paged_gather(*args), paged_gather_cpu(*args))


def test_calls_from_other_threads_are_caught():
    import threading

    caught = []

    def worker():
        try:
            torch.ops.tsan_test.paged_gather(*inputs(bad=(0, 0)))
        except PageTableViolation as exc:
            caught.append(exc.violations[0].index)

    with PagedSanitizer(mode="raise", registry=op_registry):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
    assert caught == [(0, 0)]


def test_op_registered_after_the_sanitizer_started(tmp_path, monkeypatch):
    reg = Registry()

    @rule("tsan_late::gather", reads=("table",), registry=reg)
    def late_rule(call):
        from tsan_paged import checks
        return checks.check_pages_in_range(call["table"], "table", call["pages"].shape[0], "pages", lambda: (None, None))

    (tmp_path / "late_ops.py").write_text(
        "import torch\n"
        "lib = torch.library.Library('tsan_late', 'DEF')\n"
        "lib.define('gather(Tensor pages, Tensor table) -> Tensor')\n"
        "lib.impl('gather', lambda pages, table: pages[table.long()], 'CPU')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with PagedSanitizer(mode="raise", registry=reg) as san:
        assert san.reports == []  # its library is not loaded: pending, like an unimported module
        import late_ops  # noqa: F401  (registers the op; the import hook registers the check)

        with pytest.raises(PageTableViolation) as info:
            torch.ops.tsan_late.gather(torch.randn(4, 2), torch.tensor([[0, 4]]))
    assert info.value.violations[0].index == (0, 1)


def test_ops_with_their_own_backend_select_kernel_use_the_mode():
    lib = torch.library.Library("tsan_bs", "DEF")
    lib.define("make(Tensor table, int pages) -> Tensor")
    lib.impl("make", lambda table, pages: table.clone(), "CPU")
    below = torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.BackendSelect)
    lib.impl("make", lambda ks, table, pages: torch.ops.tsan_bs.make.default.redispatch(ks & below, table, pages),
             "BackendSelect", with_keyset=True)
    reg = Registry()

    @rule("tsan_bs::make", registry=reg)
    def make_rule(call):
        from tsan_paged import checks
        return checks.check_pages_in_range(call["table"], "table", call["pages"], "pages", lambda: (None, None))

    before = dispatch_stack_depth()
    with PagedSanitizer(mode="raise", registry=reg) as san:
        assert dispatch_stack_depth() == before + 1  # the fallback TorchDispatchMode
        with pytest.raises(PageTableViolation):
            torch.ops.tsan_bs.make(torch.tensor([[1, 5]]), 5)
        lib.impl("make", lambda table, pages: table.clone(), "Meta")
        torch.ops.tsan_bs.make(torch.tensor([[1, 5]], device="meta"), 5)  # no values: not checked
        assert len(san.reports) == 1 and sum(san.checked.values()) == 1, (san.reports, san.checked)
    assert dispatch_stack_depth() == before
    lib._destroy()


def test_unregistered_op_and_schema_drift_are_reported():
    reg = Registry()

    @rule("tsan_test::no_such_op", registry=reg)
    def missing(call):
        return []

    @rule(OP, reads=("page_table",), registry=reg, name="drifted")
    def drifted(call):
        raise AssertionError("must not run")

    with PagedSanitizer(mode="raise", registry=reg) as san:
        out = torch.ops.tsan_test.paged_gather(*inputs())  # the drifted rule must not run
    assert out.shape == (2, 12, 3)  # the kernel ran, untouched by the unbound rules
    checks = [(v.check, v.arg) for v in san.reports]
    assert ("rule-unbound", "tsan_test::no_such_op") in checks
    assert ("rule-unbound", OP) in checks
    assert "page_table" in [v for v in san.reports if v.arg == OP][0].message
