"""Why xqa runs longer after the check kernel in a graph (64 x 4096, H100): one hypothesis per variant.

Each graph is "<something> then xqa"; GPU us per replay (medians, two passes). Variants:
- xqa alone, tiny torch op, ``touch`` (a one-load Triton kernel);
- ``reduce``: a Triton kernel that loads the whole table and lengths and max-reduces them
  (uses shared memory across warps, like the check kernel);
- the check kernel as launched (4 warps), with 1 warp (intra-warp reductions: no shared memory);
- the check kernel after its function's preferred shared-memory carveout is set to 100%
  (what xqa needs), so the SM need not be reconfigured between the two kernels;
- check, then a tiny torch op, then xqa;
- variants of the check kernel, built from its own source (``kernel_variant``): without the
  launch-counter atomic, without the slow path compiled in (``if flag != 0`` made ``if False``),
  without the PDL signal, and all three; they isolate what the check does beyond ``reduce``.

``python benchmarks/gpu_slowdown_probe.py --selftest`` (CPU) builds the variants and runs them
under Triton's interpreter on a valid and a faulty table, so a GPU run does not fail on them.
"""
import copy
import ctypes
import importlib.util
import inspect
import os
import sys
import tempfile
import textwrap

if "--selftest" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton's import

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


VARIANTS = {  # name -> [(text in _check_kernel_src, replacement)]
    "nocount": [('tl.atomic_add(slot_ptr + _K_CALLS, 1, sem="relaxed")', "pass")],
    "fastonly": [("\n    if flag != 0:\n", "\n    if False:\n")],
}
VARIANTS["fastonly_nocount"] = VARIANTS["nocount"] + VARIANTS["fastonly"]


def kernel_variant(name, interpret=False):
    """The check kernel's source with VARIANTS[name] applied, jitted (or interpreted)."""
    src = textwrap.dedent(inspect.getsource(device._check_kernel_src))
    for old, new in VARIANTS[name]:
        assert old in src, (name, old)
        src = src.replace(old, new)
    consts = [n for n in vars(device) if n.startswith("_K_")]
    path = os.path.join(tempfile.mkdtemp(), f"check_variant_{name}.py")
    with open(path, "w") as f:  # Triton reads a kernel's source from its file
        f.write("import triton\nimport triton.language as tl\n"
                f"from tsan_paged.device import {', '.join(consts)}\n\n{src}")
    spec = importlib.util.spec_from_file_location(f"check_variant_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction
        return InterpretedFunction(module._check_kernel_src)
    return triton.jit(module._check_kernel_src, do_not_specialize=list(range(3, 23)))


def launch_variant(kernel, p, table, lens, slot, pdl, interpret=False):
    align = p.align if table.data_ptr() % 16 == 0 else 1  # as run_check and launch do
    args = device._args(p, table, lens, slot, 1, device.ACTION_CODES["guard"], 0x7F, False, align, pdl)
    return kernel[(p.grid,)](*args) if interpret else kernel[(p.grid,)](*args, num_warps=p.num_warps)


if "--selftest" in sys.argv:
    import torch

    views = (("kv_cache", 100, None),)
    p = device.plan_for(4, 8, views, 16, None, device.REGION_XQA, -1, 1, False)
    table = torch.randint(0, 100, (4, 8), dtype=torch.int32)
    lens = torch.full((4,), 100, dtype=torch.int32)
    for name in VARIANTS:
        kernel = kernel_variant(name, interpret=True)
        for bad in (False, True):
            t = table.clone()
            if bad:
                t[2, 3] = 100
            slot = torch.zeros(device.SLOT_WORDS, dtype=torch.int64)
            launch_variant(kernel, p, t, lens, slot, pdl=False, interpret=True)
            print(name, "bad" if bad else "valid", "calls", int(slot[device.CALLS]),
                  "findings", device.decode(p, slot[device.CALLS:].tolist()))
    sys.exit(0)

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


variants = {name: kernel_variant(name) for name in VARIANTS}
for i, (name, kernel) in enumerate(variants.items()):
    graphs[f"{name}+xqa"] = graph_of(lambda k=kernel, i=i: (launch_variant(k, plan, table, lens, ring.words[20 + i],
                                                                           pdl=True), decode(**b, out=out)))
graphs["nopdl_signal+xqa"] = graph_of(lambda: (launch_variant(device._kernel(False), plan, table, lens, ring.words[30],
                                                              pdl=False), decode(**b, out=out)))
graphs["fastonly_nocount_nopdl+xqa"] = graph_of(lambda: (launch_variant(variants["fastonly_nocount"], plan, table, lens,
                                                                        ring.words[31], pdl=False),
                                                         decode(**b, out=out)))
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
