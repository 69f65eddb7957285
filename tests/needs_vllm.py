"""Imported first by the vLLM test modules: skips the importing module where vLLM 0.33.0 cannot
be imported (``.ci/install``'s minimal and core tiers leave it out), and sets up what vLLM needs
to run its Triton kernels on a CPU.

- ``TRITON_INTERPRET=1``: the kernels run under Triton's interpreter (tests/conftest.py sets it
  too, before Triton's first import).
- ``CUDA_VISIBLE_DEVICES=""`` on a machine without a usable GPU: ``vllm.triton_utils.importing``
  disables Triton unless exactly one Triton driver is active, and lets zero pass only when
  ``CUDA_VISIBLE_DEVICES`` is set and empty. Without it every ``@triton.jit`` kernel of vLLM's
  is replaced by a placeholder. Read once, when ``vllm.triton_utils`` is first imported, so it
  is set here, before any vLLM import.
- vLLM's compiled extensions cannot load here (they need libcuda; ``.ci/install`` removes
  them): ``vllm_standins.install()`` stands in for the ones the tests reach.
"""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
if not torch.cuda.is_available():
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

try:
    import vllm_standins

    vllm_standins.install()
    import vllm.v1.attention.ops.triton_unified_attention  # noqa: F401
    from vllm.triton_utils import HAS_TRITON
except Exception as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"vllm 0.33.0 is not importable here ({type(exc).__name__}: {exc}); "
                "`.ci/install full` installs it (the minimal and core tiers leave it out)", allow_module_level=True)
if not HAS_TRITON:  # pragma: no cover
    pytest.skip("vLLM disabled Triton here (vllm.triton_utils.HAS_TRITON is False: CUDA_VISIBLE_DEVICES must be "
                "empty on a machine without a GPU)", allow_module_level=True)
