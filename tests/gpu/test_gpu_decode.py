"""The device path against the real FlashInfer kernel (xqa, sm90). Skips without a CUDA sm90 GPU.

Run on the lent H200 with ``benchmarks/gpu_run.sh`` (installs the carried wheels, runs this,
the benchmarks and compute-sanitizer). Each fault of issue 7 is caught in eager ``raise`` mode,
and in a replayed CUDA graph with ``guard`` (here) and ``trap`` (in a child process: a trap
kills the CUDA context).
"""

import os
import subprocess
import sys

import pytest
import torch

from gpu_batches import cuda_ready, decode, make_batch, make_kv, plant

REASON = cuda_ready()
pytestmark = pytest.mark.skipif(bool(REASON), reason=REASON or "ok")

if not REASON:
    import flashinfer.decode

    from tsan_paged import PagedSanitizer, PageTableViolation, device

PAGES = 8657  # the seed's page count
FAULTS = ["seed", "minus1", "v_side", "seq_len"]


@pytest.fixture(scope="module")
def kvs():
    return {"eq": make_kv(PAGES, seed=1), "v_short": make_kv(PAGES, v_pages=PAGES - 100, seed=2)}


def batch_for(kvs, fault=None, batch=8, ctx=4096, seed=0, window_left=-1):
    kv = kvs["v_short"] if fault == "v_side" else kvs["eq"]
    return make_batch(batch, ctx, kv, seed=seed, window_left=window_left)


def first_error(reports):
    errors = [v for v in reports if v.severity == "error"]
    assert errors, reports
    return errors[0]


@pytest.mark.parametrize("window_left", [-1, 1023])
@pytest.mark.parametrize("mode", ["log", "raise"])
def test_valid_batches_identical_outputs_no_reports(kvs, mode, window_left):
    for seed in range(3):
        b = batch_for(kvs, seed=seed, batch=16 + 8 * seed, window_left=window_left)
        reference = decode(**b)
        with PagedSanitizer(mode=mode) as san:
            out = decode(**b)
            again = decode(**b)
            san.flush()
        torch.cuda.synchronize()
        assert torch.equal(out, reference) and torch.equal(again, reference)
        assert san.reports == []


@pytest.mark.parametrize("fault", FAULTS)
def test_eager_raise_catches_before_the_kernel(kvs, fault):
    b = batch_for(kvs, fault)
    expected = plant(b, fault)
    out = torch.full_like(b["query"], 7.0)
    with PagedSanitizer(mode="raise") as san:
        with pytest.raises(PageTableViolation) as info:
            flashinfer.decode.trtllm_batch_decode_with_kv_cache(**b, out=out)
    first = first_error(info.value.violations)
    assert (first.check, first.index, first.value, first.bound) == expected
    assert "test_gpu_decode.py" in first.caller
    assert torch.equal(out, torch.full_like(out, 7.0))  # the kernel did not run
    assert san.errors


def _capture(b, out):
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode(**b, out=out)  # warm-up (eager, deferred check) on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        flashinfer.decode.trtllm_batch_decode_with_kv_cache(**b, out=out)  # CAPTURE-SITE
    return graph


CAPTURE_LINE = next(i + 1 for i, line in enumerate(open(__file__)) if line.rstrip().endswith("# CAPTURE-SITE"))


@pytest.mark.parametrize("fault", FAULTS + ["far"])
def test_graph_guard_survives_and_reports_capture_site(kvs, fault):
    b = batch_for(kvs, fault)
    reference = decode(**b)
    out = torch.empty_like(reference)
    with PagedSanitizer(mode="log", device_action="guard") as san:
        graph = _capture(b, out)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, reference)
        san.flush()
        assert san.reports == []
        expected = plant(b, fault)
        table_before = b["block_tables"].clone()
        lens_before = b["seq_lens"].clone()
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()  # alive: the guard rewrote the entry before the kernel read it
        san.flush()
    errors = [v for v in san.reports if v.severity == "error"]
    found = [(v.check, v.index, v.value, v.bound) for v in errors]
    assert expected in found, found
    first = errors[found.index(expected)]
    assert first.caller.endswith(f"test_gpu_decode.py:{CAPTURE_LINE} in _capture"), first.caller
    table, lens = b["block_tables"], b["seq_lens"]
    if first.check == "page-out-of-range":
        assert int(table[first.index]) == -1  # the guard value, in the caller's table
        changed = table.ne(table_before).nonzero().tolist()
        assert changed == ([] if first.value == -1 else [list(first.index)])  # only the offending entry
    else:
        assert int(lens[first.index]) == first.bound and int(lens_before[first.index]) == first.value
    # The guarded call computes exactly what the kernel computes on the guarded inputs.
    expected_out = decode(**b)
    torch.cuda.synchronize()
    assert torch.equal(out, expected_out)
    rows = [r for r in range(out.shape[0]) if r != first.index[0]]
    assert torch.equal(out[rows], reference[rows])  # the other rows are untouched
    hits = [e for ring in device._rings.values() for e in ring.entries.values() if e.op.endswith("kv_cache")]
    assert any(e.calls >= 8 and e.captured for e in hits)  # every replay checked


@pytest.mark.parametrize("fault", FAULTS)
def test_graph_trap_stops_with_one_line(fault):
    child = os.path.join(os.path.dirname(__file__), "trap_child.py")
    proc = subprocess.run([sys.executable, child, fault], capture_output=True, text=True, timeout=240)
    text = proc.stdout + proc.stderr
    lines = [line for line in text.splitlines() if "tsan_paged trap:" in line]
    assert "VALID-REPLAYS-OK" in proc.stdout, text[-3000:]
    assert "CONTEXT-DEAD" in proc.stdout, text[-3000:]
    assert len(lines) == 4, text[-3000:]
    # Triton's device_print writes one line per operand: 4 lines, one thread, one program.
    assert len({line.split("(operand")[0] for line in lines}) == 1, text[-3000:]
    check_code, position, value, bound = [int(line.split(")")[-1]) for line in sorted(
        lines, key=lambda line: int(line.split("(operand ")[1].split(")")[0]))]
    expected = {l.split("=", 1)[0]: l.split("=", 1)[1] for l in proc.stdout.split() if "=" in l}
    assert (check_code, position, value, bound) == tuple(int(expected[k]) for k in ("check", "position", "value",
                                                                                     "bound")), text[-3000:]


def _syncs_in(fn):
    """Run fn under set_sync_debug_mode('error'); the frame that synced, or '' (none)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return ""
    except RuntimeError as exc:
        if "synchroniz" not in str(exc):
            raise
        tb, frames = exc.__traceback__, []
        while tb is not None:
            frames.append(f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}")
            tb = tb.tb_next
        return " <- ".join(reversed(frames[-4:]))
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_sync_free_no_host_sync(kvs):
    """Deferred eager checks, capture and replays under set_sync_debug_mode('error')."""
    from tsan_paged.rules.flashinfer import TRTLLM_DECODE
    from tsan_paged.interpose import interposer

    b = batch_for(kvs)
    out = decode(**b)
    with PagedSanitizer(mode="log") as san:
        decode(**b, out=out)  # first call: makes the ring, compiles the kernel (one-time)
        torch.cuda.synchronize()
        patched = interposer.patched[TRTLLM_DECODE]
        rules = san._rules[TRTLLM_DECODE]
        arguments = patched.binder.bind((), dict(b, out=out))

        def own_checks():  # exactly what the sanitizer adds to a call
            for _ in range(50):
                san._check_and_act(TRTLLM_DECODE, rules, arguments, patched.library_dirs)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                san._check_and_act(TRTLLM_DECODE, rules, arguments, patched.library_dirs)
            for _ in range(50):
                graph.replay()

        assert _syncs_in(own_checks) == ""

        def whole_calls():
            for _ in range(20):
                decode(**b, out=out)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                decode(**b, out=out)
            for _ in range(20):
                graph.replay()

        where = _syncs_in(whole_calls)
        print(f"whole decode calls under sync debug 'error': {'no sync' if not where else 'synced at ' + where}")
        assert "tsan_paged" not in where
        san.flush()
    assert san.reports == []


def test_log_mode_many_shapes_recycle_record_slots(kvs, monkeypatch):
    """A long eager session in log mode: a plan (and a device record slot) per batch size and
    width, far more than the ring holds (here 6 slots): slots whose records were reported are
    recycled, so a fault planted late is reported once, at its own index, and a later session
    inherits nothing."""
    dev = torch.device("cuda", torch.cuda.current_device())
    monkeypatch.setitem(device._rings, dev.index, device.Ring(dev, slots=6))
    with PagedSanitizer(mode="log", config={"device_poll_s": 0.0}) as san:
        for step in range(40):
            b = make_batch(1 + step % 20, 256 + 64 * step, kvs["eq"], seed=step)
            if step == 33:
                expected = plant(b, "seed")
            decode(**b)
            torch.cuda.synchronize()
        san.flush()
    errors = [v for v in san.reports if v.severity == "error"]
    assert len(errors) == 1, errors
    assert (errors[0].check, errors[0].index, errors[0].value, errors[0].bound) == expected
    with PagedSanitizer(mode="log") as later:
        decode(**make_batch(4, 512, kvs["eq"], seed=99))
        later.flush()
    assert later.reports == []
