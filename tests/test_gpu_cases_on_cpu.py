"""The GPU tests' cases, built on a CPU: so that a GPU run can fail only for the GPU's reasons.

``tests/gpu/gpu_cases.py`` builds, for each rule whose library or kernel cannot run on the lent
GPU, the arguments of a call and a fault to plant (``checked_alone``, ``unrunnable_calls``); the
GPU tests capture the sanitizer's check of that call and replay it. GPU time is scarce, and a case
the rule cannot bind (a name it reads and the case lacks: ``rule-unbound``) or whose plant lands
outside the region the rule reads would waste it. Here every case is checked on the host, as
an eager call is: quiet as built, and the planted fault found at its index. The GPU tests run
the same cases on the device.
"""

import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "gpu"))

import flashinfer.decode  # noqa: E402,F401  (the targets' modules, so the interposer binds them)
import flashinfer.mla  # noqa: E402,F401
import flashinfer.prefill  # noqa: E402,F401
import flashinfer.xqa  # noqa: E402,F401
from gpu_cases import checked_alone, unrunnable_calls  # noqa: E402

from tsan_paged import PagedSanitizer  # noqa: E402
from tsan_paged.interpose import interposer  # noqa: E402


def _gpu_test_lists():
    path = os.path.join(os.path.dirname(__file__), "gpu", "test_gpu_graphs.py")
    spec = importlib.util.spec_from_file_location("_gpu_graphs_lists", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # its tests skip without CUDA; its lists are plain names
    return module.ALONE, module.UNRUNNABLE


ALONE, UNRUNNABLE = _gpu_test_lists()


def found(violations):
    return [(v.check, v.index, v.value, v.bound) for v in violations if v.severity == "error"]


def check_case(target, arguments, plant, library_dirs=()):
    with PagedSanitizer(mode="log") as san:
        rules = san._rules[target]
        san._check_and_act(target, rules, arguments, library_dirs)
        assert san.reports == [], [str(v) for v in san.reports]
        expected = plant()
        san._check_and_act(target, rules, arguments, library_dirs)
    assert expected in found(san.reports), (expected, [str(v) for v in san.reports])


def test_the_gpu_tests_run_every_case():
    assert sorted(ALONE) == sorted(checked_alone("cpu"))
    assert sorted(UNRUNNABLE) == sorted(unrunnable_calls("cpu"))


@pytest.mark.parametrize("label", ALONE)
def test_checked_alone_case_is_quiet_and_its_plant_is_found(label):
    target, arguments, plant = checked_alone("cpu")[label]
    check_case(target, arguments, plant)


@pytest.mark.parametrize("target", UNRUNNABLE)
def test_unrunnable_call_is_quiet_and_its_plant_is_found(target):
    kwargs, plant = unrunnable_calls("cpu")[target]
    with PagedSanitizer(mode="log"):
        patched = interposer.patched[target]
        arguments = patched.binder.bind((), kwargs)
    check_case(target, arguments, plant, patched.library_dirs)
