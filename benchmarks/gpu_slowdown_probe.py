"""Why xqa runs longer after the check kernel in a graph (64 x 4096, H100): one hypothesis per variant.

Each graph is "<something> then xqa"; GPU us per replay (medians, two passes). Variants:
- xqa alone, tiny torch op, ``touch`` (a one-load Triton kernel);
- ``reduce``: a Triton kernel that loads the whole table and lengths and max-reduces them
  (uses shared memory across warps, like the check kernel);
- the check kernel as launched (4 warps), with 1 warp (intra-warp reductions: no shared memory);
- the check kernel after its function's preferred shared-memory carveout is set to 100%
  (what xqa needs), so the SM need not be reconfigured between the two kernels;
- check, then a tiny torch op, then xqa.
"""
import copy
import ctypes
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "gpu"))
sys.path.insert(0, os.path.dirname(__file__))
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from gpu_batches import decode  # noqa: E402
from gpu_bench import gpu_loop_us, graph_of, probe_step  # noqa: E402
from tsan_paged import device  # noqa: E402


@triton.jit
def touch(table_ptr, out_ptr):
    tl.store(out_ptr, tl.load(table_ptr).to(tl.int64))


@triton.jit
def reduce(table_ptr, lens_ptr, out_ptr, N, R, BLOCK: tl.constexpr, RB: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, N, BLOCK):
        acc = tl.maximum(acc, tl.load(table_ptr + start + offs, mask=start + offs < N, other=0))
    lens = tl.load(lens_ptr + tl.arange(0, RB), mask=tl.arange(0, RB) < R, other=0)
    tl.store(out_ptr, (tl.max(acc, axis=0) + tl.max(lens, axis=0)).to(tl.int64))


b, out, ring, plan = probe_step()
table, lens = b["block_tables"], b["seq_lens"]
plan1 = copy.copy(plan)
plan1.num_warps, plan1.tails = 1, {}
print("plan: grid", plan.grid, "warps", plan.num_warps, "table", tuple(table.shape), flush=True)


def check_then(extra=None, p=plan, slot=5):
    def step():
        device.run_check(p, table, lens, ring.words[slot], sticky=1, action="guard", errs=0x7F)
        if extra is not None:
            extra()
        decode(**b, out=out)
    return step


graphs = {
    "xqa": graph_of(lambda: decode(**b, out=out)),
    "tiny+xqa": graph_of(lambda: (lens.add_(0), decode(**b, out=out))),
    "touch+xqa": graph_of(lambda: (touch[(1,)](table, ring.words[8]), decode(**b, out=out))),
    "reduce+xqa": graph_of(lambda: (reduce[(1,)](table, lens, ring.words[9], table.numel(), lens.numel(),
                                                 BLOCK=2048, RB=64, num_warps=4), decode(**b, out=out))),
    "reduce1w+xqa": graph_of(lambda: (reduce[(1,)](table, lens, ring.words[10], table.numel(), lens.numel(),
                                                   BLOCK=2048, RB=64, num_warps=1), decode(**b, out=out))),
    "check+xqa": graph_of(check_then()),
    "check1w+xqa": graph_of(check_then(p=plan1, slot=6)),
    "check+tiny+xqa": graph_of(check_then(lambda: lens.add_(0), slot=7)),
}


def show(tag):
    for _ in range(2):
        res = {k: round(gpu_loop_us(g.replay, n=20), 2) for k, g in graphs.items()}
        print(tag, "us per replay", res, flush=True)


show("before carveout:")
# Every compiled check kernel (and the reduce kernel): prefer the largest shared-memory carveout.
libcuda = ctypes.CDLL("libcuda.so.1")
CARVEOUT = 9  # CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT
kernels = list(ring.launchers.values())
try:
    for fn in (device._kernel(False), reduce):
        for cache in getattr(fn, "device_caches", {}).values():
            for compiled in cache[0].values():
                compiled._init_handles()
                kernels.append(compiled)
except Exception as exc:  # noqa: BLE001 - Triton internals differ by version
    print("kernel cache walk failed:", repr(exc), flush=True)
for compiled in kernels:
    try:
        rc = libcuda.cuFuncSetAttribute(ctypes.c_void_p(compiled.function), CARVEOUT, 100)
        print("carveout 100 on", compiled.name, "smem", compiled.metadata.shared, "warps",
              compiled.metadata.num_warps, "rc", rc, flush=True)
    except Exception as exc:  # noqa: BLE001
        print("carveout failed:", repr(exc), flush=True)
graphs["check+xqa (new graph)"] = graph_of(check_then(slot=11))
graphs["reduce+xqa (new graph)"] = graph_of(lambda: (reduce[(1,)](table, lens, ring.words[12], table.numel(),
                                                                 lens.numel(), BLOCK=2048, RB=64, num_warps=4),
                                                     decode(**b, out=out)))
show("after carveout:")
