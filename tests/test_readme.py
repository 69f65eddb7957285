"""Every ```python block in the README runs as written, and the configs it names load."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tsan_paged import PagedSanitizer

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_blocks_run(code, tmp_path):
    env = {**os.environ, "FLASHINFER_NO_DOWNLOAD": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_readme_toml_block_and_shipped_configs_load(tmp_path):
    blocks = re.findall(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) == 2  # the [[rule]] guide and the configuration reference
    for i, block in enumerate(blocks):
        (tmp_path / f"c{i}.toml").write_text(block)
        san = PagedSanitizer(config=tmp_path / f"c{i}.toml")
        assert san.registry.for_target("mylib::paged_decode")[0].source == str(tmp_path / f"c{i}.toml")
    assert PagedSanitizer(config=tmp_path / "c1.toml").config.severity("duplicate-page") == "warning"
    assert PagedSanitizer(config=ROOT / "configs" / "default.toml").config.severity("duplicate-page") == "off"
    strict = PagedSanitizer(config=ROOT / "configs" / "strict.toml")
    assert strict.mode == "raise" and strict.config.severity("dead-page-out-of-range") == "error"
