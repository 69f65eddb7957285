"""A whole process tree: TSAN_PAGED, `tsan-paged run`, per-process reports, abort, configs.

Every program here is unmodified: it never imports tsan_paged. The sanitizer starts from
the installed ``tsan_paged_autostart.pth`` because ``TSAN_PAGED`` is in the environment.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

WORKER_PROGRAM = textwrap.dedent("""
    import multiprocessing as mp
    import os
    import sys

    import flashinfer.decode
    from batches import make_batch

    def serve(bad):
        # A worker loop that swallows every exception, like a serving engine's.
        batch = make_batch(lengths=[20, 40], num_pages=30)
        if bad:
            batch["block_tables"][1, 2] = 31
        for _ in range(3):
            try:
                flashinfer.decode.trtllm_batch_decode_with_kv_cache(**batch)
            except Exception as exc:
                print(f"worker {os.getpid()} swallowed {type(exc).__name__}", flush=True)
        print(f"worker {os.getpid()} finished", flush=True)

    if __name__ == "__main__":
        ctx = mp.get_context(sys.argv[1] if len(sys.argv) > 1 else "spawn")
        workers = [ctx.Process(target=serve, args=(bad,)) for bad in (True, False)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        print("exitcodes", [w.exitcode for w in workers], flush=True)
""")


@pytest.fixture
def program(tmp_path):
    path = tmp_path / "server.py"
    path.write_text(WORKER_PROGRAM)
    return path


def env(**extra):
    base = {k: v for k, v in os.environ.items() if not k.startswith("TSAN_PAGED")}
    base.update(FLASHINFER_NO_DOWNLOAD="1", PYTHONPATH=os.pathsep.join([str(TESTS), base.get("PYTHONPATH", "")]))
    base.update(extra)
    return base


def run(cmd, **extra):
    return subprocess.run(cmd, capture_output=True, text=True, env=env(**extra), timeout=300)


def records(report_dir):
    out = {}
    for path in Path(report_dir).glob("tsan_paged.*.jsonl"):
        out[path.name] = [json.loads(line) for line in path.read_text().splitlines()]
    return out


def test_unset_means_off(program):
    result = run([sys.executable, str(program)])
    assert result.returncode == 0, result.stderr
    assert "tsan_paged" not in result.stderr
    assert result.stdout.count("swallowed ValueError") == 6  # FlashInfer's own CPU refusal, both workers


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_raise_in_spawned_workers(program, tmp_path, start_method):
    result = run([sys.executable, str(program), start_method], TSAN_PAGED="raise", TSAN_PAGED_REPORT_DIR=str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("swallowed PageTableViolation") == 3  # the bad worker
    assert result.stdout.count("swallowed ValueError") == 3  # the good worker reached FlashInfer
    files = records(tmp_path / "r")
    bad = [recs for recs in files.values() if any(r["type"] == "violation" for r in recs)]
    assert len(bad) == 1
    [violation] = [r for r in bad[0] if r["type"] == "violation"]  # deduplicated
    assert (violation["check"], violation["index"], violation["value"]) == ("page-out-of-range", [1, 2], 31)
    [summary] = [r for r in bad[0] if r["type"] == "summary"]
    assert summary["counts"][0][-1] == 3  # counted three times


def test_abort_ends_a_worker_that_swallows_exceptions(program, tmp_path):
    result = run([sys.executable, str(program)], TSAN_PAGED="abort", TSAN_PAGED_REPORT_DIR=str(tmp_path / "r"))
    assert "exitcodes [86, 0]" in result.stdout, result.stdout + result.stderr
    assert "swallowed PageTableViolation" not in result.stdout
    assert result.stdout.count("finished") == 1  # only the good worker
    assert "aborting (mode=abort, exit status 86)" in result.stderr
    [bad] = [recs for recs in records(tmp_path / "r").values() if any(r["type"] == "violation" for r in recs)]
    assert [r["type"] for r in bad] == ["start", "violation", "summary"]  # flushed before the process ended


def test_tsan_paged_run_merges_the_tree_and_keeps_the_status(program, tmp_path):
    report_dir = tmp_path / "reports"
    result = run([sys.executable, "-m", "tsan_paged.cli", "run", "--mode", "log", "--report-dir", str(report_dir),
                  "--", sys.executable, str(program)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("swallowed ValueError") == 6  # log mode: every call reached FlashInfer
    assert "merged: 3 error(s), 0 warning(s) in 1 distinct finding(s)" in result.stderr
    assert "block_tables[1, 2] = 31" in result.stderr
    shown = run([sys.executable, "-m", "tsan_paged.cli", "show", str(report_dir)])
    assert shown.returncode == 0 and "merged: 3 error(s)" in shown.stdout

    aborted = run([sys.executable, "-m", "tsan_paged.cli", "run", "--mode", "abort", "--report-dir",
                   str(tmp_path / "a"), "--", sys.executable, "-c",
                   "import runpy, sys; sys.argv = ['server.py']; runpy.run_path(sys.argv[0] if False else "
                   f"{str(program)!r}, run_name='__main__')"])
    assert "exitcodes [86, 0]" in aborted.stdout
    failing = run([sys.executable, "-m", "tsan_paged.cli", "run", "--", sys.executable, "-c", "raise SystemExit(7)"])
    assert failing.returncode == 7


CLEAN_PROGRAM = textwrap.dedent("""
    import os, signal, sys, time
    from batches import call_kernel, make_batch

    batch = make_batch(num_pages=30, lengths=[20, 40])
    for _ in range(int(sys.argv[1])):
        call_kernel(batch)
    if sys.argv[2] == "kill":  # a server's worker SIGKILLed by its parent: no exit handler runs
        time.sleep(float(sys.argv[3]))
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_clean_run_says_what_it_checked(tmp_path):
    """Issue 19: a clean run must tell "checked 5 calls, 0 findings" from "never active"."""
    program = tmp_path / "clean.py"
    program.write_text(CLEAN_PROGRAM)
    report_dir = tmp_path / "reports"
    result = run([sys.executable, "-m", "tsan_paged.cli", "run", "--report-dir", str(report_dir), "--",
                  sys.executable, str(program), "5", "exit"])
    assert result.returncode == 0, result.stderr
    target = "flashinfer.decode:trtllm_batch_decode_with_kv_cache"
    assert f"1 process(es) sanitized; 5 call(s) checked; 0 finding(s), 0 error(s)" in result.stderr, result.stderr
    assert re.search(rf"{re.escape(target)}\s+5  \(5 on the host\)", result.stderr), result.stderr
    # the process's own summary at exit carries the counts too, with no finding
    assert "tsan_paged summary: 0 error(s), 0 warning(s) in 0 distinct finding(s); 5 call(s) checked" in result.stderr
    [(name, recs)] = records(report_dir).items()
    assert [r["type"] for r in recs] == ["start", "summary"]
    assert recs[0]["argv"][-3:] == [str(program), "5", "exit"]
    assert recs[1]["checked"] == [[target, "host", 5]]
    shown = run([sys.executable, "-m", "tsan_paged.cli", "show", str(report_dir)])
    assert shown.returncode == 0 and "5 call(s) checked" in shown.stdout

    # a process that checks nothing is still listed as sanitized, so "nothing checked" is visible
    idle = run([sys.executable, "-m", "tsan_paged.cli", "run", "--report-dir", str(tmp_path / "idle"), "--",
                sys.executable, "-c", "import torch"])
    assert "1 process(es) sanitized; 0 call(s) checked" in idle.stderr, idle.stderr
    assert "no call of a checked target was made" in idle.stderr
    # and a command in which nothing was sanitized says so
    bare = run([sys.executable, "-m", "tsan_paged.cli", "run", "--report-dir", str(tmp_path / "bare"), "--",
                sys.executable, "-c", "pass"])
    assert "no process of the command was sanitized" in bare.stderr, bare.stderr


def test_a_clean_process_without_a_report_dir_says_what_it_checked_at_exit(tmp_path):
    """``TSAN_PAGED=log`` (and the pytest session) with built-in rules only and no report directory:
    the exit summary still says how many calls were checked, also with nothing found."""
    program = tmp_path / "clean.py"
    program.write_text(CLEAN_PROGRAM)
    result = run([sys.executable, str(program), "3", "exit"], TSAN_PAGED="log")
    assert result.returncode == 0, result.stderr
    assert "tsan_paged summary: 0 error(s), 0 warning(s) in 0 distinct finding(s); 3 call(s) checked" in result.stderr, \
        result.stderr


def test_a_killed_process_leaves_its_counts(tmp_path):
    """A worker SIGKILLed by its parent runs no exit handler: its counts, written while it ran, remain."""
    from tsan_paged.report import CHECKED_FLUSH_S

    program = tmp_path / "killed.py"
    program.write_text(CLEAN_PROGRAM)
    result = run([sys.executable, str(program), "4", "kill", str(CHECKED_FLUSH_S * 2)], TSAN_PAGED="log",
                 TSAN_PAGED_REPORT_DIR=str(tmp_path / "r"))
    assert result.returncode == -9
    [(name, recs)] = records(tmp_path / "r").items()
    assert [r["type"] for r in recs] == ["start", "checked"]
    assert recs[1]["checked"] == [["flashinfer.decode:trtllm_batch_decode_with_kv_cache", "host", 4]]
    shown = run([sys.executable, "-m", "tsan_paged.cli", "show", str(tmp_path / "r")])
    assert "4 call(s) checked" in shown.stdout and "(no exit summary: counts as last written)" in shown.stdout, shown.stdout


def test_a_process_killed_when_it_goes_idle_leaves_all_its_counts(tmp_path):
    """A server is stopped right after its last request: its workers, busy until then and SIGKILLed
    a moment later, must leave every call they checked, not those of their last periodic write."""
    from tsan_paged.report import CHECKED_FLUSH_S, CHECKED_IDLE_S

    program = tmp_path / "busy.py"
    program.write_text(textwrap.dedent("""
        import os, signal, sys, time
        from batches import call_kernel, make_batch

        batch = make_batch(num_pages=30, lengths=[20, 40])
        calls, end = 0, time.monotonic() + float(sys.argv[1])
        while time.monotonic() < end:  # busy past the first periodic write
            call_kernel(batch)
            calls += 1
        print(calls, flush=True)
        time.sleep(float(sys.argv[2]))
        os.kill(os.getpid(), signal.SIGKILL)
    """))
    result = run([sys.executable, str(program), str(CHECKED_FLUSH_S * 1.5), str(CHECKED_IDLE_S * 5)],
                 TSAN_PAGED="log", TSAN_PAGED_REPORT_DIR=str(tmp_path / "r"))
    assert result.returncode == -9, result.stderr
    calls = int(result.stdout.split()[-1])
    [(name, recs)] = records(tmp_path / "r").items()
    assert [r["type"] for r in recs][0] == "start" and recs[-1]["type"] == "checked"
    assert len(recs) >= 3  # one write while busy, one when it went idle
    assert recs[-1]["checked"] == [["flashinfer.decode:trtllm_batch_decode_with_kv_cache", "host", calls]]


FORK_PROGRAM = textwrap.dedent("""
    import multiprocessing as mp
    from batches import call_kernel, make_batch

    def child():
        call_kernel(make_batch(num_pages=30, lengths=[20, 40]))

    if __name__ == "__main__":
        batch = make_batch(num_pages=30, lengths=[20, 40])
        for _ in range(3):
            call_kernel(batch)
        worker = mp.get_context("fork").Process(target=child)
        worker.start()
        worker.join()
""")


def test_a_forked_child_counts_its_own_calls(tmp_path):
    """A fork copies the parent's counts: the child must count only its own (and write them)."""
    program = tmp_path / "forks.py"
    program.write_text(FORK_PROGRAM)
    result = run([sys.executable, str(program)], TSAN_PAGED="log", TSAN_PAGED_REPORT_DIR=str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    checked = {}
    for recs in records(tmp_path / "r").values():
        [summary] = [r for r in recs if r["type"] == "summary"]
        checked[summary["pid"]] = sum(n for _, _, n in summary["checked"])
    assert sorted(checked.values()) == [1, 3], checked


def test_rank_in_the_report_file_name(tmp_path):
    code = "from batches import make_batch, call_kernel\nb = make_batch(num_pages=30, lengths=[20, 40])\n" \
           "b['block_tables'][0, 0] = -1\ncall_kernel(b)\n"
    result = run([sys.executable, "-c", code], TSAN_PAGED="log", TSAN_PAGED_REPORT_DIR=str(tmp_path), RANK="3")
    assert result.returncode == 0, result.stderr
    [name] = records(tmp_path)
    assert name.startswith("tsan_paged.rank3.") and name.endswith(".jsonl")


def test_subprocess_children_inherit(tmp_path):
    child = "from batches import make_batch, call_kernel\nb = make_batch(num_pages=30, lengths=[20, 40])\n" \
            "b['block_tables'][0, 0] = 99\ncall_kernel(b)\n"
    parent = f"import subprocess, sys\nsys.exit(subprocess.call([sys.executable, '-c', {child!r}]))\n"
    result = run([sys.executable, "-c", parent], TSAN_PAGED="raise")
    assert result.returncode != 0 and "PageTableViolation" in result.stderr


@pytest.mark.parametrize("content,message", [
    ('mode = "log"\nbogus = 1\n', "unknown key 'bogus'"),
    ('[checks]\n"page-oob" = "off"\n', "unknown check id 'page-oob'"),
    ('max_dumps = "many"\n', "'max_dumps' must be a int"),
    ('[[suppress]]\nwhere = "x"\n', "suppress entry 1: unknown key 'where'"),
])
def test_bad_config_stops_the_process_at_start(tmp_path, content, message):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    result = run([sys.executable, "-c", "print('ran')"], TSAN_PAGED="1", TSAN_PAGED_CONFIG=str(path))
    assert result.returncode == 2 and "ran" not in result.stdout
    assert f"TSAN_PAGED_CONFIG: {path}" in result.stderr and message in result.stderr
    bad_mode = run([sys.executable, "-c", "print('ran')"], TSAN_PAGED="loud")
    assert bad_mode.returncode == 2 and "TSAN_PAGED='loud'" in bad_mode.stderr


def test_suppressions(tmp_path):
    from batches import call_kernel, make_batch
    from tsan_paged import PagedSanitizer

    config = {"suppress": [{"check": "page-out-of-range", "caller": "*batches.py:*"}]}
    batch = make_batch(num_pages=30, lengths=[20, 40])
    batch["block_tables"][1, 2] = 31
    with PagedSanitizer(mode="raise", config=config) as san:
        assert call_kernel(batch)  # suppressed: no raise, the kernel is called
    assert san.reports == [] and san.suppressed == 1
    with PagedSanitizer(mode="raise", config={"suppress": [{"check": "dead-*"}]}), pytest.raises(Exception) as info:
        call_kernel(batch)
    assert type(info.value).__name__ == "PageTableViolation"


def test_validating_a_config_with_rules_imports_no_torch(tmp_path):
    """TSAN_PAGED_CONFIG is validated at every process start, before torch: its [[rule]] tables
    must not pull torch in (a process that never uses torch pays only the config's parsing)."""
    path = tmp_path / "rules.toml"
    path.write_text('[[rule]]\ntarget = "mylib::paged_decode"\ntable = "t"\nbuffers = ["kv"]\n')
    code = f"import sys\nfrom tsan_paged import config\nconfig.load({str(path)!r})\nprint('torch' in sys.modules)"
    result = run([sys.executable, "-c", code])
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr
