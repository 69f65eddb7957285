"""track_pages on a GPU: host time per allocation and per free, and what the check adds to a
decode step in a CUDA graph (one run, medians; ``bash benchmarks/gpu_run.sh`` with STEPS=track).

The pool's page states are on the GPU; an allocation or a free is one Triton launch queued on the
stream (``PoolState.mark``), made with synchronizing operations refused (sync debug mode "error");
"launch alone" is that launch without the tracker's bookkeeping around it.
The decode is FlashInfer's xqa (``gpu_cases.trtllm_decode``: 8 x 2048 tokens, page 64), captured in
a graph with and without tracking; its replays are timed with CUDA events.
Recorded: ``benchmarks/results/gpu_track_pages_h200.log``.
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "tests" / "gpu")]

from gpu_cases import CASES, tracked_pool  # noqa: E402
from tsan_paged import PagedSanitizer, tracking  # noqa: E402

def host_us(fn, n=2000):
    times = []
    for _ in range(n):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    torch.cuda.synchronize()
    return statistics.median(times) / 1000


def replay_us(graph, n=200):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(n):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def capture(fn):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def main():
    case = CASES["trtllm_decode"]()
    k, v = case.state["kv_cache"]
    rows = []
    with PagedSanitizer(mode="log", track_pages=True) as san:
        tracker, pool, state = tracked_pool(k, v, "bench pool")
        torch.cuda.set_sync_debug_mode("error")  # an allocation or a free that syncs raises
        for tokens in (1, 64, 4096):
            out = torch.arange(64, 64 + tokens, device=k.device)
            pages = torch.arange(1, 1 + max(tokens // 64, 1), device=k.device)
            stream = torch.cuda.current_stream().cuda_stream
            alone = host_us(lambda: tracking._launch_mark(state, out, tracking.ALLOCATED, None, 64, stream))
            alloc = host_us(lambda: tracker.on_alloc(pool, state, "alloc_decode", out))
            free = host_us(lambda: tracker.on_release(state, (pages,), 7))
            rows.append((f"{tokens} tokens", f"{alloc:.1f}", f"{free:.1f}", f"{alone:.1f}"))
        torch.cuda.set_sync_debug_mode(0)
        tracker.on_alloc(pool, state, "alloc", torch.arange(0, k.shape[0] * 64, 64, device=k.device))
        case.call()
        graph = capture(case.call)
        tracked = replay_us(graph)
        san.flush()
        assert not san.reports, san.reports
    with PagedSanitizer(mode="log"):
        case.call()
        plain_graph = capture(case.call)
        plain = replay_us(plain_graph)
    bare = replay_us(capture(case.call))
    print("| allocation / free of | on_alloc host us | on_release host us | mark launch alone us |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nxqa decode 8 x 2048 in a graph, us per replay: bare {bare:.1f}, sanitized {plain:.1f} "
          f"(+{plain - bare:.1f}), sanitized + track_pages {tracked:.1f} (+{tracked - bare:.1f})")


if __name__ == "__main__":
    main()
