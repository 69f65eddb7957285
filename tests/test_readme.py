"""The README and docs/ as written: every ```python block runs, every ```toml block and shipped
config loads, and every relative link resolves to a file (and a heading, for ``#anchors``).

Commands that other tests run exactly as a page writes them are read from that page by those tests:
``test_pytest_plugin.py`` (the README's and docs/pytest.md's pytest commands),
``test_distributed.py`` (docs/distributed.md's torchrun line), ``test_sglang_server.py``
(docs/sglang.md's server commands).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tsan_paged import PagedSanitizer

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def blocks(language: str) -> list:
    """``(page, i, code)`` for every fenced block of ``language``."""
    return [(page, i, code) for page in PAGES
            for i, code in enumerate(re.findall(rf"```{language}\n(.*?)```", page.read_text(), re.S))]


PYTHON = blocks("python")
TOML = blocks("toml")


@pytest.mark.parametrize("page,i,code", PYTHON, ids=[f"{name(p)}:block{i}" for p, i, _ in PYTHON])
def test_python_blocks_run(page, i, code, tmp_path):
    env = {**os.environ, "FLASHINFER_NO_DOWNLOAD": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_page_with_python_is_covered():
    assert {name(p) for p, _, _ in PYTHON} >= {"README.md", "docs/usage.md", "docs/rules.md"}


def test_toml_blocks_and_shipped_configs_load(tmp_path):
    # the README's rule, the rule guide (docs/rules.md) and the configuration reference
    assert sorted(name(p) for p, _, _ in TOML) == ["README.md", "docs/configuration.md", "docs/rules.md"]
    for page, i, block in TOML:
        path = tmp_path / f"{page.stem}{i}.toml"
        path.write_text(block)
        san = PagedSanitizer(config=path)
        assert san.registry.for_target("mylib::paged_decode")[0].source == str(path), name(page)
    [reference] = [block for page, _, block in TOML if page.name == "configuration.md"]
    (tmp_path / "reference.toml").write_text(reference)
    assert PagedSanitizer(config=tmp_path / "reference.toml").config.severity("duplicate-page") == "warning"
    assert PagedSanitizer(config=ROOT / "configs" / "default.toml").config.severity("duplicate-page") == "off"
    strict = PagedSanitizer(config=ROOT / "configs" / "strict.toml")
    assert strict.mode == "raise" and strict.config.severity("dead-page-out-of-range") == "error"
    assert PagedSanitizer(config=ROOT / "configs" / "track_pages.toml").config.track_pages is True


def test_readme_fits_in_five_minutes():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    seen: dict = {}
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        found.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return found


def links(page: Path) -> list:
    """Relative link targets of a page, outside code blocks and code spans."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]


def test_slug_is_githubs():
    assert slug("What a report looks like: the seed's case") == "what-a-report-looks-like-the-seeds-case"
    assert slug("KV use-after-free: `track_pages`") == "kv-use-after-free-track_pages"
    assert slug("torch.compile") == "torchcompile"


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no file {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    assert [name(p) for p in PAGES[1:] if p.resolve() not in linked] == []
