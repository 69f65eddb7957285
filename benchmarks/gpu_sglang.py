"""SGLang 0.5.23's real pools, allocators, table building and attention backends on the H200,
under the sanitizer (issue 14): eager, and (configurations ending in ``:graphs``) captured and
replayed in CUDA graphs through the backend's own graph hooks (``sglang_driver.GraphRunner``).

    STEPS=sglang TSAN_PAGED_SGLANG_STEPS=3000 bash benchmarks/gpu_run.sh   (SGLang carried first: docs/gpu.md)
    Recorded: benchmarks/results/gpu_sglang_h200.log, gpu_sglang_3000steps_h200.log, gpu_sglang_final_check_h200.log

``tests/sglang_driver.py`` with ``TSAN_PAGED_SGLANG_DEVICE=cuda``: the seeded scheduler of the CPU
tests, its tables built by SGLang's own code (Triton kernels on the GPU), its kernel calls through
``TRTLLMHAAttnBackend`` (FlashInfer xqa) and ``TritonAttnBackend`` (SGLang's Triton kernels). Per
configuration: the run under ``PagedSanitizer(mode="log")`` (what ``TSAN_PAGED=log`` starts) and
with ``track_pages`` (reports), the time per step unsanitized against sanitized (:func:`clean_run`),
then two faults planted in a decode or verify batch, in graph mode before a replayed step
(:func:`planted_run`). ``TSAN_PAGED_SGLANG_DEVICE=cpu`` dry-runs the script on a CPU. sgl-kernel
does not run there: ``tests/sglang_server/sgl_kernel_stub.py`` answers its imports with functions that raise.
"""

import os
import statistics
from collections import Counter
import sys
import time
from pathlib import Path

os.environ.setdefault("TSAN_PAGED_SGLANG_DEVICE", "cuda")  # "cpu": a dry run of this script
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "sglang_server")]

import sgl_kernel_stub  # noqa: E402

STUBBED = sgl_kernel_stub.install()

import torch  # noqa: E402

import sglang_driver as sd  # noqa: E402
from tsan_paged import PagedSanitizer  # noqa: E402

STEPS = int(os.environ.get("TSAN_PAGED_SGLANG_STEPS", "2000"))
BLOCK = int(os.environ.get("TSAN_PAGED_SGLANG_BLOCK", "100"))  # steps per timing block
CONFIGS = [tuple(c.split(":")) for c in os.environ.get(
    "TSAN_PAGED_SGLANG_CONFIGS",
    # xqa (trtllm_mha on sm90) takes pages of 16..128 tokens; page 1 runs on the triton backend
    "trtllm_mha:page64-full-decode:graphs,trtllm_mha:page64-swa-mtp3:graphs,trtllm_mha:page64-full-decode,"
    "trtllm_mha:page64-swa-mtp3,triton:page1-full-decode:graphs,triton:page64-full-decode:graphs,"
    "triton:page1-full-decode,triton:page64-full-decode").split(",")]


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


def clean_run(attention, name, graphs):
    """Reports: the seeded run under ``PagedSanitizer(mode="log")``, and again with
    ``track_pages=True`` (timed). Time per step: the same seeded run unsanitized and sanitized in
    alternating blocks of BLOCK steps (each sanitized block a session of its own), so the shared
    host's drift hits both alike; medians."""
    _, checked = scheduler(attention, name, 1, graphs)
    with PagedSanitizer(mode="log") as san:
        checked.run(STEPS)
        san.flush()  # a replayed graph's findings are read here
    errors = [v for v in san.reports if v.severity == "error"]
    warnings = Counter(v.check for v in san.reports if v.severity != "error")
    _, tracked = scheduler(attention, name, 1, graphs)
    with PagedSanitizer(mode="log", track_pages=True) as track:
        track_ms = statistics.median(timed_steps(tracked, STEPS)) * 1e3
        track.flush()
    track_errors = [v for v in track.reports if v.severity == "error"]
    _, plain = scheduler(attention, name, 1, graphs)
    _, timed = scheduler(attention, name, 1, graphs)
    bare, sanitized = [], []
    for _ in range(max(STEPS // BLOCK, 1)):
        bare += timed_steps(plain, BLOCK)
        with PagedSanitizer(mode="log"):
            sanitized += timed_steps(timed, BLOCK)
    b, c = statistics.median(bare) * 1e3, statistics.median(sanitized) * 1e3
    stats = checked.stats
    return [attention, name + (" (CUDA graphs)" if graphs else ""), stats.decode_steps + stats.verify_steps,
            checked.graphs.replays if graphs else "-", stats.calls, len(errors),
            ", ".join(f"{n} {check}" for check, n in sorted(warnings.items())) or "0", len(track_errors),
            f"{b:.3f}", f"{c:.3f}", f"{(c - b) * 1e3:+.0f} us ({(c - b) / b:+.1%})", f"{track_ms:.3f}",
            f"{(track_ms - b) * 1e3:+.0f} us ({(track_ms - b) / b:+.1%})"]


def planted_run(attention, name, graphs, fault):
    """A fault planted in a decode/verify batch, in graph mode before a replayed step: the seed's
    (``sd.plant_seed_fault``: a live entry one page past its pool) or a use-after-free
    (``sd.plant_use_after_free``, under track_pages). What the sanitizer reports first, against
    what was planted."""
    engine, sched = scheduler(attention, name, 2, graphs)
    planted = []

    def plant(reqs, seq_lens, tokens_per_req):
        if not planted and len(reqs) > 1 and seq_lens[1] > 2 * engine.page_size and (
                not graphs or sched.graphs.replays):
            planted.append(sd.plant_seed_fault(engine, reqs, seq_lens, tokens_per_req) if fault == "seed"
                           else sd.plant_use_after_free(engine, reqs, seq_lens, tokens_per_req))

    sched.before_forward = plant
    with PagedSanitizer(mode="log", track_pages=fault == "use-after-free") as found:
        for _ in range(STEPS):
            sched.step()
            if planted:
                break  # a later free of the planted slot would index SGLang's own tables out of bounds
        found.flush()
    if not planted:
        return "not planted"
    first = [v for v in found.reports if v.severity == "error"]
    if not first:
        return "NOT CAUGHT"
    v, (row, col, value) = first[0], planted[0]
    ps = engine.page_size
    # a CSR slot list (SGLang's Triton kernels) names the entry in token slots, not pages
    exact = (tuple(v.index), v.value) in (((row, col), value), ((row, col * ps), value * ps))
    return (f"{v.check} {v.arg}{list(v.index)} = {v.value} ({'as planted' if exact else 'PLANTED '}"
            f"{'' if exact else f'[{row}, {col}] = {value}'}) at {v.caller.split('/')[-1]}")


def main():
    where = torch.cuda.get_device_name() if sd.DEVICE == "cuda" else "CPU (dry run)"
    print(f"torch {torch.__version__}, {where}, sgl-kernel stubbed: {STUBBED}, {STEPS} scheduler steps per run",
          flush=True)
    rows = []
    for attention, name, *mode in CONFIGS:
        rows.append(clean_run(attention, name, mode == ["graphs"]))
        print(rows[-1], flush=True)
    # Faults last, SWA ones at the very end: an entry the sanitizer only logs is then read by the kernel.
    order = sorted(range(len(CONFIGS)), key=lambda i: sd.CONFIGS[CONFIGS[i][1]][0]["swa"])
    for fault in ("use-after-free", "seed"):
        for i in order:
            attention, name, *mode = CONFIGS[i]
            rows[i].append(planted_run(attention, name, mode == ["graphs"], fault))
            print(CONFIGS[i], fault, rows[i][-1], flush=True)
    print("\n| backend | configuration | decode/verify steps | graph replays | kernel calls | errors | warnings "
          "| errors, track_pages | ms/step bare | ms/step sanitized | added | ms/step track_pages | added, track_pages "
          "| use-after-free planted (track_pages) | seed's fault planted |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")


if __name__ == "__main__":
    main()
