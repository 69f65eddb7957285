"""Is "added in a graph" a property of the check kernel, or of each capture? (64 x 4096, xqa, sm90)

The launch-shape sweep in gpu_bench.py measured +6 us for one shape and +12 us for shapes that the
slowdown probe had measured at +2 to +3 (same machine kind, the graphs built one after another).
This captures several graphs of the same thing and times them interleaved, three passes:

- ``bare#i``: the decode alone, captured i times;
- ``san#i``: the decode captured under ``PagedSanitizer`` (the product path), i times;
- ``e<N>#i``: ``run_check`` with a plan of N entries per program, then the decode (the sweep's way);
- ``e1024 slot<k>``: the same kernel writing to another ring slot.

Run on the lent H100: ``STEPS=variance bash benchmarks/gpu_run.sh``.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "gpu"))
sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
from gpu_batches import decode  # noqa: E402
from gpu_bench import gpu_loop_us, graph_of, probe_step  # noqa: E402
from tsan_paged import PagedSanitizer, device  # noqa: E402

b, out, ring, plan = probe_step()
table, lens = b["block_tables"], b["seq_lens"]


def shaped(entries):
    return device.make_plan(plan.rows, plan.width, plan.views, plan.page_size, plan.max_len, plan.region,
                            plan.window_left, plan.q_len, plan.len_unsigned, entries=entries,
                            guard_value=plan.guard_value, tile=plan.tile)


def check_then_decode(p, slot):
    def step():
        device.run_check(p, table, lens, ring.words[slot], sticky=1, action="guard", errs=0x7F, interpret=False)
        decode(**b, out=out)
    return step


def sanitized_graph():
    with PagedSanitizer(mode="log"):
        return graph_of(lambda: decode(**b, out=out))


graphs = {}
for i in range(3):
    graphs[f"bare#{i}"] = graph_of(lambda: decode(**b, out=out))
    graphs[f"san#{i}"] = sanitized_graph()
for entries in (1024, 2048, 8192):
    p = shaped(entries)
    for i in range(2):
        graphs[f"e{entries}#{i} grid{p.grid}"] = graph_of(check_then_decode(p, 4))
for slot in (100, 200):
    graphs[f"e1024 slot{slot}"] = graph_of(check_then_decode(shaped(1024), slot))

for pass_ in range(3):
    res = {k: round(gpu_loop_us(g.replay, n=20), 2) for k, g in graphs.items()}
    base = min(v for k, v in res.items() if k.startswith("bare"))
    print(f"pass {pass_}: us per replay, and minus the fastest bare graph", flush=True)
    for k, v in res.items():
        print(f"  {k:24s} {v:9.2f} {v - base:+7.2f}", flush=True)
torch.cuda.synchronize()
