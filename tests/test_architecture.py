"""The module layout docs/architecture.md states, checked on the source."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tsan_paged"
ROOT = PACKAGE.parent


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



def documented_tree() -> str:
    return re.search(r"```\n(tsan_paged/\n.*?)```", (ROOT / "docs" / "architecture.md").read_text(), re.S).group(1)


def test_the_documented_tree_names_every_module_and_config():
    """docs/architecture.md's tree names each module of ``tsan_paged/`` and ``tsan_paged/rules/``,
    and each shipped config; each top-level path it names exists."""
    tree = documented_tree()
    named = set(re.findall(r"[\w.]+\.(?:py|pth|toml|typed)\b", tree))
    modules = {p.name for p in PACKAGE.glob("*.py")} | {p.name for p in (PACKAGE / "rules").glob("*.py")}
    assert modules - named == set(), "modules the tree does not name"
    configs = {p.name for p in (ROOT / "configs").glob("*.toml")}
    assert configs - named == set(), "configs the tree does not name"
    top = [line.split()[0] for line in tree.splitlines() if line and not line.startswith(" ")]
    assert [t for t in top if not (ROOT / t).exists()] == [], "the tree names what is not there"
