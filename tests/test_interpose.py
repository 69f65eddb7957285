"""The Python-callable catcher: wherever the entry point is bound, and restored exactly."""

import importlib
import sys
import textwrap
import threading

import flashinfer.decode
import pytest
from flashinfer.decode import trtllm_batch_decode_with_kv_cache as alias_bound_before_start

import tsan_paged
from batches import call_kernel, make_batch
from tsan_paged import PagedSanitizer, PageTableViolation
from tsan_paged.interpose import interposer

# Held in a container: the sanitizer rebinds module globals that hold the entry point.
HELD = [flashinfer.decode.trtllm_batch_decode_with_kv_cache]


def bad_batch():
    batch = make_batch(lengths=[20, 20], num_pages=30)
    batch["block_tables"][1, 0] = 30
    return batch


@pytest.fixture
def module_dir(tmp_path, monkeypatch):
    """A directory on sys.path for modules written by a test (a stand-in serving backend)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    created = []

    def write(name, source):
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        created.append(name)
        importlib.invalidate_caches()

    yield write
    for name in created:
        sys.modules.pop(name, None)


BACKEND_SOURCE = """
    from flashinfer.decode import trtllm_batch_decode_with_kv_cache as decode_kernel

    def forward_decode(batch):
        return decode_kernel(**batch)
"""


def assert_restored():
    assert flashinfer.decode.trtllm_batch_decode_with_kv_cache is HELD[0]
    assert globals()["alias_bound_before_start"] is HELD[0]
    assert interposer.patched == {} and interposer.pending == set()
    assert not any(type(f).__name__ == "ImportWatcher" for f in sys.meta_path)


def test_call_by_attribute():
    with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation):
        flashinfer.decode.trtllm_batch_decode_with_kv_cache(**bad_batch())
    assert_restored()


def test_alias_bound_before_the_sanitizer_started():
    with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation):
        alias_bound_before_start(**bad_batch())
    assert_restored()


def test_another_modules_import_made_before_start(module_dir):
    module_dir("serving_backend_early", BACKEND_SOURCE)
    import serving_backend_early

    with PagedSanitizer(mode="raise") as san, pytest.raises(PageTableViolation) as info:
        serving_backend_early.forward_decode(bad_batch())
    assert serving_backend_early.decode_kernel is HELD[0]
    assert info.value.violations[0].caller.endswith("in forward_decode")
    assert "serving_backend_early.py:5" in san.reports[0].caller
    assert_restored()


def test_module_imported_while_active(module_dir):
    module_dir("serving_backend_late", BACKEND_SOURCE)
    with PagedSanitizer(mode="raise"):
        import serving_backend_late

        with pytest.raises(PageTableViolation):
            serving_backend_late.forward_decode(bad_batch())
    assert serving_backend_late.decode_kernel is HELD[0]
    assert_restored()


def test_module_imported_between_two_entries_is_wrapped_at_the_next(module_dir):
    with PagedSanitizer():  # the process's first sweep
        pass
    module_dir("serving_backend_between", BACKEND_SOURCE)
    import serving_backend_between  # while no sanitizer is active: no import hook sees it

    with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation):
        serving_backend_between.forward_decode(bad_batch())
    assert serving_backend_between.decode_kernel is HELD[0]
    assert_restored()


def test_steady_state_entry_sweeps_nothing_and_rewraps_the_names_found_before(module_dir, monkeypatch):
    """Entry is incremental (issue 13): names found by an earlier sweep are wrapped again
    directly, and no module is swept when none was imported since."""
    module_dir("serving_backend_known", BACKEND_SOURCE)
    import serving_backend_known

    with PagedSanitizer():
        assert serving_backend_known.decode_kernel is not HELD[0]  # found by the sweep
    assert serving_backend_known.decode_kernel is HELD[0]
    swept = []
    sweep = interposer._sweep_modules
    monkeypatch.setattr(interposer, "_sweep_modules", lambda modules, by_id=None: (
        swept.extend(modules), sweep(modules, by_id)))
    san = PagedSanitizer(mode="raise")
    san.__enter__()
    try:
        assert swept == []
        assert serving_backend_known.decode_kernel is not HELD[0]
        with pytest.raises(PageTableViolation):
            serving_backend_known.forward_decode(bad_batch())
    finally:
        san.__exit__(None, None, None)
    assert serving_backend_known.decode_kernel is HELD[0]
    assert_restored()


def test_a_module_imported_anew_under_the_same_name_is_swept(module_dir):
    """A test fixture's pattern: the module is dropped from sys.modules and imported again, so
    sys.modules has the same size and the same last name, but a new module object."""
    module_dir("serving_backend_again", BACKEND_SOURCE)
    import serving_backend_again

    with PagedSanitizer():
        pass
    del sys.modules["serving_backend_again"]
    fresh = importlib.import_module("serving_backend_again")
    assert fresh is not serving_backend_again
    with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation):
        fresh.forward_decode(bad_batch())
    assert_restored()


MID_IMPORT_SOURCE = """
    from tsan_paged import PagedSanitizer

    with PagedSanitizer():  # a sanitizer entered while this module is still being imported
        pass

    from flashinfer.decode import trtllm_batch_decode_with_kv_cache as decode_kernel

    def forward_decode(batch):
        return decode_kernel(**batch)
"""


def test_a_module_swept_while_still_importing_is_swept_again(module_dir):
    module_dir("serving_backend_mid_import", MID_IMPORT_SOURCE)
    import serving_backend_mid_import  # binds the kernel after the sweep saw it

    with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation):
        serving_backend_mid_import.forward_decode(bad_batch())
    assert serving_backend_mid_import.decode_kernel is HELD[0]
    assert_restored()


def test_target_module_imported_while_active():
    """flashinfer.decode not imported yet when the sanitizer starts: wrapped on import."""
    code = textwrap.dedent("""
        import os, sys
        os.environ["FLASHINFER_NO_DOWNLOAD"] = "1"
        sys.path.insert(0, "tests")
        from tsan_paged import PagedSanitizer, PageTableViolation
        assert "flashinfer.decode" not in sys.modules
        with PagedSanitizer(mode="raise"):
            import flashinfer.decode
            from batches import make_batch
            batch = make_batch(lengths=[20, 20], num_pages=30)
            batch["block_tables"][1, 0] = 30
            try:
                flashinfer.decode.trtllm_batch_decode_with_kv_cache(**batch)
            except PageTableViolation as exc:
                print("caught", exc.violations[0].index)
        print("restored", getattr(flashinfer.decode.trtllm_batch_decode_with_kv_cache, "__tsan_paged_original__", None) is None)
    """)
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "caught (1, 0)" in out.stdout and "restored True" in out.stdout


def test_restored_after_an_exception_in_the_block():
    with pytest.raises(KeyError):
        with PagedSanitizer():
            assert flashinfer.decode.trtllm_batch_decode_with_kv_cache is not HELD[0]
            raise KeyError("boom")
    assert_restored()


def test_nesting_and_reentry():
    outer, inner = PagedSanitizer(mode="log"), PagedSanitizer(mode="raise")
    with outer:
        with inner:
            with inner:  # re-entering the same instance
                with pytest.raises(PageTableViolation):
                    call_kernel(bad_batch())
            with pytest.raises(PageTableViolation):  # still active: depth 1
                call_kernel(bad_batch())
        assert call_kernel(bad_batch())  # outer is log: reports, calls the kernel
        assert flashinfer.decode.trtllm_batch_decode_with_kv_cache is not HELD[0]
    assert_restored()
    assert len(inner.reports) == 2 and len(outer.reports) == 1


def test_decorator():
    sanitizer = PagedSanitizer(mode="raise")

    @sanitizer
    def step():
        call_kernel(bad_batch())

    with pytest.raises(PageTableViolation):
        step()
    with pytest.raises(PageTableViolation):
        step()
    assert_restored()
    assert len(sanitizer.reports) == 2


def test_other_threads_calls_are_checked_and_nothing_stays_patched():
    results = []
    started, release = threading.Event(), threading.Event()

    def worker():
        started.wait()
        try:
            call_kernel(bad_batch())
            results.append("called")
        except PageTableViolation:
            results.append("caught")
        release.set()

    thread = threading.Thread(target=worker)
    thread.start()
    with PagedSanitizer(mode="raise"):
        started.set()
        release.wait(30)
    thread.join()
    assert results == ["caught"]
    assert_restored()

    # entered and exited on another thread
    def enter_exit():
        with PagedSanitizer():
            pass

    t = threading.Thread(target=enter_exit)
    t.start()
    t.join()
    assert_restored()


def test_a_name_rebound_by_the_program_is_left_alone(module_dir):
    module_dir("rebinding_backend", BACKEND_SOURCE)
    import rebinding_backend

    def replacement(**kw):
        return "mine"

    with PagedSanitizer():
        rebinding_backend.decode_kernel = replacement
    assert rebinding_backend.decode_kernel is replacement
    assert_restored()


def test_wrapper_keeps_the_signature_and_name():
    import inspect

    with PagedSanitizer():
        wrapped = flashinfer.decode.trtllm_batch_decode_with_kv_cache
        assert wrapped.__name__ == "trtllm_batch_decode_with_kv_cache"
        assert inspect.signature(wrapped) == inspect.signature(HELD[0])
