"""Checked calls inside ``torch.compile``'d code (``tsan_paged/compiled.py``): both catchers,
default and ``fullgraph=True``, ``log`` and ``raise``, on CPU with inductor.

A Python entry point (``paged_kernels.paged_decode``, a TOML rule of the user's) is checked by an op
the wrapper puts into the graph; a dispatcher op (``tsan_test::paged_gather``) by the dispatch
catcher as the compiled graph calls it. Either way the check runs at every run of the compiled
graph (a table made bad after compiling is found), the compile has no graph break, and the
sanitizer never makes the user's compile fail.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import paged_kernels
import paged_ops
from tsan_paged import PagedSanitizer, PageTableViolation
from tsan_paged.access import Buffer, Slots
from tsan_paged.registry import Registry, rule

PYTHON_RULE = {"rule": [{"target": "paged_kernels:paged_decode", "table": "block_table", "lengths": "seq_lens",
                         "buffers": ["kv_cache"], "page_size": "kv_cache.shape[1]"}]}
PAGES, PAGE_SIZE, DIM = 10, 4, 8


def inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, DIM, generator=g)
    kv = torch.randn(PAGES, PAGE_SIZE, DIM, generator=g)
    table = torch.tensor([[1, 2, 3], [4, 5, 99]], dtype=torch.int32)  # 99: past row 1's 5 tokens (dead)
    lengths = torch.tensor([9, 5], dtype=torch.int32)
    return q, kv, table, lengths


def python_model(q, kv, table, lengths):
    return paged_kernels.paged_decode(q * 2, kv, table, lengths) + 1


def op_model(q, kv, table, lengths):
    return torch.ops.tsan_test.paged_gather(kv, table, lengths, PAGE_SIZE).sum(-1) * 2


CASES = {"python": (python_model, dict(config=PYTHON_RULE), "paged_kernels:paged_decode"),
         "dispatcher": (op_model, dict(registry=paged_ops.registry), paged_ops.OP)}
FULLGRAPH = pytest.mark.parametrize("fullgraph", [False, True], ids=["default", "fullgraph"])


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def calls(san, target) -> int:
    return sum(n for (t, _), n in san.checked.items() if t == target)


@FULLGRAPH
@pytest.mark.parametrize("catcher", CASES)
def test_valid_calls_are_checked_at_every_run(catcher, fullgraph):
    model, sanitizer_args, target = CASES[catcher]
    q, kv, table, lengths = inputs()
    reference = model(q, kv, table, lengths)
    with PagedSanitizer(mode="log", **sanitizer_args) as san:
        compiled = torch.compile(model, fullgraph=fullgraph)
        for _ in range(3):
            torch.testing.assert_close(compiled(q, kv, table, lengths), reference)
    assert [v for v in san.reports if v.severity == "error"] == []
    assert calls(san, target) == 3, san.checked
    assert not counters["graph_break"], dict(counters["graph_break"])


@FULLGRAPH
@pytest.mark.parametrize("catcher", CASES)
def test_fault_planted_after_compiling_is_found_in_log_mode(catcher, fullgraph):
    model, sanitizer_args, target = CASES[catcher]
    q, kv, table, lengths = inputs()
    with PagedSanitizer(mode="log", **sanitizer_args) as san:
        compiled = torch.compile(model, fullgraph=fullgraph)
        compiled(q, kv, table, lengths)
        table[1, 1] = PAGES  # the seed's one past the end, in a column row 1 reads
        if catcher == "dispatcher":
            with pytest.raises(IndexError):  # log mode: the op's own CPU kernel runs after the report
                compiled(q, kv, table, lengths)
        else:
            compiled(q, kv, table, lengths)  # read as the nearest page: silently wrong
    [finding] = [v for v in san.reports if v.severity == "error"]
    assert (finding.op, finding.check, finding.arg, finding.index, finding.value, finding.bound) == (
        target, "page-out-of-range", "block_table", (1, 1), PAGES, PAGES)
    assert finding.caller.startswith("tests/test_compile.py:"), finding.caller  # the model's line
    assert calls(san, target) == 2 and not counters["graph_break"]


@FULLGRAPH
@pytest.mark.parametrize("catcher", CASES)
def test_raise_mode_raises_from_the_compiled_call_before_the_kernel(catcher, fullgraph):
    model, sanitizer_args, target = CASES[catcher]
    q, kv, table, lengths = inputs()
    with PagedSanitizer(mode="raise", **sanitizer_args):
        compiled = torch.compile(model, fullgraph=fullgraph)
        compiled(q, kv, table, lengths)
        table[0, 2] = -1
        with pytest.raises(PageTableViolation) as info:  # not the op's IndexError: the kernel did not run
            compiled(q, kv, table, lengths)
    v = info.value.violations[0]
    assert (v.op, v.index, v.value) == (target, (0, 2), -1)
    assert not counters["graph_break"]


CACHE_RULES = Registry()


@rule("paged_kernels:PagedCache.write", reads=("self", "loc"), registry=CACHE_RULES)
def cache_write(call):
    return [Slots(call["loc"], "loc", Buffer("buffer", call["self"].buffer.shape[0]), negative_skipped=False)]


@FULLGRAPH
def test_a_call_whose_arguments_a_graph_cannot_take_is_reported_not_checked(fullgraph):
    """A method of a library object (``self``): an op of a compiled graph cannot take it. The compile
    works, the call runs, and the sanitizer says once that this call is not checked in compiled code."""
    cache = paged_kernels.PagedCache(16, DIM)

    def step(loc, values):
        cache.write(loc, values * 2)
        return cache.buffer.sum()

    with PagedSanitizer(mode="raise", registry=CACHE_RULES) as san:
        compiled = torch.compile(step, fullgraph=fullgraph)
        for _ in range(2):
            compiled(torch.tensor([3, 4]), torch.ones(2, DIM))
    assert float(cache.buffer.sum()) == 2 * 2 * DIM
    [warning] = san.reports
    assert (warning.check, warning.severity, warning.op) == ("rule-skipped-in-capture", "warning",
                                                             "paged_kernels:PagedCache.write")
    assert "PagedCache objects" in warning.message and warning.caller.startswith("tests/test_compile.py:")
    assert san.checked[("paged_kernels:PagedCache.write", "skipped")] == 2


NESTED_RULES = {"rule": [dict(PYTHON_RULE["rule"][0], target=target)
                         for target in ("paged_kernels:paged_decode", "paged_kernels:paged_decode_scaled")]}


def nested_model(q, kv, table, lengths):
    return paged_kernels.paged_decode_scaled(q, kv, table, lengths, 2.0) + 1


@FULLGRAPH
def test_an_entry_point_called_by_another_is_checked_once_as_in_eager_code(fullgraph):
    """``paged_decode_scaled`` calls ``paged_decode``, both checked targets (as FlashInfer's trtllm
    decode calls its xqa decode): eager code checks the call the program makes, not the nested one,
    and so does compiled code, though dynamo traces through both wrappers."""
    q, kv, table, lengths = inputs()
    with PagedSanitizer(mode="log", config=NESTED_RULES) as san:
        nested_model(q, kv, table, lengths)
        eager = dict(san.checked)
        san.checked.clear()
        compiled = torch.compile(nested_model, fullgraph=fullgraph)
        for _ in range(3):
            compiled(q, kv, table, lengths)
        table[1, 1] = PAGES
        compiled(q, kv, table, lengths)
    assert eager == {("paged_kernels:paged_decode_scaled", "host"): 1}
    assert dict(san.checked) == {("paged_kernels:paged_decode_scaled", "host"): 4}
    [finding] = [v for v in san.reports if v.severity == "error"]
    assert (finding.op, finding.index, finding.value) == ("paged_kernels:paged_decode_scaled", (1, 1), PAGES)
    assert finding.caller.startswith("tests/test_compile.py:") and finding.caller.endswith("in nested_model")
    assert not counters["graph_break"]
