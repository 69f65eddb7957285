"""Why xqa runs longer after the check kernel in a graph (64 x 4096, H100): one hypothesis per variant.

Each graph is "<something> then xqa"; GPU us per replay (medians, two passes). Variants:
- xqa alone, tiny torch op, ``touch`` (a one-load Triton kernel);
- ``reduce``: a Triton kernel that loads the whole table and lengths and max-reduces them
  (uses shared memory across warps, like the check kernel);
- the check kernel as tsan_paged plans it (``check``), and that plan with 1 warp;
- check, then a tiny torch op, then xqa;
- variants of the check kernel, built from its own source (``kernel_variant``): without the
  launch-counter atomic; the fast pass alone (its flag stored, so its loads stay); without the PDL
  signal;
- the full check with other launch shapes (``SHAPES``, among them the plan used before), each
  also timed alone; the registers of each compiled kernel are printed.

Finding (logs in docs/gpu.md): what xqa pays follows the check kernel's registers and stack, not
what it does: 255 registers and a stack cost ~11 us, a 64-122 register kernel 2-3 us, about what
a kernel that only reads the table costs. (A first run also set the kernels' shared-memory carveout
to 100%: no change; that step is gone.)

``python benchmarks/gpu_slowdown_probe.py --selftest`` (CPU) builds the variants and shapes and runs
them under Triton's interpreter on a valid and a faulty table, so a GPU run does not fail on them.
"""
import copy
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
    # The fast pass alone. Its flag is stored, or the compiler drops the table loads with the slow path
    # (the first run's "fastonly" did that: 20 registers, no loads, and it looked free).
    "fastpass": [("\n    if flag != 0:\n", "\n    tl.store(slot_ptr + 47, flag.to(tl.int64))\n    if False:\n")],
}
# Launch shapes of the full check: ``make_plan`` keywords (entries per program, warps), then plan fields
# (the slow path's [sub_r, block_w] tile, the fast pass's load step fblock). They set the kernel's
# registers. "check" above is the plan tsan_paged makes now; "before" is the one it made until
# 2026-11-27 (8192-entry programs and steps, a 16 x 128 tile: 255 registers and a 312-byte stack).
SHAPES = {"before_e8192_16x128": dict(entries=8192, sub_r=16, block_w=128, fblock=8192),
          "1x128_f512": dict(entries=8192, sub_r=1, block_w=128, fblock=512),
          "1x64_f256": dict(entries=8192, sub_r=1, block_w=64, fblock=256),
          "1x128_f512_w8": dict(entries=8192, num_warps=8, sub_r=1, block_w=128, fblock=512),
          "1x128_e2048": dict(entries=2048, sub_r=1, block_w=128),
          "1x128_e1024": dict(entries=1024, sub_r=1, block_w=128),
          "1x128_e512": dict(entries=512, sub_r=1, block_w=128),
          "1x128_e1024_w2": dict(entries=1024, num_warps=2, sub_r=1, block_w=128)}


def shaped_plan(plan, shape):
    """``plan`` re-made with SHAPES keywords: make_plan's, then field overrides."""
    made = {k: shape[k] for k in ("entries", "num_warps") if k in shape}
    p = device.make_plan(plan.rows, plan.width, plan.views, plan.page_size, plan.max_len, plan.region,
                         plan.window_left, plan.q_len, plan.len_unsigned, kv_split=plan.view1_off != 0,
                         sparse_batch=plan.sparse_batch, guard_value=plan.guard_value, tile=plan.tile, **made)
    for key, value in shape.items():
        if key not in made:
            setattr(p, key, value)
    return p


def kernel_variant(name, interpret=False):
    """The check kernel's source with VARIANTS[name] applied, jitted (or interpreted)."""
    src = textwrap.dedent(inspect.getsource(device._check_kernel_src))
    for old, new in VARIANTS[name]:
        assert old in src, (name, old)
        src = src.replace(old, new)
    consts = [n for n in vars(device) if n.startswith("_K_")] + ["_tally", "_merge_finding"]
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
    for name, shape in SHAPES.items():
        sp = shaped_plan(p, shape)
        for bad in (False, True):
            t = table.clone()
            if bad:
                t[2, 3] = 100
            slot = torch.zeros(device.SLOT_WORDS, dtype=torch.int64)
            device.run_check(sp, t, lens, slot, sticky=1, action="guard", errs=0x7F)
            print(name, "grid", sp.grid, "bad" if bad else "valid", "calls", int(slot[device.CALLS]),
                  "findings", [(v.check, v.index, v.value) for v in device.decode(sp, slot[device.CALLS:].tolist())],
                  "guarded", int(t[2, 3]))
    sys.exit(0)

b, out, ring, plan = probe_step()
table, lens = b["block_tables"], b["seq_lens"]
plan1 = copy.copy(plan)
plan1.num_warps, plan1.tails = 1, {}
print("plan: grid", plan.grid, "warps", plan.num_warps, "table", tuple(table.shape), flush=True)


def check_then(extra=None, p=plan, slot=5, xqa=True):
    def step():
        device.run_check(p, table, lens, ring.words[slot], sticky=1, action="guard", errs=0x7F)
        if extra is not None:
            extra()
        if xqa:
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


def registers(fn):
    """(registers, stack bytes, shared bytes) of each compiled specialization of a jitted kernel."""
    out = []
    for cache in getattr(fn, "device_caches", {}).values():
        for compiled in cache[0].values():
            compiled._init_handles()
            out.append((compiled.n_regs, compiled.n_spills, compiled.metadata.shared))
    return out


variants = {name: kernel_variant(name) for name in VARIANTS}
for i, (name, kernel) in enumerate(variants.items()):
    graphs[f"{name}+xqa"] = graph_of(lambda k=kernel, i=i: (launch_variant(k, plan, table, lens, ring.words[20 + i],
                                                                           pdl=True), decode(**b, out=out)))
graphs["nopdl_signal+xqa"] = graph_of(lambda: (launch_variant(device._kernel(False), plan, table, lens, ring.words[30],
                                                              pdl=False), decode(**b, out=out)))
for i, (name, shape) in enumerate(SHAPES.items()):
    p = shaped_plan(plan, shape)
    compiled = device.run_check(p, table, lens, ring.words[64 + i], sticky=1, action="guard", errs=0x7F)
    compiled._init_handles()
    print("shape", name, "grid", p.grid, "block_r", p.block_r, "fblock", p.fblock, "warps", p.num_warps,
          "registers", compiled.n_regs, "spills", compiled.n_spills, flush=True)
    graphs[f"{name}+xqa"] = graph_of(check_then(p=p, slot=32 + i))
    graphs[f"{name} alone"] = graph_of(check_then(p=p, slot=48 + i, xqa=False))
graphs["check alone"] = graph_of(check_then(slot=13, xqa=False))
for name, kernel in [("check", device._kernel(False)), ("reduce", reduce)] + list(variants.items()):
    print("registers, spills, shared of", name, registers(kernel), flush=True)
show("pass:")
