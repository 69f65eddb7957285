"""pytest plugin: run tests under the paged sanitizer.

- ``pytest --paged-sanitizer`` (mode ``log``) or ``--paged-sanitizer=raise|abort``, or the
  ini option ``paged_sanitizer = log``, turns it on for every test of the session;
  ``paged_sanitizer_config`` (ini) or ``--paged-sanitizer-config`` names a TOML config.
- ``@pytest.mark.paged_sanitizer`` opts a test in when the session is off;
  ``@pytest.mark.paged_sanitizer(mode="raise")`` sets its mode;
  ``@pytest.mark.paged_sanitizer(enabled=False)`` opts it out.
- The ``paged_sanitizer`` fixture hands a test its (active) sanitizer, for tests that
  expect a violation: ``assert paged_sanitizer.reports[0].index == (5, 127)``.

Each sanitized test runs under its own :class:`PagedSanitizer` (nested in one session-wide
sanitizer, so entry points are patched once), so reports belong to the test whose setup,
call or teardown made the call -- in every pytest-xdist worker too. A test during which an
error-severity violation occurred fails, with the report in its failure text, even when
the code under test caught and swallowed the exception -- unless it asked for the
``paged_sanitizer`` fixture, which means it inspects the reports itself.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

MODES = ("log", "raise", "abort")
_SESSION = pytest.StashKey()
_ITEM = pytest.StashKey()


def pytest_addoption(parser):
    group = parser.getgroup("tsan_paged", "paged-KV sanitizer")
    # "--paged-sanitizer" is a flag and "--paged-sanitizer=MODE" three more exact option strings, not one
    # option with an optional value: argparse would take the next argument as that value, so
    # "pytest --paged-sanitizer tests/" would read "tests/" as the mode.
    group.addoption("--paged-sanitizer", action="store_const", const="log", default=None, dest="paged_sanitizer",
                    help="check paged-KV kernel calls in every test (mode log); --paged-sanitizer=raise or "
                         "--paged-sanitizer=abort for the other modes")
    for mode in MODES:
        group.addoption(f"--paged-sanitizer={mode}", action="store_const", const=mode, dest="paged_sanitizer",
                        help=argparse.SUPPRESS)
    group.addoption("--paged-sanitizer-config", default=None, metavar="TOML",
                    help="a tsan_paged TOML config for the sanitized tests")
    parser.addini("paged_sanitizer", "paged sanitizer mode for the session: log, raise or abort (empty: off)", default="")
    parser.addini("paged_sanitizer_config", "a tsan_paged TOML config for the sanitized tests", default="")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "paged_sanitizer(mode=None, enabled=True): run this test under tsan_paged's PagedSanitizer "
                   "(mode log/raise/abort), or opt it out with enabled=False")
    args = [str(a) for a in config.invocation_params.args]
    for flag, following in zip(args, args[1:]):
        if flag == "--paged-sanitizer" and following in MODES and not os.path.exists(following):
            raise pytest.UsageError(f"--paged-sanitizer {following}: write --paged-sanitizer={following} "
                                    f"(with '='); '{following}' was taken as a test path")
        if flag == "--paged-sanitizer-config" and not _under(following, config.invocation_params.dir):
            # pytest picks its rootdir and ini file before a plugin's options are known, with the
            # value taken for a test path: one outside this directory moves the rootdir there, and
            # the project's own ini settings are lost
            raise pytest.UsageError(
                f"--paged-sanitizer-config {following}: write --paged-sanitizer-config={following} (with '='); "
                f"pytest took the path for a test path when it chose its rootdir ({config.rootpath})")
    mode = config.getoption("paged_sanitizer") or config.getini("paged_sanitizer").strip() or None
    if mode is not None and mode not in MODES:
        raise pytest.UsageError(f"paged_sanitizer = {mode!r}: use one of {', '.join(MODES)}")
    path = config.getoption("--paged-sanitizer-config") or config.getini("paged_sanitizer_config").strip() or None
    settings = {"mode": mode, "config": None}
    if mode is not None or path is not None:
        from .config import ConfigError, load

        try:
            settings["config"] = load(path) if path else None
        except ConfigError as exc:
            raise pytest.UsageError(f"paged sanitizer: {exc}") from None
    config.stash[_SESSION] = settings


def _under(path: str, directory) -> bool:
    return (Path(directory) / path).resolve().is_relative_to(Path(directory).resolve())


def pytest_sessionstart(session):
    settings = session.config.stash[_SESSION]
    if settings["mode"] is not None:
        from .sanitizer import PagedSanitizer

        anchor = PagedSanitizer(mode="log", config=settings["config"], summary=True)
        anchor.__enter__()  # patches once for the session; each test nests its own
        settings["anchor"] = anchor


def pytest_sessionfinish(session):
    anchor = session.config.stash[_SESSION].pop("anchor", None)
    if anchor is not None:
        anchor.__exit__(None, None, None)


def _sanitizer_for(item, for_fixture: bool = False):
    """The item's sanitizer, made on first use; ``None`` when the item is not sanitized."""
    existing = item.stash.get(_ITEM, None)
    if existing is not None:
        return existing
    settings = item.config.stash[_SESSION]
    marker = item.get_closest_marker("paged_sanitizer")
    mode = settings["mode"]
    enabled = mode is not None
    if marker is not None:
        enabled = marker.kwargs.get("enabled", True)
        mode = marker.kwargs.get("mode") or (marker.args[0] if marker.args else None) or mode or "log"
        if mode not in MODES:
            raise pytest.UsageError(f"{item.nodeid}: paged_sanitizer mode {mode!r}: use one of {', '.join(MODES)}")
    enabled = enabled or for_fixture  # asking for the fixture asks for checking
    if not enabled and "anchor" not in settings:
        return None
    from .registry import Registry
    from .sanitizer import PagedSanitizer

    if enabled:
        # A test that asks for the fixture inspects its expected violations: they are not the
        # session's findings (its summary at exit).
        expects = "paged_sanitizer" in getattr(item, "fixturenames", ())
        sanitizer = PagedSanitizer(mode=mode or "log", config=settings["config"], summary=False if expects else None)
    else:  # opted out of a sanitized session: no rules, so its calls pass unchecked
        sanitizer = PagedSanitizer(mode="log", registry=Registry())
    sanitizer.test_expects_violations = False
    item.stash[_ITEM] = sanitizer
    return sanitizer


@pytest.fixture
def paged_sanitizer(request):
    """The test's active PagedSanitizer; its ``reports`` are the violations of this test."""
    sanitizer = _sanitizer_for(request.node, for_fixture=True)
    sanitizer.test_expects_violations = True
    with sanitizer:  # active from here to the fixture's teardown (re-entered by each phase)
        yield sanitizer


def _phase(item):
    sanitizer = _sanitizer_for(item)
    if sanitizer is None:
        return (yield)
    before = len(sanitizer.errors)
    with sanitizer:
        result = yield
    new_errors = sanitizer.errors[before:]
    if new_errors and not getattr(sanitizer, "test_expects_violations", False):
        text = "\n".join(v.format(with_stack=True) for v in new_errors[:5])
        more = f"\n(and {len(new_errors) - 5} more)" if len(new_errors) > 5 else ""
        pytest.fail(f"tsan_paged: {len(new_errors)} paged-KV violation(s) during this test "
                    f"(even if the code under test caught them):\n{text}{more}", pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _phase(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _phase(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    return (yield from _phase(item))
