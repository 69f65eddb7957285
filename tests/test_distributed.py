"""Abort mode in a tensor-parallel job (gloo, 2 processes on a CPU): rank 1's bad table ends
the whole job within seconds (``tsan_paged/distributed.py``), per-rank reports, ``show``.

The job is ``tp_worker.py`` (never imports tsan_paged), started exactly as docs/distributed.md says:
``tsan-paged run --mode abort -- torchrun --nproc-per-node 2 ...``, and by a launcher of its own
(two plain processes, as SGLang spawns its TP workers) where nothing but the sanitizer's store
watcher ends the rank left computing.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
WORKER = str(TESTS / "tp_worker.py")
BIN = Path(sys.executable).parent


def env(**extra):
    base = {k: v for k, v in os.environ.items() if not k.startswith("TSAN_PAGED")}
    base.update(FLASHINFER_NO_DOWNLOAD="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    base["PATH"] = os.pathsep.join([str(BIN), base.get("PATH", "")])
    base.update(extra)
    return base


def planted_at(output: str) -> float:
    [line] = [line for line in output.splitlines() if line.startswith("planted ")]
    return float(line.split()[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_job_ends_within_seconds_of_rank_1_abort(tmp_path):
    reports = tmp_path / "reports"
    command = [str(BIN / "tsan-paged"), "run", "--mode", "abort", "--report-dir", str(reports), "--",
               str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()), WORKER,
               "--bad-rank", "1", "--bad-step", "5", "--busy-s", "60"]
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True, env=env(), timeout=120)
    ended = time.time()
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "page-out-of-range" in output and "aborting rank 1" in output, output
    assert "failed (exitcode: 86) local_rank: 1" in output, output  # torchrun names rank 1 first
    assert "done" not in output  # no rank finished its loop: rank 0 was computing for 60 s
    assert ended - planted_at(output) < 15, (ended - planted_at(output), ended - started)
    files = sorted(p.name for p in reports.iterdir())
    assert any(name.startswith("tsan_paged.rank1.") for name in files), files
    shown = subprocess.run([str(BIN / "tsan-paged"), "show", str(reports)], capture_output=True, text=True, env=env())
    assert "rank 1" in shown.stdout and "page-out-of-range" in shown.stdout, shown.stdout


@pytest.mark.parametrize("abort_peers", [True, False])
def test_own_launcher_peer_ends_only_through_the_store_watcher(tmp_path, abort_peers):
    """Two plain processes (no torchrun agent to kill the survivor): rank 0 computes for 60 s
    after the bad step; with ``abort_peers`` (the default) it ends within a second or two."""
    config = tmp_path / "tsan.toml"
    config.write_text(f"abort_peers = {'true' if abort_peers else 'false'}\n")
    port = free_port()
    procs = []
    for rank in (0, 1):
        procs.append(subprocess.Popen(
            [sys.executable, WORKER, "--bad-rank", "1", "--bad-step", "3", "--busy-s", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=env(TSAN_PAGED="abort", TSAN_PAGED_CONFIG=str(config), RANK=str(rank), WORLD_SIZE="2",
                    LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))))
    bad_out, _ = procs[1].communicate(timeout=120)
    assert procs[1].returncode == 86, bad_out
    planted = planted_at(bad_out)
    try:
        survivor_out, _ = procs[0].communicate(timeout=8)
        survived = False
    except subprocess.TimeoutExpired:
        survived = True
        procs[0].kill()
        survivor_out, _ = procs[0].communicate()
    if abort_peers:
        assert not survived and procs[0].returncode == 86, survivor_out
        assert "ending rank 0: rank 1: page-out-of-range" in survivor_out, survivor_out
        assert time.time() - planted < 10
    else:
        assert survived, survivor_out  # still computing: nothing told it


def test_readme_tp_command_exactly_as_written():
    """docs/distributed.md's command, verbatim, from the repository root."""
    root = TESTS.parent
    [line] = [line for line in (root / "docs" / "distributed.md").read_text().splitlines()
              if line.startswith("tsan-paged run --mode abort -- torchrun")]
    result = subprocess.run(line.split(), capture_output=True, text=True, env=env(), cwd=root, timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "aborting rank 1" in output and "page-out-of-range" in output, output
    assert "rank 1, 1 finding(s), 1 error(s)" in output, output  # tsan-paged run's merged summary
