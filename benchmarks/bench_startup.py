"""Start-up cost of the TSAN_PAGED hook (the installed tsan_paged_autostart.pth).

    python benchmarks/bench_startup.py      # prints a table; medians of interleaved runs

Wall time of a Python process, TSAN_PAGED unset vs set, for a process that never imports
torch and for one that imports torch and flashinfer.decode (where the sanitizer starts).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

PROGRAMS = {
    "python -c pass": "pass",
    "import torch, flashinfer.decode": "import torch, flashinfer.decode",
}


def wall(code: str, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    return time.perf_counter() - start


def main(repeats: int = 7) -> None:
    unset = {k: v for k, v in os.environ.items() if not k.startswith("TSAN_PAGED")}
    unset["FLASHINFER_NO_DOWNLOAD"] = "1"
    settings = {"TSAN_PAGED unset": unset, "TSAN_PAGED=log": dict(unset, TSAN_PAGED="log")}
    print(f"{'program':<34} {'setting':<18} {'median ms':>10} {'added ms':>9}")
    for name, code in PROGRAMS.items():
        times = {s: [] for s in settings}
        for _ in range(repeats):
            for s, env in settings.items():
                times[s].append(wall(code, env) * 1000)
        base = statistics.median(times["TSAN_PAGED unset"])
        for s in settings:
            med = statistics.median(times[s])
            print(f"{name:<34} {s:<18} {med:>10.1f} {med - base:>9.1f}")


if __name__ == "__main__":
    main()
