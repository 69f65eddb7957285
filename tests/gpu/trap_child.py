"""Child process: capture a decode step with device_action="trap", plant a fault, replay.

Prints VALID-REPLAYS-OK, the expected record (check= position= value= bound=; position is
row * W + col for a table entry, the row for a length), then
CONTEXT-DEAD once the trap has killed the CUDA context. The device prints the trap line.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from gpu_batches import decode, make_batch, make_kv, plant  # noqa: E402
from tsan_paged import PagedSanitizer, device  # noqa: E402

fault = sys.argv[1]
kv = make_kv(8657, v_pages=8557 if fault == "v_side" else None, seed=3)
b = make_batch(8, 4096, kv)
reference = decode(**b)
out = torch.empty_like(reference)
with PagedSanitizer(mode="log", device_action="trap"):
    decode(**b, out=out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode(**b, out=out)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, reference)
    print("VALID-REPLAYS-OK", flush=True)
    check, index, value, bound = plant(b, fault)
    code = {"page-out-of-range": 0 if fault != "v_side" else 1, "seq-len-exceeds-max": 5}[check]
    position = index[0] * b["block_tables"].shape[1] + index[1] if len(index) > 1 else index[0]
    print(f"check={code} position={position} value={value} bound={bound}", flush=True)
    graph.replay()
    try:
        torch.cuda.synchronize()
        print("NOT-TRAPPED", flush=True)
    except Exception as exc:
        print("CONTEXT-DEAD", type(exc).__name__, str(exc).splitlines()[0], flush=True)
        os._exit(3)
