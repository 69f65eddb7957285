# Written as v1/conftest.py into the run directory by tests/owner_suites/vllm_suite.py (tsan_paged's,
# not vLLM's). @VLLM_SRC@ is replaced by the extracted vLLM source directory at run time.
import sys

sys.path.insert(0, "@VLLM_SRC@")  # `from tests.v1.attention.utils import ...` (vLLM's helpers)

# harness (not vLLM's): vLLM's tests/conftest.py fixture default_vllm_config (same body)
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture()
def default_vllm_config():
    from vllm.config import VllmConfig, set_current_vllm_config
    config = VllmConfig(device_config=__import__("vllm.config", fromlist=["DeviceConfig"]).DeviceConfig(device="cpu"))  # CPU-EDIT
    with set_current_vllm_config(config):
        yield config


# CPU-EDIT (harness): triton_reshape_and_cache_flash asks torch.cuda for the capability (tile size
# heuristic) after tsan_paged's check; answer sm90 so the kernel runs under TRITON_INTERPRET.
torch.cuda.get_device_capability = lambda *a, **k: (9, 0)

# CPU-EDIT (harness): vLLM's create_vllm_config builds DeviceConfig() (device inference fails with no
# GPU platform) and ModelConfig(tokenizer=model) (no tokenizer files in the local config dir).
import functools  # noqa: E402

import tests.v1.attention.utils as _u  # noqa: E402
from vllm.config import DeviceConfig as _DC, ModelConfig as _MC  # noqa: E402

_u.DeviceConfig = functools.partial(_DC, device="cpu")
_u.ModelConfig = functools.partial(_MC, skip_tokenizer_init=True)
