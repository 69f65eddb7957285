"""Where a sanitized eager call's host time goes (64 x 4096, xqa, sm90).

gpu_bench.py finds "sanitized call - bare call" (host us per call) about twice the host time of
the check alone. This times, in turns over three passes (host us per call, 20 calls per sample,
the GPU synced between samples and never the bottleneck):

- ``decode``: the bare FlashInfer call; ``tiny + decode``: a 1-element torch op before it;
- ``launch``: the check kernel through the pre-bound handle alone; ``launch + decode``;
- under ``PagedSanitizer(mode="log")``: ``check`` (the sanitizer's whole check of a bound call: rule +
  launch, no decode), the unwrapped FlashInfer function (its nested entry points pass through),
  ``_call_checked`` of it, ``_on_python_call`` (bind + check + call), and ``sanitized`` (the call
  as a program makes it).

If ``launch + decode`` costs more than ``launch`` plus ``decode``, the two launches interact;
if ``sanitized`` costs more than ``check`` plus ``decode``, the wrapper does.
Run on the lent H100: ``STEPS=host bash benchmarks/gpu_run.sh``.
Recorded: ``benchmarks/results/gpu_host_probe_h100.log``.
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "gpu"))
sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
from gpu_batches import KERNEL, decode  # noqa: E402
from gpu_bench import host_us, launch_check, probe_step  # noqa: E402
from tsan_paged import PagedSanitizer, device  # noqa: E402
from tsan_paged import sanitizer as sanitizer_mod  # noqa: E402
from tsan_paged.interpose import interposer  # noqa: E402

b, out, ring, access = probe_step()
table, lens = b["block_tables"], b["seq_lens"]
plan, tensors = device.plan_for(access), device.launch_tensors(access)


def launch():
    launch_check(ring, plan, tensors, 7)


def bare():
    decode(**b, out=out)


with PagedSanitizer(mode="log"):
    patched = interposer.patched[KERNEL]
    args = patched.binder.bind((), dict(b, out=out))


cases = {
    "decode": bare,
    "tiny + decode": lambda: (lens.add_(0), bare()),
    "launch": launch,
    "launch + decode": lambda: (launch(), bare()),
}
kw = dict(b, out=out)
inside = {  # under the sanitizer: the sanitized call taken apart
    "check": lambda s: s._check_and_act(KERNEL, s._rules[KERNEL], args, patched.library_dirs),
    "original, inside": lambda s: patched.original(**kw),
    "_call_checked": lambda s: sanitizer_mod._call_checked(patched.original, **kw),
    "_on_python_call": lambda s: s._on_python_call(patched, (), kw),
    "sanitized": lambda s: bare(),
}
times = {name: [] for name in list(cases) + list(inside)}
for _ in range(3):
    for name, fn in cases.items():
        times[name].append(host_us(fn, n=20))
    with PagedSanitizer(mode="log") as s:
        for name, fn in inside.items():
            times[name].append(host_us(lambda: fn(s), n=20))
torch.cuda.synchronize()
print("host us per call, medians of three passes (each pass: median of 9 samples of 20 calls)")
for name, ts in times.items():
    print(f"  {name:18s} {statistics.median(ts):8.1f}   passes {[round(t, 1) for t in ts]}")
