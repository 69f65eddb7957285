"""SGLang 0.5.23's real server under the sanitizer, on a CPU: ``python -m sglang.launch_server``
with its own scheduler (overlap scheduling, radix cache, chunked prefill, retraction), allocators,
pools and attention backends, started by ``tsan-paged run`` exactly as docs/sglang.md says, and loaded
over HTTP by ``sglang_server/load.py``.

- Clean load (``log`` mode, ``track_pages`` on): every request served, 0 findings, and the merged
  report says how many calls of each kernel entry point were checked.
- Faults planted in SGLang's own code (``sglang_server/sglang_faults.py``: one-line edits of its
  allocator and scheduler, never of the sanitizer's arguments): the seed's allocator handing out one
  slot past its pool, a premature free of a running request's pages, a corrupted ``req_to_token``
  entry. Under ``abort`` the scheduler ends with status 86 (SGLang's own watchdog says so), with a
  report whose caller is SGLang's line and a dump; under ``log`` the server keeps serving.

The model is a config-only 2-layer Llama (``--load-format dummy``: random weights), requests carry
token ids (``--skip-tokenizer-init``). SGLang needs ``SGLANG_USE_CPU_ENGINE=1`` to take its CPU paths,
and a stand-in for sgl-kernel (a CUDA build) that its modules import (``sglang_server/sitecustomize.py``).
These tests start several servers (about a minute each on two cores): ``-m "not slow"`` leaves them out.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import needs_sglang  # noqa: F401  (skips this module without SGLang)
from tsan_paged.report import CHECKED_IDLE_S

psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
BIN = Path(sys.executable).parent
SGLANG_DOC = (ROOT / "docs" / "sglang.md").read_text()
NATIVE = "sglang.srt.layers.attention.torch_native_backend:TorchNativeAttnBackend"
WRITE = "sglang.srt.mem_cache.memory_pool:MHATokenToKVPool.set_kv_buffer"
TRITON = "sglang.kernels.ops.attention"


def readme_block() -> tuple:
    """docs/sglang.md's SGLang server commands: ``(environment, server command, load command)``."""
    block = re.search(r"```bash\n(# SGLang's real server on a CPU.*?)```", SGLANG_DOC, re.S).group(1)
    lines = [line.split("  #")[0].rstrip() for line in block.replace("\\\n", " ").splitlines()
             if line.strip() and not line.startswith("#")]
    export, server, load = lines
    assert export.startswith("export ")
    environment = dict(item.split("=", 1) for item in shlex.split(export)[1:])
    return environment, shlex.split(server), shlex.split(load)


def base_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TSAN_PAGED", "SGLANG_", "TRITON_"))}
    env.update(FLASHINFER_NO_DOWNLOAD="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]))
    env.update(extra)
    return env


class Server:
    """``tsan-paged run ... -- python -m sglang.launch_server ...`` in the background, its output in a file."""

    def __init__(self, command: list, env: dict, log: Path, port: int):
        self.port, self.log = port, log
        self.url = f"http://127.0.0.1:{port}"
        with open(log, "w") as out:
            self.proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 300) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                pytest.fail(f"the server ended with status {self.proc.returncode} before serving:\n"
                            + self.output[-6000:])
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        pytest.fail(f"the server did not answer /health within {timeout} s:\n" + self.output[-6000:])

    def load(self, *args: str, check: bool = True) -> dict:
        out = subprocess.run([sys.executable, str(TESTS / "sglang_server" / "load.py"), "--port", str(self.port),
                              *args], capture_output=True, text=True, timeout=900)
        stats = json.loads(out.stdout.strip().splitlines()[-1])
        if check:
            assert out.returncode == 0, (stats, self.output[-6000:])
        return stats

    def stop(self, timeout: float = 120) -> str:
        """Ctrl-C to SGLang's server process (it shuts down and SIGKILLs its workers); the merged report.

        Workers write their final counts within ``CHECKED_IDLE_S`` of going idle: wait that long
        after the last response, as a user stopping the server a moment later does."""
        time.sleep(3 * CHECKED_IDLE_S)
        if self.proc.poll() is None:
            for child in psutil.Process(self.proc.pid).children():
                child.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return self.output

    def wait_end(self, timeout: float = 180) -> str:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail("the server did not end:\n" + self.output[-6000:])
        return self.output

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def server_command(mode: str, config: Path, report_dir: Path, port: int, backend: str, page: int) -> list:
    """docs/sglang.md's command with another mode, config, port, backend or page size, and a report directory."""
    _, command, _ = readme_block()
    options = {"--mode": mode, "--config": str(config), "--port": str(port), "--attention-backend": backend,
               "--page-size": str(page)}
    for option, value in options.items():
        command[command.index(option) + 1] = value
    end = command.index("--")
    command[end:end] = ["--report-dir", str(report_dir)]
    return command


@pytest.fixture
def start(tmp_path):
    servers = []

    def start_server(mode="log", backend="torch_native", page=16, track=True, port=31200, model=None, **env):
        config = tmp_path / f"c{port}.toml"
        config.write_text(f"track_pages = {'true' if track else 'false'}\ndump_dir = {str(tmp_path / 'dumps')!r}\n")
        environment, _, _ = readme_block()
        if backend == "triton":  # SGLang's Triton kernels run under Triton's interpreter on a CPU
            environment = {**environment, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
        report_dir = tmp_path / f"reports{port}"
        command = server_command(mode, config, report_dir, port, backend, page)
        if model is not None:
            command[command.index("--model-path") + 1] = f"tests/sglang_server/{model}"
        server = Server(command, base_env(**environment, **env), tmp_path / f"server{port}.log", port)
        server.report_dir = report_dir
        servers.append(server)
        server.wait_ready()
        return server

    yield start_server
    for server in servers:
        server.kill()


def checked_counts(output: str) -> dict:
    """``tsan-paged run``'s per-target counts of checked calls."""
    table = output[output.index("checked calls per target:"):]
    return {m.group(1): int(m.group(2).replace(",", "")) for m in re.finditer(r"^\s+(\S+)\s+([\d,]+)  \(", table, re.M)}


def sglang_evidence(output: str) -> dict:
    """What SGLang's own log says it did: prefix-cache hits, chunked prefills, retractions."""
    cached = [int(n) for n in re.findall(r"#cached-token: (\d+)", output)]
    retracted = [int(n) for n in re.findall(r"#retracted_reqs: (\d+)", output)]
    return {"cached": sum(cached), "retracted": sum(retracted),
            "chunked": len(re.findall(r"#new-token: 64,", output))}


def test_readme_server_command_exactly_as_written(tmp_path):
    """docs/sglang.md's two commands, verbatim, from the repository root: a clean load checked."""
    environment, command, load = readme_block()
    assert command[:5] == ["tsan-paged", "run", "--mode", "log", "--config"] and load[0] == "python"
    server = Server(command, base_env(**environment), tmp_path / "server.log", port=30000)
    try:
        server.wait_ready()
        out = subprocess.run(load, capture_output=True, text=True, cwd=ROOT, env=base_env(), timeout=900)
        stats = json.loads(out.stdout.strip().splitlines()[-1])
        assert out.returncode == 0 and stats["failed"] == 0, (stats, server.output[-4000:])
        output = server.stop()
    finally:
        server.kill()
    assert re.search(r"\d process\(es\) sanitized; [\d,]+ call\(s\) checked; 0 finding\(s\), 0 error\(s\)", output), \
        output[-6000:]
    counts = checked_counts(output)
    assert counts[WRITE] > 50 and counts[f"{NATIVE}._run_sdpa_forward_decode"] > 20, counts
    assert counts[f"{NATIVE}._run_sdpa_forward_extend"] > 10, counts
    evidence = sglang_evidence(output)
    assert evidence["cached"] > 0 and evidence["retracted"] > 0 and evidence["chunked"] > 0, evidence
    assert "sglang::scheduler" in output  # the process that checked them is named


@pytest.mark.parametrize("backend,page,load", [
    ("torch_native", 1, ["--requests", "32"]),
    ("triton", 1, ["--requests", "6", "--concurrency", "3", "--max-new-tokens", "6"]),
    ("triton", 16, ["--requests", "6", "--concurrency", "3", "--max-new-tokens", "6"]),
])
def test_clean_load_has_no_findings(start, backend, page, load):
    server = start(backend=backend, page=page, port=31210 + page + (100 if backend == "triton" else 0))
    stats = server.load(*load)
    assert stats["failed"] == 0
    output = server.stop()
    assert "; 0 finding(s), 0 error(s)" in output, output[-6000:]
    counts = checked_counts(output)
    assert counts[WRITE] > 10, counts
    if backend == "triton":
        assert counts[f"{TRITON}.decode_attention:decode_attention_fwd"] > 10, counts
        assert counts[f"{TRITON}.extend_attention:extend_attention_fwd"] > 2, counts
    else:
        assert counts[f"{NATIVE}._run_sdpa_forward_decode"] > 20, counts
    assert sglang_evidence(output)["retracted"] > 0


def test_hybrid_sliding_window_model_clean_load(start):
    """The seed's setting as far as SGLang's CPU path goes: a Gemma 4 text model with a sliding-window
    layer and a full one (config only), so SGLang runs its hybrid SWA pool (``SWAKVPool``), its SWA
    allocator and ``full_to_swa_index_mapping``; Gemma 4 takes the ``triton`` backend (not
    ``torch_native``). MTP cannot run on a CPU here (docs/sglang.md: SGLang's CPU path)."""
    server = start(backend="triton", page=1, port=31250, model="tiny-gemma4")
    stats = server.load("--requests", "3", "--concurrency", "3", "--max-new-tokens", "4", "--timeout", "300")
    assert stats["failed"] == 0
    output = server.stop()
    assert "Tree cache initialized: source=default impl=UnifiedRadixCache hybrid_swa=True" in output
    assert "; 0 finding(s), 0 error(s)" in output, output[-6000:]
    counts = checked_counts(output)
    assert counts[f"{TRITON}.decode_attention:decode_attention_fwd"] > 4 and counts[WRITE] > 4, counts


def first_finding(output: str) -> str:
    """The first finding's report, as loguru logged it in the process that made it."""
    start = output.index("tsan_paged: [error]")
    return output[start:output.index("\n    caller", start) + 200]


@pytest.mark.parametrize("fault,backend,page,track,expected", [
    # the seed's allocator bug, told apart as an allocator bug by track_pages
    ("alloc-past-end", "torch_native", 1, True,
     r"alloc-out-of-range in sglang\.srt\.mem_cache\.allocator\.token:TokenToKVPoolAllocator\.alloc: .* handed out "
     r"index 1025 "),
    # ... and without tracking, where SGLang writes the token's KV through it
    ("alloc-past-end", "torch_native", 16, False,
     r"page-out-of-range in sglang\.srt\.mem_cache\.memory_pool:MHATokenToKVPool\.set_kv_buffer: loc\[\d+\] = 10[4-5]\d, "),
    ("premature-free", "torch_native", 16, True,
     r"page-not-allocated in sglang\.srt\.layers\.attention\.torch_native_backend:TorchNativeAttnBackend\."
     r"_run_sdpa_forward_decode: req_to_token\[req_pool_indices\]\[\d+, 0\] = slot \d+ \(page \d+\): page \d+ is FREE"),
    # the seed's own setting: the hybrid SWA model, whose full and SWA sub-allocators both take the edit
    ("alloc-past-end", "triton", 1, True,
     r"alloc-out-of-range in sglang\.srt\.mem_cache\.allocator\.token:TokenToKVPoolAllocator\.alloc: "
     r"SWATokenToKVPoolAllocator\.(swa|full)_attn_allocator .* handed out index (1025|820) "),
    ("corrupt-req-to-token", "triton", 16, True,
     r"page-out-of-range in sglang\.kernels\.ops\.attention\.decode_attention:decode_attention_fwd: "
     r"kv_indices\[\d+\] \(row \d+, slot \d+ of the row\) = 1040, k_buffer has 1040 slots"),
])
def test_fault_in_sglang_aborts_the_scheduler(start, fault, backend, page, track, expected, tmp_path):
    port = 31300 + len(fault) + page + (100 if backend == "triton" else 0)
    swa = backend == "triton" and page == 1
    server = start(mode="abort", backend=backend, page=page, track=track, port=port, TSAN_PAGED_TEST_FAULT=fault,
                   TSAN_PAGED_TEST_FAULT_AT="40" if swa else "12" if backend == "triton" else "30",  # past warm-up
                   model="tiny-gemma4" if swa else None)
    server.load("--requests", "16", "--concurrency", "4", "--max-new-tokens", "8", "--timeout", "60",
                "--deadline", "240", check=False)
    output = server.wait_end()
    assert "TSAN_PAGED_TEST_FAULT fired" in output, output[-6000:]
    # SGLang's own watchdog saw its scheduler end with the sanitizer's status
    assert re.search(r"Subprocess scheduler_0 \(pid=\d+\) crashed with exit code 86", output), output[-6000:]
    report = first_finding(output)
    assert re.search(expected, report), report
    caller = re.search(r"\n    caller (\S+)", report).group(1)
    assert "site-packages/sglang/" in caller, report  # SGLang's line
    dumps = list((tmp_path / "dumps").glob("tsan_paged.*.pt"))
    if fault != "alloc-past-end" or not track:  # an allocator finding is reported at the allocator: no call to dump
        assert dumps, output[-3000:]
        shown = subprocess.run([sys.executable, "-m", "tsan_paged.cli", "show", str(dumps[0])], capture_output=True,
                               text=True, timeout=120, env=base_env())
        assert shown.returncode == 0 and expected.split(" in ")[0] in shown.stdout, shown.stdout + shown.stderr
    assert "1 error(s)" in output[output.index("process(es) sanitized"):]


def test_use_after_free_in_log_mode_keeps_serving(start):
    server = start(mode="log", page=16, port=31400, TSAN_PAGED_TEST_FAULT="premature-free",
                   SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE="0")  # SGLang's idle check would stop it first
    first = server.load("--requests", "24")
    second = server.load("--requests", "16", "--seed", "1")  # after the fault: still serving
    assert first["completed"] == 24 and second["completed"] == 16
    output = server.stop()
    assert "TSAN_PAGED_TEST_FAULT fired" in output
    report = first_finding(output)
    assert "page-not-allocated" in report and "is FREE" in report and "in free_early" in report, report
    assert "torch_native_backend.py" in re.search(r"\n    caller (\S+)", report).group(1), report
    assert re.search(r"process\(es\) sanitized; [\d,]+ call\(s\) checked; \d+ finding\(s\), \d+ error\(s\)", output)
