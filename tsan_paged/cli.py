"""The ``tsan-paged`` command: ``demo``, ``show DUMP``, ``rules``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys


def main(argv=None) -> int:
    # A call that gets through to FlashInfer's trtllm-gen path must fail offline, not download.
    os.environ.setdefault("FLASHINFER_NO_DOWNLOAD", "1")
    parser = argparse.ArgumentParser(prog="tsan-paged", description="A sanitizer for paged-KV attention kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="catch the seed's off-by-one (8657 of 8657) through the real FlashInfer entry point, on CPU")
    show = sub.add_parser("show", help="explain a dump: what was called, what was wrong, re-checked with the current rules")
    show.add_argument("dump", nargs="+")
    sub.add_parser("rules", help="list the rules and whether each target resolves in this environment")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo()
    if args.command == "show":
        return _show(args.dump)
    return _rules()


def _show(paths) -> int:
    from . import dump
    from .sanitizer import _default_registry

    _default_registry()
    status = 0
    for path in paths:
        try:
            print(dump.explain(path))
        except (OSError, ValueError, RuntimeError) as exc:
            print(f"tsan-paged show: {path}: {exc}", file=sys.stderr)
            status = 2
    return status


def _rules() -> int:
    from .sanitizer import _default_registry

    registry = _default_registry()
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
