"""The pytest plugin, tested with pytest's own pytester on the real FlashInfer entry point."""

import os
import re
from pathlib import Path

import pytest

TESTS = str(Path(__file__).resolve().parent)
ROOT = Path(TESTS).parent

SUITE = '''
import flashinfer.decode
import pytest
from batches import make_batch

def bad_batch():
    batch = make_batch(lengths=[20, 40], num_pages=30)
    batch["block_tables"][1, 2] = 31
    return batch

def swallowing_kernel_call(batch):
    try:
        flashinfer.decode.trtllm_batch_decode_with_kv_cache(**batch)
    except Exception:
        pass  # the code under test hides the error

def test_clean():
    swallowing_kernel_call(make_batch(num_pages=30, lengths=[20, 40]))

def test_swallowed_violation():
    swallowing_kernel_call(bad_batch())

def test_expects_a_violation(paged_sanitizer):
    swallowing_kernel_call(bad_batch())
    assert [(v.check, v.index) for v in paged_sanitizer.reports] == [("page-out-of-range", (1, 2))]

@pytest.mark.paged_sanitizer(enabled=False)
def test_opted_out():
    swallowing_kernel_call(bad_batch())

@pytest.mark.paged_sanitizer(mode="raise")
def test_raise_mode_marker(paged_sanitizer):
    from tsan_paged import PageTableViolation
    assert paged_sanitizer.mode == "raise"
    with pytest.raises(PageTableViolation):
        flashinfer.decode.trtllm_batch_decode_with_kv_cache(**bad_batch())
'''


def pytest_commands(page) -> list:
    """The ``pytest`` lines of a page's first bash block under its "Run your tests under the sanitizer" heading."""
    return [line.split("#")[0].split() for line in re.search(
        r"# Run your tests under the sanitizer\n\n(?:.*?\n\n)??```bash\n(.*?)```", page.read_text(), re.S
    ).group(1).splitlines()]


README_COMMANDS = pytest_commands(ROOT / "README.md")


@pytest.fixture
def suite(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FLASHINFER_NO_DOWNLOAD", "1")
    pytester.syspathinsert(TESTS)
    pytester.mkdir("tests")
    (pytester.path / "tests" / "test_suite.py").write_text(SUITE)
    return pytester


def check_outcomes(result):
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines([
        "*test_swallowed_violation*",
        "*tsan_paged: 1 paged-KV violation(s) during this test*",
        "*page-out-of-range*block_tables[[]1, 2[]] = 31, kv_cache has 30 pages*",
    ])
    assert "FAILED tests/test_suite.py::test_swallowed_violation" in result.stdout.str()


def test_readme_lists_every_form():
    assert [" ".join(c) for c in README_COMMANDS] == [
        "pytest --paged-sanitizer tests/", "pytest tests/ --paged-sanitizer", "pytest --paged-sanitizer=raise tests/"]
    assert pytest_commands(ROOT / "docs" / "pytest.md") == README_COMMANDS  # the plugin's page says the same


@pytest.mark.parametrize("command", README_COMMANDS, ids=[" ".join(c) for c in README_COMMANDS])
def test_readme_commands_as_written(suite, command):
    """Each command exactly as the README writes it (argument order included)."""
    assert command[0] == "pytest"
    result = suite.runpytest_subprocess(*command[1:], "-p", "no:cacheprovider", "-rf")
    check_outcomes(result)
    # The session's summary at exit counts the swallowed violation, not the ones the fixture's
    # tests expect and inspect.
    assert "tsan_paged summary: 1 error(s), 0 warning(s)" in result.stderr.str(), result.stderr.str()


def test_mode_with_a_space_is_a_clear_usage_error(suite):
    result = suite.runpytest_subprocess("--paged-sanitizer", "raise", "tests/")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*write --paged-sanitizer=raise (with '='); 'raise' was taken as a test path*"])


def test_a_config_outside_the_directory_takes_the_equals_sign(suite, tmp_path):
    """pytest chooses its rootdir (and ini file) before it knows the plugin's options: a config path
    after a space is a test path then, and one outside the directory moved the rootdir there (the
    project's ini settings lost). That form is a usage error; with '=' the rootdir stays."""
    config = tmp_path / "elsewhere" / "tsan.toml"
    config.parent.mkdir()
    config.write_text('mode = "log"\n')
    suite.makeini("[pytest]\nmarkers =\n    mine: the project's own marker\n")
    result = suite.runpytest_subprocess("--paged-sanitizer", "--paged-sanitizer-config", str(config), "tests/")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*write --paged-sanitizer-config={config} (with '=')*"])
    result = suite.runpytest_subprocess("--paged-sanitizer", f"--paged-sanitizer-config={config}", "tests/",
                                        "-p", "no:cacheprovider", "-rf")
    check_outcomes(result)
    assert f"rootdir: {suite.path}" in result.stdout.str()
    (suite.path / "local.toml").write_text('mode = "log"\n')  # inside the directory: either form
    check_outcomes(suite.runpytest_subprocess("--paged-sanitizer", "--paged-sanitizer-config", "local.toml", "tests/",
                                              "-p", "no:cacheprovider", "-rf"))


def test_session_option(suite):
    check_outcomes(suite.runpytest_subprocess("--paged-sanitizer", "-p", "no:cacheprovider", "-rf"))


def test_ini_option(suite):
    suite.makeini("[pytest]\npaged_sanitizer = log\n")
    check_outcomes(suite.runpytest_subprocess("-rf"))


def test_xdist_workers_attribute_reports_to_their_tests(suite):
    result = suite.runpytest_subprocess("-n", "2", "--paged-sanitizer", "-rf")
    check_outcomes(result)


def test_off_by_default_markers_and_fixture_still_work(suite):
    result = suite.runpytest_subprocess("-rf")
    # Not sanitized: the swallowed violation goes unnoticed; the marker and the fixture opt in.
    result.assert_outcomes(passed=5)


def test_bad_mode_is_a_usage_error(suite):
    suite.makeini("[pytest]\npaged_sanitizer = loud\n")
    result = suite.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*paged_sanitizer = 'loud': use one of log, raise, abort*"])
