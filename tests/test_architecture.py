"""The module layout the README's architecture section states, checked on the source."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tsan_paged"


def imported_modules(path: Path) -> set:
    """``tsan_paged`` modules a module imports, anywhere in it (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = node.module or ""
            names.update(f"{base}.{a.name}".strip(".") if not base else base for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tsan_paged"):
            names.add(node.module.removeprefix("tsan_paged").strip("."))
    return {n.split(".")[0] for n in names}


def test_the_engine_and_the_device_code_never_import_the_sanitizer():
    """Findings made later (device records, the allocator shadow) reach the sanitizer through one
    narrow entry, ``report_found`` of the sink they were given: no import circle through it."""
    for name in ("engine.py", "device.py", "kernels.py", "access.py", "checks.py", "tracking.py"):
        assert "sanitizer" not in imported_modules(PACKAGE / name), name


def test_rule_modules_describe_and_never_launch():
    for path in (PACKAGE / "rules").glob("*.py"):
        assert not imported_modules(path) & {"device", "kernels", "engine", "sanitizer"}, path.name
