"""Child process of test_gpu_graphs.py: one case captured under ``mode="abort"``, then a fault planted.

    python graph_child.py CASE guard   # abort mode, guard action: exits 86 when the record is read
    python graph_child.py CASE trap    # log mode, trap action: the device prints and stops

Prints VALID-REPLAYS-OK after clean replays, EXPECTED=check|index|value|bound, then either ends
in the sanitizer's abort (status 86), or, for the trap, CONTEXT-DEAD once the context is gone.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from gpu_cases import CASES  # noqa: E402
from tsan_paged import PagedSanitizer  # noqa: E402

name, action = sys.argv[1], sys.argv[2]
case = CASES[name]()
mode = "abort" if action == "guard" else "log"
with PagedSanitizer(mode=mode, device_action=action, config=case.config, registry=case.registry) as san:
    case.call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        case.call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        case.call()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    san.flush()
    assert not [v for v in san.reports if v.severity == "error"], san.reports
    print("VALID-REPLAYS-OK", flush=True)
    check, index, value, bound = case.plant()
    print(f"EXPECTED={check}|{', '.join(map(str, index))}|{value}|{bound}", flush=True)
    graph.replay()
    try:
        torch.cuda.synchronize()
        san.flush()  # abort mode: reads the record, reports, os._exit(86)
    except Exception as exc:
        print("CONTEXT-DEAD", type(exc).__name__, str(exc).splitlines()[0], flush=True)
        os._exit(3)
print("NOT-ABORTED", flush=True)
