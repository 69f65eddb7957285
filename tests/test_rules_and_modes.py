"""Registry binding, rule-unbound / rule-error, the three modes, dumps, config errors, the CLI."""

import os
import subprocess
import sys
import textwrap

import flashinfer.decode
import pytest

from batches import KERNEL, call_kernel, make_batch
from tsan_paged import ConfigError, PagedSanitizer, PageTableViolation, Violation
from tsan_paged import dump as dump_mod
from tsan_paged.registry import Registry, parse_target, rule

ENV = {**os.environ, "FLASHINFER_NO_DOWNLOAD": "1", "PYTHONPATH": os.pathsep.join(["tests", os.environ.get("PYTHONPATH", "")])}


def bad_batch():
    batch = make_batch(lengths=[20, 40], num_pages=30)
    batch["block_tables"][1, 2] = 31
    return batch


def test_arguments_bind_by_name_however_passed():
    seen = []
    reg = Registry()

    @rule(KERNEL, reads=("block_tables", "window_left", "kv_layout"), registry=reg)
    def record(call):
        seen.append((call["block_tables"].shape, call["window_left"], call["kv_layout"]))
        return []

    batch = make_batch()
    positional = [batch.pop(k) for k in ("query", "kv_cache", "workspace_buffer", "block_tables", "seq_lens", "max_seq_len")]
    with PagedSanitizer(registry=reg):
        call_kernel(dict(batch, **dict(zip(["query", "kv_cache", "workspace_buffer", "block_tables", "seq_lens", "max_seq_len"], positional))))
        try:
            flashinfer.decode.trtllm_batch_decode_with_kv_cache(*positional, 1.0, 1.0, 7, kv_layout="NHD")
        except ValueError:
            pass
    assert seen == [((4, 16), -1, "HND"), ((4, 16), 7, "NHD")]


def test_a_target_that_does_not_resolve_is_reported():
    reg = Registry()

    @rule("flashinfer.decode:trtllm_batch_decode_with_kv_cache_v9", registry=reg)
    def never(call):
        return []

    with PagedSanitizer(registry=reg) as san:
        pass
    [v] = san.reports
    assert (v.check, v.severity, v.arg) == ("rule-unbound", "warning", "flashinfer.decode:trtllm_batch_decode_with_kv_cache_v9")
    assert "flashinfer-python 0.7.2" in v.message


def unbound(reports):
    return [(v.op, v.message) for v in reports if v.check == "rule-unbound"]


@pytest.mark.parametrize("target,why", [
    ("mylibb.kernels:paged_decode", "no module 'mylibb' is installed (a typo?)"),
    ("json.tool:main", "module 'json.tool' was never imported in this process"),
    ("mylibz::paged_decode", "no op of namespace 'mylibz' was ever registered"),
])
def test_a_user_rule_whose_target_never_resolves_is_reported_at_exit(target, why):
    """Issue 13: a [[rule]] with a typo in its target used to pass silently forever."""
    assert "json.tool" not in sys.modules
    config = {"rule": [dict(target=target, table="block_table", buffers=["kv"])]}
    with PagedSanitizer(config=config) as san:
        assert unbound(san.reports) == []  # not yet: it may resolve while active
    [(op, message)] = unbound(san.reports)
    assert op == target and "never resolved while the sanitizer was active" in message
    assert "config dict" in message and why in message


def test_a_user_rule_resolved_while_active_and_built_in_rules_stay_quiet():
    config = {"rule": [dict(target=KERNEL, table="block_tables", buffers=["kv_cache"])]}
    with PagedSanitizer(config=config) as san:  # vLLM's and FlashAttention's built-ins never resolve here
        pass
    assert unbound(san.reports) == []


def test_nested_sanitizers_leave_the_report_to_the_outermost():
    config = {"rule": [dict(target="mylibb.kernels:paged_decode", table="block_table", buffers=["kv"])]}
    with PagedSanitizer(config=config) as outer:
        with PagedSanitizer(config=config) as inner:
            pass
        assert unbound(inner.reports) == []
    assert len(unbound(outer.reports)) == 1


def test_a_process_wide_sanitizer_reports_unresolved_rules_in_the_summary(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text('[[rule]]\ntarget = "mylibb.kernels:paged_decode"\ntable = "t"\nbuffers = ["kv"]\n')
    result = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, timeout=300,
                            env={**ENV, "TSAN_PAGED": "log", "TSAN_PAGED_CONFIG": str(path)})
    assert result.returncode == 0, result.stderr
    assert "tsan_paged summary: 0 error(s), 1 warning(s)" in result.stderr
    assert "rule-unbound" in result.stderr and "mylibb.kernels:paged_decode" in result.stderr


SUMMARY_PROGRAM = """
import sys
from batches import call_kernel, make_batch
from tsan_paged import PagedSanitizer
batch = make_batch(num_pages=30, lengths=[20, 40])
batch["block_tables"][1, 2] = 31
with PagedSanitizer(summary=sys.argv[1] == "True" if len(sys.argv) > 1 else None) as san:
    call_kernel(batch)
assert [v.check for v in san.reports] == ["page-out-of-range"], san.reports
print("checked")
"""


@pytest.mark.parametrize("argv,environ,summary", [
    ([], {}, False),  # a block's own sanitizer (a test inspecting its reports): no process summary
    (["True"], {}, True),  # asked for
    ([], {"TSAN_PAGED": "log"}, True),  # inside the process-wide one: part of the process's findings
])
def test_the_process_summary_holds_what_the_user_turned_on(argv, environ, summary):
    """Issue 13: a test run ended in 'tsan_paged summary: 169 error(s), ...' made of the tests'
    own expected violations."""
    result = subprocess.run([sys.executable, "-c", SUMMARY_PROGRAM, *argv], capture_output=True, text=True,
                            timeout=300, env={**ENV, **environ})
    assert result.returncode == 0 and "checked" in result.stdout, result.stderr
    assert ("tsan_paged summary: 1 error(s)" in result.stderr) is summary, result.stderr
    assert "page-out-of-range" in result.stderr  # logged either way


def test_signature_drift_is_reported_and_the_call_goes_on():
    reg = Registry()

    @rule(KERNEL, reads=("page_table", "seq_lens"), registry=reg, name="written-for-another-version")
    def old_rule(call):
        raise AssertionError("must not run")

    with PagedSanitizer(mode="raise", registry=reg) as san:
        assert call_kernel(bad_batch())
    [v] = san.reports
    assert v.check == "rule-unbound" and "page_table" in v.message


def test_undeclared_missing_name_is_rule_unbound_at_the_call():
    reg = Registry()

    @rule(KERNEL, registry=reg)
    def reads_a_name_that_is_gone(call):
        return [call["page_table"]]

    with PagedSanitizer(mode="raise", registry=reg) as san:
        assert call_kernel(bad_batch())
    assert [v.check for v in san.reports] == ["rule-unbound"]
    assert san.reports[0].caller  # reported at the call site


def test_a_rule_that_raises_is_rule_error_and_the_program_goes_on():
    reg = Registry()

    @rule(KERNEL, registry=reg)
    def broken(call):
        return 1 / 0

    with PagedSanitizer(mode="log", registry=reg) as san:
        assert call_kernel(bad_batch())
    [v] = san.reports
    assert (v.check, v.severity) == ("rule-error", "warning")
    assert "ZeroDivisionError" in v.message


def test_bad_targets_are_rejected_when_registered():
    for target in ["flashinfer.decode", "ns:::op", "::op", "a b:c", 3]:
        with pytest.raises((ValueError, TypeError)):
            parse_target(target)


def test_unknown_check_ids_are_rejected():
    with pytest.raises(ValueError, match="unknown check id"):
        Violation("page-oob", "block_tables", "x")


def test_log_mode_reports_and_calls_the_kernel(dump_dir):
    with PagedSanitizer(mode="log", dump_dir=dump_dir) as san:
        assert call_kernel(bad_batch())
    assert [(v.check, v.index) for v in san.reports] == [("page-out-of-range", (1, 2))]
    assert not os.path.exists(dump_dir)  # no dumps in log mode unless asked
    with PagedSanitizer(mode="log", dump_dir=dump_dir, dump_on_log=True) as san:
        call_kernel(bad_batch())
    assert len(san.dumps) == 1


def test_raise_mode_is_a_runtime_error_and_the_kernel_is_not_called(dump_dir):
    with PagedSanitizer(mode="raise", dump_dir=dump_dir):
        with pytest.raises(RuntimeError) as info:
            flashinfer.decode.trtllm_batch_decode_with_kv_cache(**bad_batch())
    assert isinstance(info.value, PageTableViolation)
    assert "device must be a cuda device" not in str(info.value)
    assert [v.index for v in info.value.violations] == [(1, 2)]
    assert os.path.exists(info.value.dump_path)


def test_dumps_are_bounded_unique_and_explained(dump_dir):
    with PagedSanitizer(mode="raise", dump_dir=dump_dir, max_dumps=2) as san:
        for _ in range(3):
            with pytest.raises(PageTableViolation):
                call_kernel(bad_batch())
    files = sorted(os.listdir(dump_dir))
    assert len(files) == 2 and len(set(files)) == 2 and all(f"tsan_paged.{os.getpid()}." in f for f in files)
    payload = dump_mod.load(os.path.join(dump_dir, files[0]))
    kv_meta = payload["arguments"]["kv_cache"]["tuple"][0]["tensor"]
    assert "data" not in kv_meta and kv_meta["shape"] == [30, 2, 16, 8]  # KV: shape only
    assert payload["arguments"]["block_tables"]["tensor"]["data"][1, 2] == 31  # table: values
    [v] = dump_mod.recheck(payload)
    assert (v.check, v.index, v.value, v.bound) == ("page-out-of-range", (1, 2), 31, 30)
    out = subprocess.run([sys.executable, "-m", "tsan_paged.cli", "show", os.path.join(dump_dir, files[0])],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "block_tables[1, 2] = 31, kv_cache has 30 pages" in out.stdout
    assert "re-checked with the current rules" in out.stdout
    assert len(san.dumps) == 2


def test_abort_mode_ends_the_process_with_the_documented_status(tmp_path):
    code = textwrap.dedent(f"""
        from batches import make_batch, call_kernel
        from tsan_paged import PagedSanitizer
        batch = make_batch(lengths=[20, 40], num_pages=30)
        batch["block_tables"][1, 2] = 31
        with PagedSanitizer(mode="abort", dump_dir={str(tmp_path)!r}):
            try:
                call_kernel(batch)
            except BaseException:
                pass  # a server loop that swallows everything
        print("STILL RUNNING")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 86, (out.returncode, out.stderr)
    assert "STILL RUNNING" not in out.stdout
    assert "block_tables[1, 2] = 31" in out.stderr and "aborting" in out.stderr
    assert len(list(tmp_path.glob("tsan_paged.*.pt"))) == 1


@pytest.mark.parametrize("config,match", [
    ({"mode": "loud"}, "mode.*log, raise, abort"),
    ({"modes": "log"}, "unknown key 'modes'; allowed keys"),
    ({"max_dumps": "8"}, "'max_dumps' must be a int"),
    ({"checks": {"page-oob": "error"}}, "unknown check id 'page-oob'"),
    ({"checks": {"duplicate-page": "loud"}}, "error, warning, off"),
])
def test_config_errors_are_clear(config, match):
    with pytest.raises(ConfigError, match=match):
        PagedSanitizer(config=config)


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        PagedSanitizer(config=tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('mode = "log"\nexitcode = 3\n')
    with pytest.raises(ConfigError, match=f"{bad}: unknown key 'exitcode'"):
        PagedSanitizer(config=bad)
    good = tmp_path / "good.toml"
    good.write_text('mode = "raise"\n[checks]\n"dead-page-out-of-range" = "error"\n')
    san = PagedSanitizer(config=good)
    assert san.mode == "raise" and san.config.severity("dead-page-out-of-range") == "error"
    assert PagedSanitizer(mode="log", config=good).mode == "log"  # explicit argument wins


def test_cli_demo_and_rules():
    out = subprocess.run([sys.executable, "-m", "tsan_paged.cli", "demo"], capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "block_tables[5, 127] = 8657, kv_cache has 8657 pages" in out.stdout
    assert "device must be a cuda device" in out.stdout and "demo passed" in out.stdout
    out = subprocess.run([sys.executable, "-m", "tsan_paged.cli", "rules"], capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr
    assert KERNEL in out.stdout and "yes" in out.stdout
