"""The ``tsan-paged`` command: ``demo``, ``run -- CMD``, ``show DUMP|DIR``, ``rules``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys


def main(argv=None) -> int:
    # A call that gets through to FlashInfer's trtllm-gen path must fail offline, not download.
    os.environ.setdefault("FLASHINFER_NO_DOWNLOAD", "1")
    from . import __version__

    parser = argparse.ArgumentParser(prog="tsan-paged", description="A sanitizer for paged-KV attention kernels.")
    parser.add_argument("--version", action="version", version=f"tsan-paged {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="catch the seed's off-by-one (8657 of 8657) through the real FlashInfer entry point, on CPU")
    run = sub.add_parser("run", help="run a command with every Python process of its tree sanitized; merge their reports",
                         usage="tsan-paged run [--mode M] [--config F] [--report-dir D] -- CMD ...")
    run.add_argument("--mode", choices=("log", "raise", "abort"), help="default: the config's mode, else log")
    run.add_argument("--config", help="a TOML config (exported as TSAN_PAGED_CONFIG)")
    run.add_argument("--report-dir", help="where each process writes its JSON lines (default: a new directory "
                                          "under ./tsan_paged_reports)")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    show = sub.add_parser("show", help="explain a dump, or merge the reports of a report directory")
    show.add_argument("dump", nargs="+", help="dump files (.pt) or report directories")
    rules = sub.add_parser("rules", help="list the rules and whether each target resolves in this environment")
    rules.add_argument("--config", default=os.environ.get("TSAN_PAGED_CONFIG"),
                       help="also list this config's [[rule]] tables (default: $TSAN_PAGED_CONFIG)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo()
    if args.command == "run":
        return _run(args, parser)
    if args.command == "show":
        return _show(args.dump)
    return _rules(args.config)


def _run(args, parser) -> int:
    import subprocess
    import tempfile

    from . import config as config_mod
    from .report import merge_report_dir

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("run: give the command after --, e.g. tsan-paged run -- python -m sglang.launch_server ...")
    try:  # a bad config is an error now, not in every child
        config = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(f"tsan-paged run: {exc}", file=sys.stderr)
        return 2
    report_dir = args.report_dir or config.report_dir or None
    if report_dir is None:
        os.makedirs("tsan_paged_reports", exist_ok=True)
        report_dir = tempfile.mkdtemp(prefix="run.", dir="tsan_paged_reports")
    env = dict(os.environ, TSAN_PAGED=args.mode or config.mode, TSAN_PAGED_REPORT_DIR=os.path.abspath(report_dir))
    if args.config:
        env["TSAN_PAGED_CONFIG"] = os.path.abspath(args.config)
    try:
        status = _wait_for(subprocess.Popen(cmd, env=env))
    except OSError as exc:
        print(f"tsan-paged run: cannot run {cmd[0]}: {exc}", file=sys.stderr)
        return 127
    if status < 0:  # killed by a signal: the shell's convention
        status = 128 - status
    try:
        text, _ = merge_report_dir(report_dir)
        print(text, file=sys.stderr)
    except FileNotFoundError:
        print(f"tsan-paged run: no process of the command was sanitized, so nothing was checked: none imported "
              f"torch in a Python environment where tsan_paged is installed (reports: {report_dir})", file=sys.stderr)
    print(f"tsan-paged run: {' '.join(cmd)} exited with status {status}", file=sys.stderr)
    return status


def _wait_for(child) -> int:
    """The child's status, once it has ended. A Ctrl-C in the terminal reaches the child too (it is
    in our process group), so it is left to the child (a server shuts down cleanly, its workers
    write their reports); a SIGTERM sent to this process alone is passed on to the child."""
    import signal

    def forward(signum, frame):
        child.send_signal(signum)

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM, forward)}
    try:
        return child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _show(paths) -> int:
    from . import dump
    from .report import merge_report_dir
    from .sanitizer import _default_registry

    _default_registry()
    status = 0
    for path in paths:
        try:
            print(merge_report_dir(path)[0] if os.path.isdir(path) else dump.explain(path))
        except (OSError, ValueError, RuntimeError) as exc:
            print(f"tsan-paged show: {path}: {exc}", file=sys.stderr)
            status = 2
    return status


def _rules(config_path=None) -> int:
    from .config import ConfigError
    from .sanitizer import PagedSanitizer

    try:
        registry = PagedSanitizer(config=config_path).registry
    except ConfigError as exc:
        print(f"tsan-paged rules: {exc}", file=sys.stderr)
        return 2
    rows = [("TARGET", "RULE", "SOURCE", "RESOLVES HERE")]
    for rule in registry.all():
        rows.append((rule.target, rule.name, rule.source, resolve_status(rule.target)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def resolve_status(target: str) -> str:
    """'yes', or why not: imports the target's module (as a call to it would)."""
    from .registry import is_dispatcher_target, parse_target

    if is_dispatcher_target(target):
        import torch

        ns, op = parse_target(target)
        packet, _, overload = op.partition(".")
        try:
            getattr(getattr(getattr(torch.ops, ns), packet), overload or "default")
            return "yes"
        except (AttributeError, RuntimeError):
            return "no: op not registered in this process"
    module_name, attr = parse_target(target)
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or a library failing at import on this machine
        return f"no: import {module_name} failed ({type(exc).__name__}: {exc})"[:160]
    for part in attr.split("."):
        if not hasattr(obj, part):
            return f"no: {module_name} has no {attr}"
        obj = getattr(obj, part)
    return "yes"


if __name__ == "__main__":
    sys.exit(main())
