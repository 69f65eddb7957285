"""Every rule inside CUDA graphs (issue 11): capture under log, raise and abort, replay, plant, replay.

For each case of ``gpu_cases`` (a built-in rule through its library's real entry point, or its
stand-in where the library does not install; a TOML rule and a Python rule on a CUDA op):

- an eager warm-up call, then the call captured in a CUDA graph under the sanitizer: the
  capture is not broken, and capture and replays make no host sync (sync debug mode "error");
- valid replays give no report;
- a fault planted into the captured tensors after capture is reported after the next replay,
  at its index, with the capture site as caller (log), raised by ``flush()`` (raise), or ends the
  process with status 86 (abort, in a child process);
- a check that cannot run on the device while capturing (a user rule that syncs, duplicate-page)
  is skipped with one ``rule-skipped-in-capture`` warning, and the capture survives.

Skips without a CUDA sm90 GPU; run on the lent H200 with ``benchmarks/gpu_run.sh``.
"""

import gc
import os
import subprocess
import sys

import pytest
import torch

from gpu_batches import cuda_ready

REASON = cuda_ready()
pytestmark = pytest.mark.skipif(bool(REASON), reason=REASON or "ok")

if not REASON:
    from gpu_cases import CASES
    from tsan_paged import PagedSanitizer, PageTableViolation
else:
    CASES = {}

NAMES = ["trtllm_decode", "xqa_decode", "xqa_raw", "decode_wrapper", "append_kv", "toml_rule_op", "python_rule_op",
         "vllm_paged_attention", "vllm_reshape_and_cache", "flash_attn"]
CHILD = os.path.join(os.path.dirname(__file__), "graph_child.py")


def sanitizer(case, **kwargs):
    return PagedSanitizer(config=case.config, registry=case.registry, **kwargs)


def capture(fn):
    """Warm up on a side stream (as torch.cuda.graphs' make_graphed_callables does), then capture,
    with synchronizing operations refused (they raise)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    gc.collect()  # earlier tests' dead graphs: destroying one during the capture would break it
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return graph


def no_sync(fn):
    """Run ``fn`` with synchronizing CUDA operations refused (they raise)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def errors(san):
    return [v for v in san.reports if v.severity == "error"]


def found(violations):
    return [(v.check, v.index, v.value, v.bound) for v in violations]


@pytest.mark.parametrize("name", NAMES)
def test_log_mode_graph_replays_are_checked(name):
    case = CASES[name]()
    with sanitizer(case, mode="log") as san:
        case.call()  # eager: compiles the kernels, makes the device ring
        torch.cuda.synchronize()
        san.flush()
        assert san.reports == []
        graph = capture(case.call)
        no_sync(lambda: [graph.replay() for _ in range(3)])
        torch.cuda.synchronize()
        san.flush()
        assert san.reports == []
        # accounting: the eager call was checked on the device, the captured one in the graph
        assert {how for _, how in san.checked} >= {"device", "captured"}, san.checked
        if not case.guarded:  # log mode lets an unguardable write through: its fault runs in the child
            return
        expected = case.plant()
        no_sync(graph.replay)
        torch.cuda.synchronize()
        san.flush()
    [first] = [v for v in errors(san) if (v.check, v.index) == expected[:2]] or [None]
    assert first is not None, (expected, found(san.reports))
    assert found([first]) == [expected]
    # The kernel's call site, where the graph was captured (case.call: a line of gpu_cases.py)
    assert "gpu_cases.py:" in first.caller and first.caller.endswith("in <lambda>"), first.caller
    assert "[device record, capture site; reported deferred]" in first.message


@pytest.mark.parametrize("name", NAMES)
def test_raise_mode_eager_raises_and_graph_replays_raise_at_flush(name):
    """(A case with no safe guard value traps on the device in raise mode: its planted replay
    runs in a child process, test_abort_mode_... .)"""
    case = CASES[name]()
    with sanitizer(case, mode="raise") as san:
        case.call()  # eager: the sync path (one sync), no finding
        torch.cuda.synchronize()
        graph = capture(case.call)
        no_sync(graph.replay)
        torch.cuda.synchronize()
        san.flush()
        expected = case.plant()
        if case.guarded:
            no_sync(graph.replay)
            torch.cuda.synchronize()
            with pytest.raises(PageTableViolation) as info:
                san.flush()
            assert expected in found(info.value.violations)
            expected = case.plant()  # again: the graph's guard action rewrote it
        with pytest.raises(PageTableViolation) as eager:  # and eagerly, before the kernel
            case.call()
        assert expected[:2] in [f[:2] for f in found(eager.value.violations)]


@pytest.mark.parametrize("name", NAMES)
def test_abort_mode_graph_replay_ends_the_process(name):
    """Abort mode with the guard action: the replay survives, the record is read, the process ends
    with 86 and the report. A write through a CSR list (append) has no safe guard value: abort mode
    then traps on the device (the finding printed there)."""
    proc = subprocess.run([sys.executable, CHILD, name, "guard"], capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert "VALID-REPLAYS-OK" in proc.stdout, text[-4000:]
    if name == "append_kv":
        assert "tsan_paged trap:" in text and "CONTEXT-DEAD" in proc.stdout, text[-4000:]
        return
    assert proc.returncode == 86, text[-4000:]
    expected = next(line.split("=", 1)[1] for line in proc.stdout.splitlines() if line.startswith("EXPECTED="))
    check, index, value = expected.split("|")[:3]
    assert "aborting (mode=abort, exit status 86)" in proc.stderr and check in proc.stderr, text[-4000:]
    assert f"= {value}, " in proc.stderr, text[-4000:]
    assert "NOT-ABORTED" not in proc.stdout


@pytest.mark.parametrize("name", ["decode_wrapper", "vllm_reshape_and_cache"])
def test_trap_in_the_flat_kernel(name):
    """The CSR and slot-mapping checks (the flat kernel) with device_action="trap": the device
    prints the finding and stops before the kernel reads the bad entry."""
    proc = subprocess.run([sys.executable, CHILD, name, "trap"], capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert "VALID-REPLAYS-OK" in proc.stdout, text[-4000:]
    assert "tsan_paged trap:" in text and "CONTEXT-DEAD" in proc.stdout, text[-4000:]


def test_a_user_rule_that_syncs_is_skipped_in_capture_not_the_capture():
    from tsan_paged import checks
    from tsan_paged.registry import Registry, rule

    case = CASES["toml_rule_op"]()
    registry = Registry()

    @rule("tsan_gpu::paged_gather", reads=("kv_pages", "block_table"), registry=registry)
    def reads_on_the_host(call):  # .item(): a sync, refused while capturing
        table, pages = call["block_table"], call["kv_pages"].shape[0]
        if int(table.max()) >= pages:
            return checks.check_pages_in_range(table.cpu(), "block_table", pages, "kv_pages", lambda: (None, None))
        return []

    with PagedSanitizer(mode="raise", registry=registry) as san:
        case.call()
        graph = capture(case.call)  # not broken
        graph = capture(case.call)  # a second capture: still one warning for the call site
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        expected = case.plant()
        with pytest.raises(PageTableViolation) as info:  # eagerly, the rule runs (and syncs)
            case.call()
    skipped = [v for v in san.reports if v.check == "rule-skipped-in-capture"]
    assert len(skipped) == 1 and "reads_on_the_host" in skipped[0].message, san.reports
    assert "synchron" in skipped[0].message
    assert expected[:2] in [(v.check, v.index) for v in info.value.violations]


def test_duplicate_page_is_skipped_in_capture_and_the_page_checks_run():
    case = CASES["trtllm_decode"]()
    with PagedSanitizer(mode="log", config={"checks": {"duplicate-page": "warning"}}) as san:
        case.call()
        torch.cuda.synchronize()
        san.flush()
        before = [v for v in san.reports if v.check != "duplicate-page"]
        graph = capture(case.call)
        graph.replay()
        expected = case.plant()
        graph.replay()
        torch.cuda.synchronize()
        san.flush()
    assert before == []
    skipped = [v for v in san.reports if v.check == "rule-skipped-in-capture"]
    assert len(skipped) == 1 and "duplicate-page" in skipped[0].message
    assert expected in found(errors(san))


UNRUNNABLE = ["flashinfer.prefill:trtllm_batch_context_with_kv_cache",
              "flashinfer.mla._core:trtllm_batch_decode_with_kv_cache_mla",
              "flashinfer.mla._core:xqa_batch_decode_with_kv_cache_mla", "flashinfer.xqa:xqa_mla"]


@pytest.mark.parametrize("target", UNRUNNABLE)
def test_rules_of_kernels_that_do_not_run_on_sm90_check_in_graphs(target):
    """FlashInfer's trtllm context and MLA decode kernels need sm100 / sm120: their rules' checks
    (what the sanitizer adds in front of the kernel) are captured and replayed without them."""
    import flashinfer.mla  # noqa: F401
    import flashinfer.prefill  # noqa: F401
    from gpu_cases import unrunnable_calls
    from tsan_paged.interpose import interposer

    kwargs, plant = unrunnable_calls()[target]
    with PagedSanitizer(mode="log") as san:
        patched = interposer.patched[target]
        expected = check_captured(san, target, patched.binder.bind((), kwargs), plant, patched.library_dirs)
    assert expected in found(errors(san)), found(san.reports)


def check_captured(san, target, arguments, plant, library_dirs=()):
    """The sanitizer's check of a call to ``target`` (bound ``arguments``) alone: run eagerly,
    captured, replayed with syncs refused (quiet), then replayed after ``plant()`` wrote a
    fault into the tensors the graph reads. Returns the finding ``plant`` expects."""
    def check():
        san._check_and_act(target, san._rules[target], arguments, library_dirs)

    check()
    torch.cuda.synchronize()
    san.flush()
    assert san.reports == [], found(san.reports)
    graph = capture(check)
    no_sync(lambda: [graph.replay() for _ in range(3)])
    torch.cuda.synchronize()
    san.flush()
    assert san.reports == []
    expected = plant()
    no_sync(graph.replay)
    torch.cuda.synchronize()
    san.flush()
    return expected


ALONE = ["sglang decode_attention_fwd", "sglang extend_attention_fwd", "sglang torch_native decode",
         "sglang fa3 flash_attn_with_kvcache",
         "sglang fa4 flash_attn_with_kvcache", "vllm flash_attn_varlen_func", "vllm unified_attention",
         "flash_mla_with_kvcache", "sglang MHATokenToKVPool.set_kv_buffer",
         "sglang MHATokenToKVPool.set_kv_buffer_prefix_valid", "vllm concat_and_cache_mla",
         "flashinfer cudnn_batch_decode_with_kv_cache", "flashinfer trtllm decode, context parallel",
         "flashinfer trtllm decode, request_order", "flashinfer BatchMLAPagedAttentionWrapper.run"]


@pytest.mark.parametrize("label", ALONE)
def test_rules_checked_alone_capture_replay_and_find_a_planted_fault(label):
    """The rules for SGLang's and vLLM's kernels (which do not install here) and FlashInfer's
    cuDNN / Cake / MLA-wrapper paths: the check the sanitizer makes in front of the kernel, with
    the arguments bound by name, is captured and replayed (no sync), quiet on valid tables, and
    finds a fault planted after capture."""
    from gpu_cases import checked_alone

    target, arguments, plant = checked_alone()[label]
    with PagedSanitizer(mode="log") as san:
        expected = check_captured(san, target, arguments, plant)
    assert expected in found(errors(san)), found(san.reports)


def test_track_pages_use_after_free_found_in_replayed_graphs():
    """track_pages on CUDA (issue 14): the pool's page states live on the GPU and allocations and
    frees update them without a sync; the decode's check of them is captured with the call, and a
    page freed AFTER capture is reported as page-not-allocated at the replay that reads it, with
    the free site's stack. SGLang's allocators do not run on this machine: the pool is made and
    updated through the tracker's own entry points (``PoolState``, ``on_alloc``, ``on_release``),
    the ones SGLang's shadowed allocator methods call."""
    from gpu_cases import tracked_pool

    case = CASES["trtllm_decode"]()
    kwargs = case.state
    k, v = kwargs["kv_cache"]
    table = kwargs["block_tables"]
    with PagedSanitizer(mode="log", track_pages=True) as san:
        tracker, pool, state = no_sync(lambda: tracked_pool(k, v, "the test's full pool"))
        case.call()
        torch.cuda.synchronize()
        san.flush()
        assert san.reports == [], found(san.reports)
        graph = capture(case.call)
        no_sync(lambda: [graph.replay() for _ in range(3)])
        torch.cuda.synchronize()
        san.flush()
        assert san.reports == []
        page = int(table[2, 1])  # row 2 reads its column 1
        freed = table[2, 1:2].to(torch.int64)  # the page id, on the GPU (no copy from the host)
        no_sync(lambda: tracker.on_release(state, (freed,), tracker.stack_id()))
        no_sync(graph.replay)
        torch.cuda.synchronize()
        san.flush()
    reported = [v for v in san.reports if v.check == "page-not-allocated"]
    assert reported and reported[0].index[0] == 2 and reported[0].value == page, found(san.reports)
    assert "is FREE" in reported[0].message and "test_track_pages_use_after_free" in reported[0].message


@pytest.mark.parametrize("fullgraph", [False, True], ids=["default", "fullgraph"])
def test_compiled_decode_reduce_overhead_is_checked_at_every_run(fullgraph):
    """FlashInfer's real decode called from torch.compile'd code, mode="reduce-overhead" (CUDA graphs):
    the check is an op of the compiled graph (tsan_paged/compiled.py), so a fault planted after
    compiling is found at the next run, at its index, with the model's line as caller."""
    import flashinfer.decode

    from gpu_batches import make_batch, make_kv

    torch._dynamo.reset()
    batch = make_batch(8, 1024, make_kv(600))
    table, lengths = batch["block_tables"], batch["seq_lens"]
    others = {k: v for k, v in batch.items() if k not in ("query", "block_tables", "seq_lens")}

    def step(query, block_tables, seq_lens):
        return flashinfer.decode.trtllm_batch_decode_with_kv_cache(
            query=query * 1, block_tables=block_tables, seq_lens=seq_lens, **others) + 1

    if fullgraph:  # whether FlashInfer's own Python traces whole, without the sanitizer
        try:
            torch.compile(step, fullgraph=True)(batch["query"], table, lengths)
        except Exception as exc:
            pytest.skip(f"FlashInfer's entry point does not trace with fullgraph=True without the sanitizer "
                        f"either: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        torch._dynamo.reset()
    with PagedSanitizer(mode="log") as san:
        reference = step(batch["query"], table, lengths)
        compiled = torch.compile(step, mode="reduce-overhead", fullgraph=fullgraph)
        for _ in range(4):
            out = compiled(batch["query"], table, lengths)
        torch.cuda.synchronize()
        torch.testing.assert_close(out, reference, atol=1e-2, rtol=1e-2)
        san.flush()
        assert errors(san) == [], found(san.reports)
        row = 3
        col = (int(lengths[row]) - 1) // 64
        table[row, col] = 600  # the seed's one past the end, in place: the graph's input buffer sees it
        compiled(batch["query"], table, lengths)
        torch.cuda.synchronize()
        san.flush()
    print("checked:", dict(san.checked))
    [first] = errors(san)[:1]
    assert (first.check, first.index, first.value, first.bound) == ("page-out-of-range", (row, col), 600, 600)
    assert "test_gpu_graphs.py" in first.caller and "in step" in first.caller, first.caller
    assert sum(n for (t, _), n in san.checked.items() if t.endswith("trtllm_batch_decode_with_kv_cache")) >= 5
