"""GPU benchmarks: what checking costs a FlashInfer decode step (xqa, sm90), per call.

    python benchmarks/gpu_bench.py [--out DIR]     # on the lent H100: benchmarks/gpu_run.sh
    Recorded: benchmarks/results/gpu_bench_h200.json, gpu_bench_64x4096_final_h200.json, gpu_bench_h100.json

For batch 64 and 256 and contexts 4k and 32k (page 64, bf16, 8 KV heads, GQA 4, head_dim 128):

- decode: the kernel alone, GPU time per replay of a CUDA graph of it (events);
- seed check: ``table.max().item()`` + ``table.min().item()`` before each eager decode;
- sync path: ``PagedSanitizer(mode="raise")`` (one device check + one sync per call);
- sync-free eager: ``PagedSanitizer(mode="log")`` (deferred, guard);
- graph: the decode step captured under the sanitizer, time per replay, minus the bare decode's:
  three captures of each, timed in turns over three passes, medians (the bare captures' spread
  says what a difference below it is worth);
- host: host time a call spends in the sanitizer (bind + rule + launch), and the check
  kernel's own GPU time.
Eager figures are "added to a step" in a loop of decode calls: (loop time with - without) / n.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "gpu"))

import torch  # noqa: E402

from gpu_batches import KERNEL, decode, make_batch, make_kv  # noqa: E402
from tsan_paged import PagedSanitizer, device  # noqa: E402
from tsan_paged import kernels as K  # noqa: E402
from tsan_paged.access import PageTable  # noqa: E402
from tsan_paged.interpose import interposer  # noqa: E402
from tsan_paged.report import CHECKS  # noqa: E402

ERRS = device.err_mask(lambda check: CHECKS[check])


def gpu_loop_us(fn, n=50, repeats=7):
    """Median over repeats of (events around n calls) / n, in us."""
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000 / n)
    return statistics.median(samples)


def _host_loop_us(fn, n, repeats, wait_for_gpu):
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if wait_for_gpu:
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) * 1e6 / n)
    torch.cuda.synchronize()
    return statistics.median(samples)


def interleaved_us(graphs, passes=3, n=20, repeats=5):
    """GPU us per replay of each graph, timed in turns (every graph once per pass), so that the GPU's
    drift over the run hits all of them alike: ``{name: [median of each pass]}``."""
    times = {name: [] for name in graphs}
    for _ in range(passes):
        for name, g in graphs.items():
            times[name].append(gpu_loop_us(g.replay, n=n, repeats=repeats))
    return times


def median_of(times, prefix):
    return statistics.median(t for name, ts in times.items() if name.startswith(prefix) for t in ts)


def wall_loop_us(fn, n=50, repeats=7):
    """Wall time per call, the GPU's work included (synced at the end of each timed loop)."""
    return _host_loop_us(fn, n, repeats, wait_for_gpu=True)


def host_us(fn, n=100, repeats=9):
    """Host time per call, the GPU never the bottleneck (sync between batches, not timed)."""
    return _host_loop_us(fn, n, repeats, wait_for_gpu=False)


def graph_of(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def decode_access(b, out):
    """The rule's description of a decode call (what the device kernel checks)."""
    from tsan_paged.registry import Call, CheckOptions
    from tsan_paged.rules import flashinfer as fi_rules

    args = interposer.patched[KERNEL].binder.bind((), dict(b, out=out)) if KERNEL in interposer.patched else None
    if args is None:
        import inspect

        import flashinfer.decode

        bound = inspect.signature(flashinfer.decode.trtllm_batch_decode_with_kv_cache).bind(**b, out=out)
        bound.apply_defaults()
        args = dict(bound.arguments)
    items = fi_rules.trtllm_batch_decode_with_kv_cache(Call(KERNEL, args, CheckOptions()))
    return next(item for item in items if isinstance(item, PageTable))


def probe_step(batch=64, ctx=4096):
    """The decode step the probes take apart, checked once under the sanitizer so that the device
    ring exists: ``(kwargs, out, ring, access)`` (``access``: what the check kernel checks)."""
    kv = make_kv(32768, seed=7)
    b = make_batch(batch, ctx, kv, seed=1, min_frac=0.9)
    out = decode(**b)
    with PagedSanitizer(mode="log"):
        decode(**b, out=out)
    ring = next(iter(device._rings.values()))
    return b, out, ring, decode_access(b, out)


def shaped_plan(access, entries):
    """The check's plan with ``entries`` table entries per program (the launch-shape knob)."""
    default = device.PROGRAM_ENTRIES
    device.PROGRAM_ENTRIES = entries
    device._PLANS.clear()
    try:
        return device.plan_for(access)
    finally:
        device.PROGRAM_ENTRIES = default
        device._PLANS.clear()


def launch_check(ring, plan, tensors, slot, action="guard"):
    """The check kernel alone (sticky record in ``slot``), as the deferred path launches it."""
    device.launch(ring, plan, tensors, slot, 1, K.ACTION_CODES[action], ERRS)


def bench(batch, ctx, kv):
    b = make_batch(batch, ctx, kv, seed=batch + ctx, min_frac=0.9)
    out = decode(**b)
    table = b["block_tables"]
    row = {"batch": batch, "ctx": ctx, "table": list(table.shape)}

    def bare():
        decode(**b, out=out)

    def seed_check():
        assert table.max().item() < kv[0].shape[0] and table.min().item() >= 0
        decode(**b, out=out)

    bare()
    g_bare = graph_of(bare)
    # Graph timings compare several captures of each, in turns: one capture's replay time can sit a
    # microsecond or more off another's, and a 2.7-10.9 ms decode drifts by more than that over a run.
    replays = {f"bare{i}": g_bare if i == 0 else graph_of(bare) for i in range(3)}
    # PDL comparison baselines: FlashInfer's enable_pdl on and off, captured with no sanitizer active
    pdl_bare = {}
    for enable_pdl in (True, False):
        decode(**b, out=out, enable_pdl=enable_pdl)
        pdl_bare[enable_pdl] = graph_of(lambda enable_pdl=enable_pdl: decode(**b, out=out, enable_pdl=enable_pdl))
    row["decode_graph_us"] = gpu_loop_us(g_bare.replay, n=20)
    row["decode_eager_us"] = wall_loop_us(bare, n=20)
    row["seed_eager_us"] = wall_loop_us(seed_check, n=20)
    row["host_bare_call_us"] = host_us(bare, n=20)

    with PagedSanitizer(mode="raise"):
        bare()
        row["sync_eager_us"] = wall_loop_us(bare, n=20)
    with PagedSanitizer(mode="log") as san:
        bare()
        torch.cuda.synchronize()
        row["free_eager_us"] = wall_loop_us(bare, n=20)
        row["host_sanitized_call_us"] = host_us(bare, n=20)
        patched = interposer.patched[KERNEL]
        rules = san._rules[KERNEL]
        args = patched.binder.bind((), dict(b, out=out))
        row["host_check_only_us"] = host_us(lambda: san._check_and_act(KERNEL, rules, args, patched.library_dirs),
                                            n=200)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(10):
                bare()
            g_san = graph_of(bare)
            for _ in range(10):
                g_san.replay()
            for i in range(3):
                replays[f"san{i}"] = g_san if i == 0 else graph_of(bare)
            row["host_syncs"] = 0
        except RuntimeError as exc:
            row["host_syncs"] = f"sync: {str(exc).splitlines()[0]}"
            g_san = graph_of(bare) if "g_san" not in locals() else g_san
        finally:
            torch.cuda.set_sync_debug_mode(0)
        with PagedSanitizer(mode="abort"):  # device_action "auto" is trap there: the kernel with the trap code
            bare()
            replays["trap0"] = graph_of(bare)
        times = interleaved_us(replays)
        row["graph_replay_us"] = {name: [round(t, 2) for t in ts] for name, ts in times.items()}
        row["graph_san_us"] = median_of(times, "san")
        row["graph_bare_us"] = median_of(times, "bare")
        bare_medians = [statistics.median(ts) for name, ts in times.items() if name.startswith("bare")]
        row["graph_bare_spread_us"] = max(bare_medians) - min(bare_medians)
        row["graph_trap_added_us"] = median_of(times, "trap") - row["graph_bare_us"]
        # the check kernel alone, in a graph (its GPU time per step)
        access = decode_access(b, out)
        plan, tensors = device.plan_for(access), device.launch_tensors(access)
        ring = next(iter(device._rings.values()))
        g_chk = graph_of(lambda: launch_check(ring, plan, tensors, 1))
        row["check_kernel_graph_us"] = gpu_loop_us(g_chk.replay, n=200)
        g_chk_trap = graph_of(lambda: launch_check(ring, plan, tensors, 2, action="trap"))
        row["check_kernel_graph_us_trap"] = gpu_loop_us(g_chk_trap.replay, n=200)
        g_empty = graph_of(lambda: b["seq_lens"].add_(0))
        row["tiny_kernel_graph_us"] = gpu_loop_us(g_empty.replay, n=200)
        # PDL: xqa is launched with programmatic dependent launch; the check kernel signals it (ring.pdl)
        # or not, and FlashInfer's enable_pdl on or off. Graph replays, GPU time per step.
        pdl_graphs = {}
        for enable_pdl in (True, False):
            def bare_p(enable_pdl=enable_pdl):
                decode(**b, out=out, enable_pdl=enable_pdl)
            pdl_graphs[f"bare_pdl{int(enable_pdl)}"] = pdl_bare[enable_pdl]
            for signal in (True, False):
                ring.pdl = signal and device._pdl(table.device)
                pdl_graphs[f"san_pdl{int(enable_pdl)}_signal{int(signal)}"] = graph_of(bare_p)
        ring.pdl = device._pdl(table.device)
        pdl = {name: statistics.median(ts) for name, ts in interleaved_us(pdl_graphs, passes=2).items()}
        for k in list(pdl):
            if k.startswith("san_"):
                pdl[k.replace("san_", "added_")] = round(pdl[k] - pdl["bare_pdl" + k[7]], 2)
        row["pdl"] = pdl
        # host time, piece by piece (check only: rule = bind-free rule call; engine = rule + launch path)
        from tsan_paged import engine
        from tsan_paged.registry import Call
        from tsan_paged.rules import flashinfer as fi_rules
        call = Call(KERNEL, args, san.options)
        row["host_rule_us"] = host_us(lambda: fi_rules.trtllm_batch_decode_with_kv_cache(call), n=200)
        row["host_engine_us"] = host_us(lambda: engine.execute(fi_rules.trtllm_batch_decode_with_kv_cache(call), call,
                                                               san.settings, KERNEL, patched.library_dirs), n=200)
        row["host_launch_us"] = host_us(lambda: launch_check(ring, plan, tensors, 1), n=200)
        if os.environ.get("PROFILE_HOST") and batch == 64 and ctx == 4096:
            import cProfile
            import io
            import pstats
            for what, fn in (("the check", lambda: san._check_and_act(KERNEL, rules, args, patched.library_dirs)),
                             ("the whole sanitized call", bare)):
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(300):
                    fn()
                prof.disable()
                torch.cuda.synchronize()
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(24)
                print(f"profile of {what}, 300 calls:", text.getvalue()[-5000:], flush=True)
        row["host_replay_us_san"] = host_us(g_san.replay, n=20)
        san.flush()
        row["reports"] = len(san.reports)
    row["host_replay_us_bare"] = host_us(g_bare.replay, n=20)
    # Other launch shapes (entries per program, warps): the check in front of the decode in one graph,
    # minus the bare decode graph, which is what a replay pays (the kernel's own time does not show it:
    # a heavier check kernel also makes xqa slower; benchmarks/gpu_slowdown_probe.py). Captured outside
    # the sanitizer, which would check the decode call too.
    shapes = {"bare0": g_bare, "bare1": replays["bare1"]}
    for entries in (512, 1024, 2048, 4096, 8192):
        p2 = shaped_plan(access, entries)

        def check_then_decode(p2=p2):
            launch_check(ring, p2, tensors, 4)
            decode(**b, out=out)
        shapes[f"{entries}/grid{p2.grid}"] = graph_of(check_then_decode)
    times = interleaved_us(shapes, passes=2)
    bare_us = median_of(times, "bare")
    row["check_kernel_sweep_us"] = {name: round(statistics.median(ts) - bare_us, 2) for name, ts in times.items()
                                    if not name.startswith("bare")}
    row["fast_launch"] = bool(next(iter(device._rings.values())).launchers)
    for key in ("seed", "sync", "free"):
        row[f"{key}_added_us"] = row[f"{key}_eager_us"] - row["decode_eager_us"]
    row["graph_added_us"] = row["graph_san_us"] - row["graph_bare_us"]
    row["graph_added_pct"] = 100 * row["graph_added_us"] / row["graph_bare_us"]
    row["host_added_us"] = row["host_sanitized_call_us"] - row["host_bare_call_us"]
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--configs", default="64x4096,64x32768,256x4096,256x32768")
    args = parser.parse_args()
    torch.manual_seed(0)
    kv = make_kv(32768, seed=7)  # 8 GiB of KV: tables index it at random
    rows = []
    for spec in args.configs.split(","):
        batch, ctx = map(int, spec.split("x"))
        row = bench(batch, ctx, kv)
        rows.append(row)
        print(json.dumps(row), flush=True)
    name = torch.cuda.get_device_name()
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"\n{name}, torch {torch.__version__}; us per decode step (medians)")
    print("| batch x ctx | decode (graph) | seed check added | sync path added | sync-free eager added | "
          "graph added (% of step) | bare captures' spread | check kernel GPU | "
          "host added per eager call (check only) | syncs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} x {r['ctx']} | {r['graph_bare_us']:.1f} | {r['seed_added_us']:+.1f} | "
              f"{r['sync_added_us']:+.1f} | {r['free_added_us']:+.1f} | {r['graph_added_us']:+.2f} "
              f"({r['graph_added_pct']:.2f}%) | {r['graph_bare_spread_us']:.2f} | {r['check_kernel_graph_us']:.2f} | {r['host_added_us']:.1f} "
              f"({r['host_check_only_us']:.1f}) | {r['host_syncs']} |")
    print("added to a graph replay with the trap action (abort mode), us:",
          {f"{r['batch']}x{r['ctx']}": round(r["graph_trap_added_us"], 2) for r in rows})
    print("check kernel alone in a graph, us: guard action / trap action (trap code compiled in) / a 1-elem torch op")
    for r in rows:
        print(r["batch"], r["ctx"], round(r["check_kernel_graph_us"], 2), round(r["check_kernel_graph_us_trap"], 2),
              round(r["tiny_kernel_graph_us"], 2))
    print("launch shapes (entries per program/grid: us added to a graph replay of the decode):")
    for r in rows:
        print(r["batch"], r["ctx"], r["check_kernel_sweep_us"])
    print("PDL (graph replay us; added = san - bare at the same enable_pdl):")
    for r in rows:
        print(r["batch"], r["ctx"], r["pdl"])
    print("host us: whole check (_check_and_act) / rule / rule + engine / launch")
    for r in rows:
        print(r["batch"], r["ctx"], round(r["host_check_only_us"], 1), round(r["host_rule_us"], 1),
              round(r["host_engine_us"], 1), round(r["host_launch_us"], 1))


if __name__ == "__main__":
    main()
