"""Imported first by the SGLang test modules: skips the importing module where SGLang 0.5.23
cannot be imported (``.ci/install``'s core tier leaves it out)."""

import os

import pytest

os.environ.setdefault("FLASHINFER_NO_DOWNLOAD", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")  # SGLang's table kernels run under Triton's interpreter
try:
    import sglang.srt.layers.attention.trtllm_mha_backend  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"sglang 0.5.23 is not importable here ({type(exc).__name__}: {exc}); "
                "`.ci/install full` installs it (the core tier leaves it out)", allow_module_level=True)
