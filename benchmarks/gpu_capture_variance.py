"""Is "added in a graph" a property of the check kernel, or of each capture? And what is the floor?

The launch-shape sweep in gpu_bench.py once measured +6 us for one shape and +12 us for shapes that
the slowdown probe had measured at +2 to +3 (its graphs were captured under the sanitizer, so they
held two checks; fixed). This captures several graphs of each thing and times them interleaved,
three passes (GPU us per replay, and minus the fastest bare graph):

- ``bare#i``: the decode alone, captured i times;
- ``san#i``: the decode captured under ``PagedSanitizer`` (the product path), i times;
- ``tiny#i``: a 1-element torch op, then the decode (what any kernel in front costs);
- ``read<B>#i``: the floor for a check: a Triton kernel whose programs each load B table entries and
  lengths and fold them into one word with ``atomic_max`` (no checks, no record), then the decode;
- ``e<N>``: the check kernel with a plan of N entries per program, then the decode.

    python benchmarks/gpu_capture_variance.py [--config 64x4096]    # STEPS=variance of gpu_run.sh

Recorded: ``benchmarks/results/gpu_capture_variance_h200.log``, ``gpu_capture_variance_h100.log``,
``gpu_capture_variance_32k_h100.log``.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "gpu"))
sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from gpu_batches import decode  # noqa: E402
from gpu_bench import gpu_loop_us, graph_of, launch_check, probe_step, shaped_plan  # noqa: E402
from tsan_paged import PagedSanitizer, device  # noqa: E402


@triton.jit
def read_all(table_ptr, lens_ptr, out_ptr, N, R, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.max(tl.load(table_ptr + offs, mask=offs < N, other=0), axis=0)
    lens = tl.max(tl.load(lens_ptr + offs, mask=offs < R, other=0), axis=0)
    tl.atomic_max(out_ptr, tl.maximum(v, lens).to(tl.int64), sem="relaxed")


parser = argparse.ArgumentParser()
parser.add_argument("--config", default="64x4096")
batch, ctx = map(int, parser.parse_args().config.split("x"))
b, out, ring, access = probe_step(batch, ctx)
table, lens = b["block_tables"], b["seq_lens"]
tensors = device.launch_tensors(access)
print(f"{batch} x {ctx}: table {tuple(table.shape)}, plan grid {device.plan_for(access).grid}", flush=True)


def check_then_decode(p, slot):
    def step():
        launch_check(ring, p, tensors, slot)
        decode(**b, out=out)
    return step


def read_then_decode(block, slot):
    def step():
        read_all[(triton.cdiv(table.numel(), block),)](table, lens, ring.words[slot], table.numel(), lens.numel(),
                                                       BLOCK=block, num_warps=4)
        decode(**b, out=out)
    return step


def sanitized_graph():
    with PagedSanitizer(mode="log"):
        return graph_of(lambda: decode(**b, out=out))


graphs = {}
for i in range(3):
    graphs[f"bare#{i}"] = graph_of(lambda: decode(**b, out=out))
    graphs[f"san#{i}"] = sanitized_graph()
for i in range(2):
    graphs[f"tiny#{i}"] = graph_of(lambda: (lens.add_(0), decode(**b, out=out)))
    for block in (1024, 4096):
        graphs[f"read{block}#{i}"] = graph_of(read_then_decode(block, 100 + block // 1024))
for entries in (1024, 2048, 8192):
    p = shaped_plan(access, entries)
    graphs[f"e{entries} grid{p.grid}"] = graph_of(check_then_decode(p, 4))

n = 20 if ctx * batch <= 64 * 4096 else 5
for pass_ in range(3):
    res = {k: round(gpu_loop_us(g.replay, n=n), 2) for k, g in graphs.items()}
    base = min(v for k, v in res.items() if k.startswith("bare"))
    print(f"pass {pass_}: us per replay, and minus the fastest bare graph", flush=True)
    for k, v in res.items():
        print(f"  {k:24s} {v:9.2f} {v - base:+7.2f}", flush=True)
torch.cuda.synchronize()
