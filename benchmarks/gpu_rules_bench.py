"""What each rule's check costs on the GPU: host time per eager call, and time added to a graph replay.

    python benchmarks/gpu_rules_bench.py [--out DIR]     # on the lent H200: STEPS=rules bash benchmarks/gpu_run.sh
    Recorded: benchmarks/results/gpu_rules_bench_h200.json

For every case of ``tests/gpu/gpu_cases.py`` (a built-in rule through its library's entry point or
stand-in, a TOML rule and a Python rule on a CUDA op):

- host added: host us per eager call under ``PagedSanitizer(mode="log")`` (the deferred path: no
  sync) minus the bare call's, medians of interleaved samples;
- graph added: the call captured under the sanitizer (the check kernel in front of the call) minus
  the call captured bare, GPU us per replay; two captures of each, timed in turns over three passes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "gpu"))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from gpu_bench import graph_of, host_us, interleaved_us, median_of  # noqa: E402
from gpu_cases import CASES  # noqa: E402
from tsan_paged import PagedSanitizer  # noqa: E402


def bench(name):
    case = CASES[name]()
    case.call()
    torch.cuda.synchronize()
    graphs = {f"bare{i}": graph_of(case.call) for i in range(2)}
    with PagedSanitizer(mode="log", config=case.config, registry=case.registry) as san:
        case.call()
        torch.cuda.synchronize()
        host = {"bare": [], "san": []}
        for _ in range(3):
            host["san"].append(host_us(case.call, n=50))
            san.__exit__(None, None, None)
            host["bare"].append(host_us(case.call, n=50))
            san.__enter__()
        for i in range(2):
            graphs[f"san{i}"] = graph_of(case.call)
        san.flush()
        reports = len(san.reports)
    times = interleaved_us(graphs)
    bare, sanitized = median_of(times, "bare"), median_of(times, "san")
    spread = [statistics.median(ts) for k, ts in times.items() if k.startswith("bare")]
    return {"case": case.name, "host_bare_us": statistics.median(host["bare"]),
            "host_added_us": statistics.median(host["san"]) - statistics.median(host["bare"]),
            "graph_bare_us": bare, "graph_added_us": sanitized - bare, "graph_bare_spread_us": max(spread) - min(spread),
            "reports": reports}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    rows = []
    for name in args.cases.split(","):
        row = bench(name)
        rows.append(row)
        print(json.dumps(row), flush=True)
    device = torch.cuda.get_device_name()
    with open(os.path.join(args.out, "gpu_rules_bench.json"), "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"\n{device}, torch {torch.__version__}; medians, us")
    print("| rule (case) | host per eager call: bare / added | graph replay: bare / added | bare captures' spread |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['host_bare_us']:.1f} / {r['host_added_us']:+.1f} | {r['graph_bare_us']:.1f} / "
              f"{r['graph_added_us']:+.2f} | {r['graph_bare_spread_us']:.2f} |")


if __name__ == "__main__":
    main()
