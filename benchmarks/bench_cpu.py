"""CPU benchmarks: what the sanitizer costs a checked call and unchecked aten ops.

    python benchmarks/bench_cpu.py            # prints a table; medians of interleaved runs

1. Per checked call of trtllm_batch_decode_with_kv_cache: what the wrapper adds before the
   kernel (argument binding + the built-in rule), for valid SGLang-style tables, next to one
   ``torch.max`` pass over the same table. Target: <= 2 x max + 20 us.
2. Checked dispatcher-op calls: binding by schema + the rule, for vLLM's paged_attention_v1
   (a declarative rule) and a Python rule on a test op.
3. Unchecked aten ops: a loop of small tensor ops, bare, inside ``with PagedSanitizer()``
   (built-in rules), with a dispatcher-op rule active (its kernel registered for that op
   alone), and under a no-op TorchDispatchMode for scale. Target: <= 1.25x bare.
4. Entering and leaving the sanitizer in a process with thousands of modules (SGLang's
   trtllm_mha backend imported, ~5,800 modules; FlashInfer alone without SGLang), in a fresh
   process: the first entry (which sweeps the modules), then a function decorated with
   ``@PagedSanitizer()`` called repeatedly. Targets: first entry <= 30 ms, steady-state
   enter + exit <= 0.3 ms.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("FLASHINFER_NO_DOWNLOAD", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import flashinfer.decode  # noqa: E402
from batches import make_batch  # noqa: E402
from tsan_paged import PagedSanitizer  # noqa: E402
from tsan_paged.interpose import interposer  # noqa: E402
from tsan_paged.rules.flashinfer import TRTLLM_DECODE  # noqa: E402

torch.set_num_threads(1)


def median_us(fn, inner: int, repeats: int = 15) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter_ns() - start) / inner / 1000)
    return statistics.median(samples)


def bench_checked_calls():
    rows = []
    for batch_size, width in [(8, 128), (32, 256), (64, 512), (256, 512)]:
        batch = make_batch(batch=batch_size, width=width, page_size=64, num_pages=batch_size * width,
                           lengths=torch.randint(1, width * 64, (batch_size,), generator=torch.Generator().manual_seed(0)))
        table = batch["block_tables"]
        with PagedSanitizer(mode="raise") as san:
            patched = interposer.patched[TRTLLM_DECODE]
            rules = san._rules[TRTLLM_DECODE]

            def checked_call():
                san._check_and_act(TRTLLM_DECODE, rules, patched.binder.bind((), batch), ())

            def one_max():
                torch.max(table)

            inner = 200 if table.numel() < 50_000 else 50
            check, reduction = [], []
            for _ in range(3):  # interleave to share the machine's noise
                check.append(median_us(checked_call, inner))
                reduction.append(median_us(one_max, inner))
            check, reduction = statistics.median(check), statistics.median(reduction)
            assert not san.reports
        rows.append((f"{batch_size}x{width}", check, reduction, 2 * reduction + 20))
    return rows


def bench_dispatcher_rules():
    """Bind + check of the vLLM paged_attention_v1 rule (declarative) and the test op's Python rule."""
    import vllm_ops  # noqa: F401
    from paged_ops import registry as op_registry
    from test_vllm import attention_inputs
    from tsan_paged.dispatch import bind_schema

    rows = []
    a = attention_inputs(num_seqs=64, max_seq_len=4096)
    cases = [("_C::paged_attention_v1 (TOML-style rule), 64 x 256", "_C::paged_attention_v1",
              torch.ops._C.paged_attention_v1.default, tuple(a.values()), None)]
    table = torch.randint(0, 10, (64, 256), dtype=torch.int32)
    cases.append(("tsan_test::paged_gather (Python rule), 64 x 256", "tsan_test::paged_gather",
                  torch.ops.tsan_test.paged_gather.default,
                  (torch.randn(10, 4, 3), table, torch.full((64,), 1024), 4), op_registry))
    for name, target, op, args, registry in cases:
        with PagedSanitizer(mode="raise", registry=registry) as san:
            rules = san._rules[target]
            rows.append((name, median_us(lambda: san._check_and_act(target, rules, bind_schema(op, args, {}), ()), 200)))
            assert not san.reports, san.reports
    return rows


class NoOpMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def bench_unchecked_aten():
    sys.modules.setdefault("paged_ops", __import__("paged_ops"))
    from paged_ops import registry as op_registry

    a, b = torch.randn(16), torch.randn(16)

    def loop():
        for _ in range(100):
            torch.mul(torch.add(a, b), b).sum()

    settings = {
        "bare": lambda: _null(),
        "PagedSanitizer() (no dispatcher rule)": lambda: PagedSanitizer(),
        "PagedSanitizer() + a dispatcher-op rule": lambda: PagedSanitizer(registry=op_registry),
        "no-op TorchDispatchMode (reference)": lambda: NoOpMode(),
    }
    results = {name: [] for name in settings}
    for _ in range(5):
        for name, make in settings.items():
            with make():
                results[name].append(median_us(loop, 20, repeats=5) / 300)  # per aten op
    med = {name: statistics.median(v) for name, v in results.items()}
    return [(name, us, us / med["bare"]) for name, us in med.items()]


ENTRY_PROBE = r"""
import os, statistics, sys, time
os.environ.setdefault("FLASHINFER_NO_DOWNLOAD", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")
import warnings
warnings.simplefilter("ignore")
import torch
try:
    import sglang.srt.layers.attention.trtllm_mha_backend  # noqa: F401
    what = "SGLang trtllm_mha backend"
except Exception:
    import flashinfer.decode  # noqa: F401
    what = "FlashInfer (no SGLang)"
start = time.perf_counter()
from tsan_paged import PagedSanitizer
sanitizer = PagedSanitizer()
built = time.perf_counter()
sanitizer.__enter__()
entered = time.perf_counter()
sanitizer.__exit__(None, None, None)
left = time.perf_counter()

@PagedSanitizer()
def decorated():
    pass

def plain():
    pass

def per_call(fn, n=200):
    samples = []
    for _ in range(15):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t) / n * 1e3)
    return statistics.median(samples)

decorated()
steady = per_call(decorated) - per_call(plain)
print(what, len(sys.modules), (built - start) * 1e3, (entered - built) * 1e3, (left - entered) * 1e3, steady)
"""


def bench_entry():
    """``(what, modules, import ms, first enter ms, first exit ms, steady enter + exit ms)``, fresh process."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", ENTRY_PROBE], capture_output=True, text=True, timeout=600,
                         cwd=os.path.join(os.path.dirname(__file__), ".."))
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    *what, modules, imported, first, leave, steady = out.stdout.split()
    return " ".join(what), int(modules), float(imported), float(first), float(leave), float(steady)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def main():
    print(f"torch {torch.__version__}, flashinfer {flashinfer.__version__}, 1 thread, medians\n")
    print("Checked call of trtllm_batch_decode_with_kv_cache (bind + rule), valid tables")
    print(f"{'table':>10} {'check us':>10} {'torch.max us':>13} {'target us':>10} {'met':>5}")
    for name, check, reduction, target in bench_checked_calls():
        print(f"{name:>10} {check:>10.1f} {reduction:>13.1f} {target:>10.1f} {'yes' if check <= target else 'NO':>5}")
    print("\nChecked dispatcher-op call (bind by schema + rule), valid inputs")
    for name, us in bench_dispatcher_rules():
        print(f"{name:<52} {us:>7.1f} us")
    print("\nUnchecked aten ops (add/mul/sum on 16 floats)")
    print(f"{'setting':<42} {'us/op':>7} {'ratio':>6}")
    for name, us, ratio in bench_unchecked_aten():
        print(f"{name:<42} {us:>7.2f} {ratio:>5.2f}x")
    what, modules, imported, first, leave, steady = bench_entry()
    print(f"\nEntering the sanitizer, fresh process with {what} imported ({modules} modules)")
    print(f"{'':<44} {'ms':>7} {'target':>7} {'met':>4}")
    print(f"{'import tsan_paged + PagedSanitizer()':<44} {imported:>7.2f} {'':>7} {'':>4}")
    print(f"{'first enter (sweeps the modules)':<44} {first:>7.2f} {30:>7} {'yes' if first <= 30 else 'NO':>4}")
    print(f"{'first exit':<44} {leave:>7.2f} {'':>7} {'':>4}")
    print(f"{'@PagedSanitizer() call, enter + exit':<44} {steady:>7.3f} {0.3:>7} {'yes' if steady <= 0.3 else 'NO':>4}")


if __name__ == "__main__":
    main()
