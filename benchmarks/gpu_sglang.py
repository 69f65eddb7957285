"""SGLang 0.5.23's real pools, allocators, table building and attention backends on the H200,
under the sanitizer (issue 14, part 1): eager decode, and (configurations ending in ``:graphs``)
decode captured and replayed in CUDA graphs through trtllm_mha's own graph hooks
(``sglang_driver.GraphRunner``).

    STEPS=sglang bash benchmarks/gpu_run.sh        (carrying SGLang first: docs/gpu.md)

``tests/sglang_driver.py`` with ``TSAN_PAGED_SGLANG_DEVICE=cuda``: the seeded scheduler of the CPU
tests, its tables built by SGLang's own code (Triton kernels on the GPU), its decode calls through
``TRTLLMHAAttnBackend`` (FlashInfer xqa) and ``TritonAttnBackend`` (SGLang's Triton kernels), run
unsanitized and under ``PagedSanitizer(mode="log")`` (what ``TSAN_PAGED=log`` starts), then with
the seed's fault planted (a live table entry one past the pool; in graph mode before a replay). sgl-kernel does
not run there: ``tests/gpu/sgl_kernel_stub.py`` answers its imports with functions that raise.
"""

import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TSAN_PAGED_SGLANG_DEVICE", "cuda")  # "cpu": a dry run of this script
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "gpu")]

import sgl_kernel_stub  # noqa: E402

STUBBED = sgl_kernel_stub.install()

import torch  # noqa: E402

import sglang_driver as sd  # noqa: E402
from tsan_paged import PagedSanitizer, PageTableViolation  # noqa: E402

STEPS = int(os.environ.get("TSAN_PAGED_SGLANG_STEPS", "400"))
CONFIGS = [tuple(c.split(":")) for c in os.environ.get(
    "TSAN_PAGED_SGLANG_CONFIGS", "trtllm_mha:page64-swa-mtp3,trtllm_mha:page1-full-decode,"
    "trtllm_mha:page64-full-decode,trtllm_mha:page64-full-decode:graphs,trtllm_mha:page1-full-decode:graphs,"
    "triton:page64-full-decode,triton:page1-full-decode").split(",")]


def scheduler(attention, name, seed, graphs=False):
    kwargs, draft = sd.CONFIGS[name]
    engine = sd.make_engine(draft_tokens=draft, attention=attention, **kwargs)
    return engine, sd.Scheduler(engine, seed=seed, draft_tokens=draft, max_running=8, pad_batches=True,
                                graphs=graphs, on_call=sd.call_through if sd.DEVICE == "cpu" else None)


def sync():
    if sd.DEVICE == "cuda":
        torch.cuda.synchronize()


def timed_steps(sched, steps):
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        sched.step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def main():
    where = torch.cuda.get_device_name() if sd.DEVICE == "cuda" else "CPU (dry run)"
    print(f"torch {torch.__version__}, {where}, sgl-kernel stubbed: {STUBBED}", flush=True)
    rows = []
    for attention, name, *mode in CONFIGS:
        graphs = mode == ["graphs"]
        _, plain = scheduler(attention, name, 1, graphs)
        bare = timed_steps(plain, STEPS)
        _, checked = scheduler(attention, name, 1, graphs)  # the same seeded sequence
        with PagedSanitizer(mode="log") as san:
            sanitized = timed_steps(checked, STEPS)
            san.flush()
        errors = [v for v in san.reports if v.severity == "error"]
        engine, planted_sched = scheduler(attention, name, 2, graphs)
        planted = []

        def plant(reqs, seq_lens, tokens_per_req):
            if not planted and len(reqs) > 1 and seq_lens[1] > 2 * engine.page_size and (
                    not graphs or planted_sched.graphs.replays):
                engine.req_to_token[reqs[1].row, engine.page_size] = engine.pool.size + 5 * engine.page_size
                planted.append(1)

        planted_sched.before_forward = plant
        caught = "not caught"
        with PagedSanitizer(mode="log") as found:  # log: a replayed graph's findings come at the flush
            for _ in range(STEPS):
                planted_sched.step()
                if planted:
                    break
            found.flush()
        first = [v for v in found.reports if v.severity == "error"]
        if first:
            v = first[0]
            caught = f"{v.check} {v.arg}{list(v.index)} = {v.value} at {v.caller.split('/')[-1]}"
        name = f"{name}{' (CUDA graphs)' if graphs else ''}"
        b, c = statistics.median(bare) * 1e3, statistics.median(sanitized) * 1e3
        rows.append((attention, name, checked.stats.decode_steps + checked.stats.verify_steps, checked.stats.calls,
                     len(errors), len(san.reports), f"{b:.2f}", f"{c:.2f}", f"{c - b:+.2f}", caught))
        print(rows[-1], flush=True)
    print("\n| backend | configuration | decode/verify steps | kernel calls | errors | reports | ms/step bare "
          "| ms/step sanitized | added | seed-style fault planted |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")


if __name__ == "__main__":
    main()
