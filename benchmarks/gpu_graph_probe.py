"""Where the in-graph overhead goes (64 x 4096): graphs of xqa alone, a tiny torch op + xqa, a one-load Triton
kernel + xqa, the check kernel + xqa (no sanitizer; as launched, with the trap code compiled in, without PDL),
the sanitized step; GPU us per replay, then a profiler trace of the kernels in each."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "gpu"))
sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
from gpu_batches import decode  # noqa: E402
from gpu_bench import gpu_loop_us, graph_of, probe_step  # noqa: E402
from tsan_paged import PagedSanitizer, device  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def touch(table_ptr, out_ptr):
    tl.store(out_ptr, tl.load(table_ptr).to(tl.int64))


b, out, ring, plan = probe_step()
table, lens = b["block_tables"], b["seq_lens"]
graphs = {
    "xqa": graph_of(lambda: decode(**b, out=out)),
    "tiny+xqa": graph_of(lambda: (lens.add_(0), decode(**b, out=out))),
    "check+xqa": graph_of(lambda: (device.launch(ring, plan, table, lens, 5, 1, 2, 0x7F), decode(**b, out=out))),
    "check+xqa_nopdl": graph_of(lambda: (device.launch(ring, plan, table, lens, 5, 1, 2, 0x7F),
                                         decode(**b, out=out, enable_pdl=False))),
    "check_trapcode+xqa": graph_of(lambda: (device.run_check(plan, table, lens, ring.words[6], sticky=1, action="guard",
                                                             errs=0x7F, trap_enabled=True), decode(**b, out=out))),
    "check_pylaunch+xqa": graph_of(lambda: (device.run_check(plan, table, lens, ring.words[7], sticky=1, action="guard",
                                                             errs=0x7F), decode(**b, out=out))),
    "touch+xqa": graph_of(lambda: (touch[(1,)](table, ring.words[8]), decode(**b, out=out))),
    "check": graph_of(lambda: device.launch(ring, plan, table, lens, 5, 1, 2, 0x7F)),
}
with PagedSanitizer(mode="log"):
    graphs["sanitized"] = graph_of(lambda: decode(**b, out=out))
    for _ in range(2):
        res = {k: round(gpu_loop_us(g.replay, n=20), 2) for k, g in graphs.items()}
        print("us per replay", res, flush=True)
    from torch.profiler import ProfilerActivity, profile
    for name, g in graphs.items():
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                g.replay()
            torch.cuda.synchronize()
        evs = [e for e in prof.events() if e.device_type.name == "CUDA"]
        evs.sort(key=lambda e: e.time_range.start)
        print(f"== {name}: {len(evs)} device events in 3 replays")
        t0 = evs[0].time_range.start if evs else 0
        for e in evs[: 2 * 4]:
            print(f"   +{e.time_range.start - t0:9.1f} us  dur {e.time_range.elapsed_us():8.2f}  {e.name[:90]}")
