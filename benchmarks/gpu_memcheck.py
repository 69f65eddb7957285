"""One planted fault (the seed's one-past-the-end entry), no sanitizer: time per decode call.

Run plain and under ``compute-sanitizer --tool memcheck`` (benchmarks/gpu_run.sh) to compare.
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "gpu"))

import torch  # noqa: E402

from gpu_batches import decode, make_batch, make_kv, plant  # noqa: E402

kv = make_kv(8657, seed=1)
b = make_batch(8, 4096, kv)
reference = decode(**b)
print("planted", plant(b, sys.argv[1] if len(sys.argv) > 1 else "seed"))
out = decode(**b)
torch.cuda.synchronize()
times = []
for _ in range(5):
    t0 = time.perf_counter()
    decode(**b, out=out)
    torch.cuda.synchronize()
    times.append((time.perf_counter() - t0) * 1e3)
row = 5
print(f"decode ms per call (median of 5): {sorted(times)[2]:.3f}")
print(f"row {row} changed vs the valid table: {not torch.equal(out[row], reference[row])}, "
      f"nan: {bool(out[row].isnan().any())}")
