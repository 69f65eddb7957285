"""Test configuration: FlashInfer must fail offline; builders live in batches.py."""

import os

os.environ.setdefault("FLASHINFER_NO_DOWNLOAD", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Every Triton kernel the CPU tests run (SGLang's table builder, tsan_paged's device check)
    # runs under Triton's interpreter, which must be chosen before triton is first imported:
    # triton.language's own @jit helpers (tl.cdiv, ...) are built at that import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest_plugins = ["pytester"]


@pytest.fixture
def dump_dir(tmp_path):
    return str(tmp_path / "dumps")
