"""Per-step sanitizer cost over SGLang's realistic sequence, as a ratio to table building.

    python benchmarks/bench_sglang.py            # prints a table (medians over the steps)
    python benchmarks/bench_sglang.py 400        # steps per configuration (default 200)

The sequence is tests/sglang_driver.py's: SGLang 0.5.23's real pools and allocators, tables
built by ``TRTLLMHAAttnBackend.init_forward_metadata``, kernel calls made by its
``forward_decode`` / ``forward_extend`` (two attention layers, so two checked calls a step).
For every decode / verify step it times:

- ``build``: ``init_forward_metadata`` (SGLang's table building). On a CPU its Triton kernel
  runs under Triton's interpreter, which is orders of magnitude slower than the kernel on a
  GPU: the ``check / build`` ratio here is a lower bound of the GPU ratio, not an estimate.
- ``check``: what the sanitizer adds to the step's kernel calls: the time of the step's calls
  under ``PagedSanitizer(mode="log")`` minus the same calls without it (each call ends in
  FlashInfer's CPU refusal, which both sides pay).
- ``track``: the same with ``track_pages=True`` (tsan_paged/tracking.py): the calls' checks
  plus the ``page-not-allocated`` gather, and ``shadow``: the allocator shadow's own work in
  the step's ``alloc*``/``free*`` calls (its bookkeeping methods, timed directly: the
  allocator calls themselves run Triton's interpreter and are too noisy to difference).

Same seeds with and without the sanitizer, so both runs see the same tables.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("FLASHINFER_NO_DOWNLOAD", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import torch  # noqa: E402

import sglang_driver as sd  # noqa: E402
from tsan_paged import PagedSanitizer, tracking  # noqa: E402

torch.set_num_threads(1)

CONFIGS = [("page64 SWA MTP3", dict(page_size=64, swa=True), 3),
           ("page1 full decode", dict(page_size=1, swa=False), 0),
           ("page64 full decode", dict(page_size=64, swa=False), 0),
           ("page1 SWA MTP2", dict(page_size=1, swa=True), 2)]


def run(kwargs, draft, steps, sanitize, track_pages=False):
    engine = sd.make_engine(draft_tokens=draft, **kwargs)
    call_ns = []

    def timed(fn):
        start = time.perf_counter_ns()
        sd.call_through(fn)
        call_ns.append(time.perf_counter_ns() - start)

    sched = sd.Scheduler(engine, seed=11, draft_tokens=draft, max_running=8, on_call=timed)
    per_step_calls, builds, rows, per_step_alloc = [], [], [], []
    alloc_ns = []  # with track_pages: the shadow's bookkeeping (tracking.tracker's methods)
    if track_pages:
        for name in ("on_alloc", "on_release", "on_clear", "stack_id"):
            setattr(tracking.tracker, name, _timed_method(getattr(tracking.tracker, name), alloc_ns))
    with PagedSanitizer(mode="log", track_pages=track_pages) if sanitize else _null():
        for _ in range(steps):
            before_calls, before_builds, before_alloc = len(call_ns), len(sched.stats.build_ns), len(alloc_ns)
            sched.step()
            if len(sched.stats.build_ns) > before_builds:
                per_step_calls.append(sum(call_ns[before_calls:]))
                per_step_alloc.append(sum(alloc_ns[before_alloc:]))
                builds.append(sched.stats.build_ns[-1])
                rows.append(len(sched.running))
    for name in ("on_alloc", "on_release", "on_clear", "stack_id"):
        tracking.tracker.__dict__.pop(name, None)
    return per_step_calls, builds, rows, per_step_alloc


def _timed_method(method, out):
    def timed(*args, **kwargs):
        start = time.perf_counter_ns()
        try:
            return method(*args, **kwargs)
        finally:
            out.append(time.perf_counter_ns() - start)
    return timed


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main():
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    from loguru import logger

    logger.remove()  # the dead-entry warnings would flood the table
    print(f"SGLang 0.5.23 realistic sequence, {steps} scheduler steps per configuration, 2 layers "
          f"(2 checked calls) per step; medians per decode/verify step; CPU, torch threads = 1")
    print(f"{'configuration':<20} {'steps':>5} {'rows':>4} {'build us':>10} {'calls us':>9} "
          f"{'calls+san us':>12} {'check us':>9} {'check/build':>11} {'track us':>9} {'shadow us':>10} "
          f"{'(track+shadow)/build':>20}")
    for name, kwargs, draft in CONFIGS:
        bare, build, rows, bare_alloc = run(kwargs, draft, steps, sanitize=False)
        san, build2, _, _ = run(kwargs, draft, steps, sanitize=True)
        tracked, build3, _, tracked_alloc = run(kwargs, draft, steps, sanitize=True, track_pages=True)
        n = min(len(bare), len(san), len(tracked))
        check = [s - b for s, b in zip(san[:n], bare[:n])]
        track = [t - b for t, b in zip(tracked[:n], bare[:n])]
        shadow = tracked_alloc[:n]
        med_build = statistics.median(build + build2 + build3) / 1e3
        med_check = statistics.median(check) / 1e3
        med_track, med_shadow = statistics.median(track) / 1e3, statistics.median(shadow) / 1e3
        print(f"{name:<20} {n:>5} {statistics.median(rows):>4.0f} {med_build:>10.0f} "
              f"{statistics.median(bare) / 1e3:>9.0f} {statistics.median(san) / 1e3:>12.0f} {med_check:>9.0f} "
              f"{med_check / med_build:>11.3f} {med_track:>9.0f} {med_shadow:>10.0f} "
              f"{(med_track + med_shadow) / med_build:>20.3f}")


if __name__ == "__main__":
    main()
