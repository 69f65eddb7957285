"""Test configuration: FlashInfer must fail offline; builders live in batches.py."""

import os

os.environ.setdefault("FLASHINFER_NO_DOWNLOAD", "1")

import pytest  # noqa: E402

pytest_plugins = ["pytester"]


@pytest.fixture
def dump_dir(tmp_path):
    return str(tmp_path / "dumps")
