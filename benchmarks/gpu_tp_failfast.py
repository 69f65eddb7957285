"""Tensor parallel, fail fast, on two GPUs: how long a job takes to end after rank 1's bad table.

    python benchmarks/gpu_tp_failfast.py          # on a 2-GPU machine (gpu_run.sh STEPS=tp)
    Recorded: benchmarks/results/gpu_tp_failfast_h200x2.log

``tests/tp_worker.py`` (2 ranks, NCCL; each rank decodes its head shard with FlashInfer's xqa and
all-reduces every step) runs under ``TSAN_PAGED=abort`` (the autostart .pth) in four set-ups,
with rank 1's table made bad at step 20 of 400:

- ``tsan-paged run --mode abort -- torchrun --nproc-per-node 2 ...`` (docs/distributed.md's command),
  with the sanitizer's store watcher (``abort_peers``, the default) and without it (torchrun's
  agent alone ends the other rank);
- two processes started by a launcher of their own (as SGLang starts its TP workers), with and
  without the watcher: without it rank 0 waits in the NCCL all-reduce for the dead rank
  (NCCL's timeout is minutes; this script gives up after ``--cap`` seconds).

Prints a table: seconds from the planted fault to the job's end, exit statuses, whether rank 1
reported and wrote its report file, and what ``tsan-paged show`` says.
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "tests" / "tp_worker.py")
ARGS = ["--bad-rank", "1", "--bad-step", "20", "--steps", "400"]


def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def planted_at(text):
    lines = [line for line in text.splitlines() if line.startswith("planted ")]
    return float(lines[0].split()[1]) if lines else None


def env(config, **extra):
    base = {k: v for k, v in os.environ.items() if not k.startswith("TSAN_PAGED")}
    base.update(TSAN_PAGED_CONFIG=config, **extra)
    return base


def torchrun(config, reports, cap):
    cmd = [sys.executable, "-m", "tsan_paged.cli", "run", "--mode", "abort", "--report-dir", reports, "--",
           sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port()),
           WORKER] + ARGS
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, env=env(config), timeout=cap)
        out, codes = result.stdout + result.stderr, [result.returncode]
    except subprocess.TimeoutExpired as exc:
        out, codes = (exc.stdout or b"").decode() + (exc.stderr or b"").decode(), ["timeout"]
    return out, time.time(), codes


def own_launcher(config, reports, cap):
    master = str(port())
    procs = [subprocess.Popen([sys.executable, WORKER] + ARGS, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env(config, TSAN_PAGED="abort", TSAN_PAGED_REPORT_DIR=reports,
                                                 RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                                 MASTER_ADDR="127.0.0.1", MASTER_PORT=master))
             for r in (0, 1)]
    outs, capped = ["", ""], []
    deadline = time.time() + cap
    for r in (1, 0):
        try:
            outs[r], _ = procs[r].communicate(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            procs[r].kill()
            outs[r], _ = procs[r].communicate()
            capped.append(r)
    end = time.time()
    codes = [f"killed at the {cap:.0f} s cap" if r in capped else procs[r].returncode for r in (0, 1)]
    return outs[1] + outs[0], end, codes


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cap", type=float, default=90.0)
    args = parser.parse_args()
    rows = []
    for launcher_name, launcher in (("torchrun (tsan-paged run)", torchrun), ("own launcher", own_launcher)):
        for peers in (True, False):
            work = tempfile.mkdtemp(prefix="tsan_tp_")
            config = os.path.join(work, "tsan.toml")
            Path(config).write_text(f"abort_peers = {'true' if peers else 'false'}\n")
            reports = os.path.join(work, "reports")
            out, end, codes = launcher(config, reports, args.cap)
            planted = planted_at(out)
            files = sorted(os.listdir(reports)) if os.path.isdir(reports) else []
            shown = subprocess.run([sys.executable, "-m", "tsan_paged.cli", "show", reports], capture_output=True,
                                   text=True).stdout if files else ""
            rows.append((launcher_name, "on" if peers else "off", f"{end - planted:.2f}" if planted else "-",
                         codes, "aborting rank 1" in out, [f for f in files if "rank1" in f],
                         [line.strip() for line in shown.splitlines() if "rank 1" in line][:1]))
            print(out[-3000:], flush=True)
    print("\n| launcher | abort_peers | s from fault to job end | exit status | rank 1 reported | rank 1 report file "
          "| tsan-paged show |")
    print("| --- | --- | ---: | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")


if __name__ == "__main__":
    main()
