"""Run vLLM 0.33.0's own attention tests under tsan_paged on a CPU, and print what was found.

    .venv/bin/python tests/owner_suites/vllm_suite.py --quick     # a few cases of each file, minutes
    .venv/bin/python tests/owner_suites/vllm_suite.py             # the documented run (docs/vllm.md), ~25 min on 2 cores

vLLM's tests are not in this repository: they are taken at run time from vLLM 0.33.0's source
distribution on PyPI (``vllm-0.33.0.tar.gz``, checked against its sha256; cached in
``--cache-dir``), or from ``--sdist`` (that file, or an extracted source tree). ``pip download
--no-binary :all: vllm==0.33.0`` cannot fetch it here: pip builds the sdist's metadata, which needs
vLLM's build requirements (torch==2.14.0), so the file's address and hash are read from the
package index's JSON API (PEP 691), as pip reads them, and the file is downloaded directly.

Into a temporary directory outside the repository go: vLLM's ``tests/`` (for its helpers), the
three test files with our edits applied (``vllm_edits.py``: CPU device, fp16 for bf16, fewer
parameter cases, the PLANT hooks; each edit marked ``CPU-EDIT`` / ``PLANT harness``), our conftest
files (``conftest_template.py``, ``v1_conftest_template.py``) and the Qwen3 config.json the backend
test reads. Each file then runs as its own pytest process: bare, under ``--paged-sanitizer=raise``,
and under ``--paged-sanitizer=raise`` once per planting mode (``PLANT=...``: one out-of-range entry
written into a table the test built, just before the kernel call). The conftest records per test
the faults planted, the sanitizer's reports and the calls it checked; the sanitizer's report
directory (``TSAN_PAGED_REPORT_DIR``) gives each process's counts.

A planted fault is found when the test's reports are exactly its planted faults: same check id,
same argument, same index. A test whose plant no checked call reached (a stand-in lacks the op
and the test fails before the call) counts as not reached, not as missed. Exit status 1 when a
sanitized run of valid tables has any finding, a planted fault is missed (or a report comes
without one), or a pytest process did not run to its end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_TESTS = HERE.parent
sys.path.insert(0, str(HERE))
import vllm_edits  # noqa: E402

VERSION = "0.33.0"
SDIST = f"vllm-{VERSION}.tar.gz"
SDIST_SHA256 = "f4c33c2503d52bb411146afa9618a4f48bed68912f617e6803ac8d76e4c74112"
INDEX = "https://pypi.org/simple/vllm/"

UA_PLANTS = "not splitk_admission and not reduce_segments and not softcap_does and not softmax_recovers and not clamped_mm_prefix_p"

# file key -> (path in the run dir, {mode: -k selection}, {plant mode: (check, arg) expected})
# modes: "bare", "sanitized" and one per plant mode; None selects every case of the edited file.
SUITES = {
    "cache": dict(
        path="test_cache.py",
        title="kernels/attention/test_cache.py",
        full={m: "test_reshape_and_cache or test_concat_and_cache_mla" for m in ("bare", "sanitized", "slot")},
        quick={m: "test_reshape_and_cache" for m in ("bare", "sanitized", "slot")},
        expect={"slot": ("page-out-of-range", "slot_mapping")},
    ),
    "backends": dict(
        path="v1/test_attention_backends.py",
        title="v1/attention/test_attention_backends.py::test_causal_backend_correctness (TRITON_ATTN)",
        full={m: "test_causal_backend_correctness and not large and not medium_prefill"
              for m in ("bare", "sanitized", "table", "slot")},
        quick={m: "test_causal_backend_correctness and small_decode" for m in ("bare", "sanitized", "table", "slot")},
        expect={"table": ("page-out-of-range", "block_table"), "slot": ("page-out-of-range", "slot_mapping")},
    ),
    "ua": dict(
        path="test_triton_unified_attention.py",
        title="kernels/attention/test_triton_unified_attention.py",
        full={"bare": None, "sanitized": None, "last": UA_PLANTS, "first": UA_PLANTS,
              "dead0": "test_triton_unified_attn[ and -64-"},
        quick={"bare": "test_triton_unified_attn[0- and -64-", "sanitized": "test_triton_unified_attn[0- and -64-",
               "last": "test_triton_unified_attn[0- and -64-", "first": "test_triton_unified_attn[0- and -64-",
               "dead0": "test_triton_unified_attn[0- and -64-"},
        expect={"last": ("page-out-of-range", "block_table"), "first": ("page-out-of-range", "block_table"),
                "dead0": ("dead-page-out-of-range", "block_table")},
    ),
}


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- vLLM's source distribution

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_sdist(cache_dir: Path) -> Path:
    target = cache_dir / SDIST
    if target.exists():
        if sha256(target) != SDIST_SHA256:
            sys.exit(f"{target}: sha256 is not vLLM {VERSION}'s sdist ({SDIST_SHA256}); remove it")
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    log(f"reading {INDEX} for {SDIST}")
    req = urllib.request.Request(INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        files = json.load(r)["files"]
    [entry] = [f for f in files if f["filename"] == SDIST]
    if entry["hashes"].get("sha256") != SDIST_SHA256:
        sys.exit(f"the index's sha256 for {SDIST} is {entry['hashes'].get('sha256')}, not {SDIST_SHA256}")
    log(f"downloading {entry['url']}")
    part = target.with_suffix(".part")
    with urllib.request.urlopen(entry["url"], timeout=600) as r, open(part, "wb") as f:
        shutil.copyfileobj(r, f)
    if sha256(part) != SDIST_SHA256:
        part.unlink()
        sys.exit(f"downloaded {SDIST}: sha256 mismatch")
    part.rename(target)
    return target


def vllm_tests(args, work: Path) -> Path:
    """The directory holding vLLM's ``tests/`` (a copy under ``work``)."""
    src = work / "src"
    if args.sdist and Path(args.sdist).is_dir():
        tree = Path(args.sdist).resolve()
        if not (tree / "tests" / "kernels" / "attention" / "test_cache.py").exists():
            sys.exit(f"--sdist {tree}: no tests/kernels/attention/test_cache.py (not a vLLM source tree)")
        shutil.copytree(tree / "tests", src / "tests")
        return src
    path = Path(args.sdist).resolve() if args.sdist else download_sdist(Path(args.cache_dir).expanduser())
    if sha256(path) != SDIST_SHA256:
        sys.exit(f"{path}: sha256 is not vLLM {VERSION}'s sdist ({SDIST_SHA256})")
    prefix = f"vllm-{VERSION}/tests/"
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = m.name[len(f"vllm-{VERSION}/"):]
        tar.extractall(src, members=members, filter="data")
    return src


def prepare(args, work: Path) -> Path:
    src = vllm_tests(args, work)
    t = src / "tests"
    run = work / "run"
    (run / "v1").mkdir(parents=True)
    model = work / "models" / "qwen3"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(vllm_edits.QWEN3_CONFIG))
    (run / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    (run / "conftest.py").write_text((HERE / "conftest_template.py").read_text().replace("@REPO_TESTS@", str(REPO_TESTS)))
    (run / "v1" / "conftest.py").write_text((HERE / "v1_conftest_template.py").read_text().replace("@VLLM_SRC@", str(src)))
    (run / "test_triton_unified_attention.py").write_text(
        vllm_edits.unified_attention((t / "kernels/attention/test_triton_unified_attention.py").read_text()))
    (run / "test_cache.py").write_text(vllm_edits.cache((t / "kernels/attention/test_cache.py").read_text(), str(src)))
    (run / "v1" / "test_attention_backends.py").write_text(
        vllm_edits.attention_backends((t / "v1/attention/test_attention_backends.py").read_text(), str(model)))
    return run


# ---------------------------------------------------------------- one pytest process

def run_pytest(run: Path, work: Path, key: str, mode: str, select) -> dict:
    suite = SUITES[key]
    name = f"{key}_{mode}"
    reports = work / "reports" / name
    reports.mkdir(parents=True)
    records = work / "records" / f"{name}.jsonl"
    records.parent.mkdir(exist_ok=True)
    logfile = work / "logs" / f"{name}.log"
    logfile.parent.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", suite["path"], "-q", "-p", "no:randomly", "-rf"]
    if select:
        cmd += ["-k", select]
    env = {k: v for k, v in os.environ.items() if k not in ("PLANT", "TSAN_PAGED", "TSAN_PAGED_CONFIG")}
    env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", FLASHINFER_NO_DOWNLOAD="1",
               OWNER_SUITE_RECORDS=str(records))
    if mode != "bare":
        cmd.append("--paged-sanitizer=raise")
        env["TSAN_PAGED_REPORT_DIR"] = str(reports)
    if mode not in ("bare", "sanitized"):
        env["PLANT"] = mode
    t0 = time.time()
    log(f"  {name:18s} {' '.join(cmd[3:])}" + (f"  PLANT={mode}" if "PLANT" in env else ""))
    with open(logfile, "w") as out:
        rc = subprocess.run(cmd, cwd=run, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    tests = [json.loads(line) for line in records.read_text().splitlines()] if records.exists() else []
    summary = None
    for path in sorted(reports.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("type") == "summary":
                summary = rec
    outcomes = {o: sum(t["outcome"] == o for t in tests) for o in ("passed", "failed", "skipped")}
    res = dict(name=name, mode=mode, rc=rc, seconds=time.time() - t0, tests=tests, outcomes=outcomes,
               summary=summary, log=str(logfile), ok_process=rc in (0, 1) and bool(tests))
    if mode != "bare" and summary is None:
        res["ok_process"] = False
    log(f"  {'':18s} rc={rc} {outcomes['passed']} passed, {outcomes['failed']} failed, {outcomes['skipped']} skipped"
        f" in {res['seconds']:.0f}s" + ("" if res["ok_process"] else f"  (did not run to its end: {logfile})"))
    return res


def findings(res: dict) -> int:
    return sum(c[-1] for c in (res["summary"] or {}).get("counts", []))


def checked(res: dict) -> dict:
    out: dict = {}
    for target, _how, n in (res["summary"] or {}).get("checked", []):
        out[target] = out.get(target, 0) + n
    return out


def plant_result(res: dict, check: str, arg: str) -> dict:
    """Per test: its planted faults against its reports (check, argument, index)."""
    r = dict(found=0, planted=0, not_reached=0, missed=[], spurious=[])
    for t in res["tests"]:
        want = set()
        for p in t["planted"]:
            if "row" in p:
                index = (p["row"], p["col"])
            else:
                index = tuple(p["index"]) if isinstance(p["index"], (list, tuple)) else (p["index"],)
            want.add((check, arg, index))
        got = {(v["check"], v["arg"], tuple(v["index"] or ())) for v in t["reports"]}
        if not want:
            if got:
                r["spurious"].append((t["nodeid"], sorted(got)))
            continue
        if not got and not sum(t["checked"].values()):
            r["not_reached"] += len(want)
            continue
        r["planted"] += len(want)
        r["found"] += len(want & got)
        if want != got:
            r["missed"].append((t["nodeid"], sorted(want), sorted(got)))
    return r


def short(target: str) -> str:
    return target.split("::")[-1].split(":")[-1]


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few cases of each file (minutes) instead of the documented run")
    ap.add_argument("--sdist", help=f"vLLM {VERSION}'s sdist ({SDIST}) or an extracted source tree, instead of downloading")
    ap.add_argument("--cache-dir", default=os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "tsan_paged"),
                    help="where the downloaded sdist is kept (default: %(default)s)")
    ap.add_argument("--only", nargs="+", choices=list(SUITES), default=list(SUITES), help="run these files only")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, edited files, reports)")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="tsan_paged_vllm_suite_"))
    log(f"vLLM {VERSION}'s own tests under tsan_paged ({'quick' if args.quick else 'full'}), in {work}")
    run = prepare(args, work)
    results = {}
    t0 = time.time()
    bad = []

    def stop(signum, frame):  # `timeout` sends SIGTERM: end the running pytest, print what finished
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        for key in args.only:
            suite = SUITES[key]
            log(f"{suite['title']}")
            runs = {}
            for mode, select in (suite["quick"] if args.quick else suite["full"]).items():
                runs[mode] = run_pytest(run, work, key, mode, select)
            results[key] = runs
    except KeyboardInterrupt:
        bad.append(f"interrupted after {(time.time() - t0) / 60:.1f} min: "
                   f"{', '.join(k for k in args.only if k not in results)} not (fully) run")

    rows = []
    for key, runs in results.items():
        suite = SUITES[key]
        bare, san = runs["bare"], runs["sanitized"]
        for res in runs.values():
            if not res["ok_process"]:
                bad.append(f"{res['name']}: pytest did not run to its end (rc {res['rc']}), {res['log']}")
        n = findings(san)
        if n:
            bad.append(f"{key}: {n} finding(s) on vLLM's own tables under --paged-sanitizer=raise, {san['log']}")
        fail_bare = {t["nodeid"] for t in bare["tests"] if t["outcome"] == "failed"}
        fail_san = {t["nodeid"] for t in san["tests"] if t["outcome"] == "failed"}
        plants = []
        for mode, (check, arg) in suite["expect"].items():
            p = plant_result(runs[mode], check, arg)
            text = f"{mode} {p['found']}/{p['planted']} ({check})"
            if p["not_reached"]:
                text += f", {p['not_reached']} not reached"
            plants.append(text)
            for nodeid, want, got in p["missed"]:
                bad.append(f"{key} PLANT={mode}: {nodeid}: planted {want}, reported {got}")
            for nodeid, got in p["spurious"]:
                bad.append(f"{key} PLANT={mode}: {nodeid}: reported {got} with nothing planted")
            if not p["planted"]:
                bad.append(f"{key} PLANT={mode}: no planted fault reached a checked call")
        rows.append([
            suite["title"],
            f"{bare['outcomes']['passed']}/{bare['outcomes']['failed']}",
            f"{san['outcomes']['passed']}/{san['outcomes']['failed']}"
            + ("" if fail_bare == fail_san else " (other failures than bare)"),
            str(n),
            ", ".join(f"{short(t)} {c}" for t, c in sorted(checked(san).items())),
            "; ".join(plants),
        ])

    head = ["file", "bare passed/failed", "sanitized passed/failed", "findings on valid tables",
            "checked calls per target (sanitized run)", "planted found/planted (exact index, check id)"]
    log("")
    log(f"vLLM {VERSION}'s own tests under tsan_paged, {'--quick' if args.quick else 'full run'}, "
        f"{(time.time() - t0) / 60:.1f} min")
    log("| " + " | ".join(head) + " |")
    log("|" + "---|" * len(head))
    for row in rows:
        log("| " + " | ".join(row) + " |")
    if bad:
        log("\nFAILED:\n  " + "\n  ".join(bad))
    if args.keep or bad:
        log(f"\nlogs, edited files and reports: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
