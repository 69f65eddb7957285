# Written as conftest.py into the run directory by tests/owner_suites/vllm_suite.py (tsan_paged's,
# not vLLM's): replaces vLLM's tests/conftest.py, which needs CUDA and model dependencies.
# @REPO_TESTS@ is replaced by the path of tsan_paged's tests/ at run time.
import ast
import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
sys.path.insert(0, "@REPO_TESTS@")  # vllm_standins (stand-ins for vLLM's compiled .so files)
import vllm_standins  # noqa: E402

vllm_standins.install()


def pytest_configure(config):
    for m in ("skip_global_cleanup", "optional", "cpu_test", "core_model", "slow_test"):
        config.addinivalue_line("markers", m)


# CPU-EDIT (harness): vLLM's UnspecifiedPlatform (no GPU) raises in manual_seed_all, which
# set_random_seed calls after random/np/torch.manual_seed; make it a no-op (CPU RNG already seeded).
from vllm.platforms.interface import UnspecifiedPlatform  # noqa: E402

UnspecifiedPlatform.manual_seed_all = classmethod(lambda cls, seed: None)

# vLLM's tests/kernels/attention/conftest.py fixtures (the same two fixtures)
import pytest  # noqa: E402
from vllm.utils.torch_utils import create_kv_caches_with_random, create_kv_caches_with_random_flash  # noqa: E402


@pytest.fixture()
def kv_cache_factory():
    return create_kv_caches_with_random


@pytest.fixture()
def kv_cache_factory_flashinfer():
    return create_kv_caches_with_random_flash


# ---- per-test record for the runner (OWNER_SUITE_RECORDS): outcome, the faults the PLANT harness
# printed ("PLANTED {...}"), the sanitizer's reports for this test and how many calls it checked.
_RECORDS = os.environ.get("OWNER_SUITE_RECORDS")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not _RECORDS:
        return
    state = item.__dict__.setdefault("_owner_suite", {"outcome": "passed"})
    if rep.failed:
        state["outcome"] = "failed"
    elif rep.skipped and state["outcome"] == "passed":
        state["outcome"] = "skipped"
    if call.when != "teardown":
        return
    planted = [ast.literal_eval(line[len("PLANTED "):]) for line in rep.capstdout.splitlines()
               if line.startswith("PLANTED {")]
    from tsan_paged.pytest_plugin import _ITEM

    san = item.stash.get(_ITEM, None)
    reports, checked = [], {}
    if san is not None:
        reports = [dict(check=v.check, arg=v.arg, severity=v.severity, op=v.op,
                        index=None if v.index is None else [int(i) for i in v.index]) for v in san.reports]
        for (target, how), n in san.checked.items():
            checked[target] = checked.get(target, 0) + n
    with open(_RECORDS, "a") as f:
        f.write(json.dumps(dict(nodeid=item.nodeid, outcome=state["outcome"], planted=planted,
                                reports=reports, checked=checked), default=str) + "\n")
