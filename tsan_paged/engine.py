"""The engine: checks what rules describe, on the host or on the device.

A rule returns findings of its own (shapes, dtypes: metadata) and descriptions of what its
kernel reads (:mod:`tsan_paged.access`). :func:`execute` turns the descriptions into findings:

- CPU tensors: the torch checks of :mod:`tsan_paged.checks`;
- CUDA tensors: one launch of a :mod:`tsan_paged.device` kernel per description, no host
  sync. In ``raise`` and ``abort`` mode an eager call reads the record at once (one sync) so
  the sanitizer acts before the kernel; in ``log`` mode, and while a CUDA graph is being
  captured, records are read later and reported through ``settings.sink``.

Capture safety is an invariant: while the current stream is capturing, nothing here syncs,
allocates outside the graph's pool or launches on another stream. A check that cannot run on
the device then (a host-only check such as ``duplicate-page``, the torch path when Triton is
missing or ``device_path = "torch"``) is skipped, with one ``rule-skipped-in-capture`` warning
per call site and check: never a broken capture, never a silent pass. Eagerly it runs on the
host (and syncs).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import checks
from .access import CsrPages, HostCheck, Settings, is_access
from .callsite import find_caller
from .report import Violation

_device = None  # tsan_paged.device, imported on the first CUDA (or interpreted) check: it imports Triton


def _device_module():
    global _device
    if _device is None:
        from . import device

        _device = device
    return _device


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (without initializing CUDA)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


HOST, DEVICE, CAPTURED, SKIPPED = "host", "device", "captured", "skipped"
"""How a description was checked (the sanitizer counts checked calls by it): with torch on the host;
by a device launch now; by a device launch captured into a CUDA graph, which checks at every
replay; or not at all, skipped while a graph was being captured."""


def execute(items, call, settings: Settings, op: str, library_dirs: tuple = (),
            capture: Optional[bool] = None, paths: Optional[set] = None) -> list:
    """The findings of a rule's output ``items`` (Violations and access descriptions) for one
    call; ``capture``: whether a CUDA graph is being captured (looked up here when not given);
    ``paths``: a set that gets how each description was checked (:data:`HOST`, ...)."""
    found = []
    paths = set() if paths is None else paths
    for item in items:
        if not is_access(item):
            found.append(item)
            continue
        if isinstance(item, HostCheck):
            if item.cuda:
                capture = capturing() if capture is None else capture
                if capture:
                    paths.add(SKIPPED)
                    found += _skipped(settings, op, library_dirs, item.what, "it reads the tensors on the host")
                    continue
            paths.add(HOST)
            found += item.run()
            continue
        tensors = item.tensors()
        if any(t.is_cuda for t in tensors):
            capture = capturing() if capture is None else capture
            found += _on_device(item, tensors, settings, op, library_dirs, capture, paths)
        elif getattr(call.options, "device_interpret", False) and _device_module().available():
            paths.add(HOST)  # the device kernel, run by Triton's interpreter on the host (the tests')
            found += _interpreted(item)
        else:
            paths.add(HOST)
            found += checks.TORCH_CHECKS[type(item)](item)
    return found


def findings(items, call, settings: Optional[Settings] = None) -> list:
    """The findings of a rule's output for ``call`` as a sanitizer with ``settings`` (default:
    the default configuration, ``log`` mode) computes them: for testing a rule directly."""
    return execute(list(items), call, settings or Settings(), call.target)


def _on_device(item, tensors: tuple, settings: Settings, op: str, library_dirs: tuple, capture: bool,
               paths: Optional[set] = None) -> list:
    paths = set() if paths is None else paths
    devices = {t.device for t in tensors}
    if len(devices) > 1:  # a kernel reads all of them from one device: never launch across devices
        names = ", ".join(sorted(str(d) for d in devices))
        arg = getattr(item, "arg", None) or getattr(item, "indices_arg", "tensors")
        return [Violation("bad-device", arg, f"{_what(item)} of {op} reads tensors on {names}: a kernel reads "
                          "them all from one device", value=names)]
    device = _device_module()
    why = None
    if not device.available():
        why = f"Triton is not available ({device.TRITON_ERROR})"
    elif settings.device_path == "torch":
        why = "device_path = 'torch'"
    else:
        metadata, item = _csr_ready(item)
        if item is None:
            return metadata
        plan = device.plan_for(item)
        if plan is not None:
            if settings.errs is None:
                settings.errs = device.err_mask(settings.severity)
            paths.add(CAPTURED if capture else DEVICE)
            return metadata + device.check(plan, device.launch_tensors(item), settings, op, library_dirs, capture)
        why = "its form has no device kernel"
    if capture:
        paths.add(SKIPPED)
        return _skipped(settings, op, library_dirs, _what(item), why)
    paths.add(HOST)
    return checks.TORCH_CHECKS[type(item)](item)  # eager: the torch checks (they sync)


def _csr_ready(item):
    """``(metadata findings, the access as the device kernel can check it or None)``: a CSR list
    whose ``indptr`` is not 1-D or has no rows is answered by its metadata alone; one whose
    ``last_page_len`` has the wrong shape is checked without it (and its writes not at all), as
    the torch checks do."""
    if not isinstance(item, CsrPages):
        return [], item
    metadata = checks.csr_metadata(item)
    if metadata is None or item.indptr.shape[0] < 2:
        return checks.csr_findings(item), None  # answered without reading values
    if metadata:
        if item.writes is not None:
            return metadata, None
        item = CsrPages(item.indptr, item.indices, item.buffers, None, item.page_size, item.indptr_arg,
                        item.indices_arg, item.last_page_len_arg, None, item.guard, item.only)
    return metadata, item


def _interpreted(item) -> list:
    """A CPU access through the device kernel, under Triton's interpreter (the tests' device path)."""
    device = _device_module()
    metadata, item = _csr_ready(item)
    if item is None:
        return metadata
    plan = device.plan_for(item)
    if plan is None:
        return metadata + checks.TORCH_CHECKS[type(item)](item)
    return metadata + device.run_interpreted(plan, device.launch_tensors(item))


def _what(item) -> str:
    return {"PageTable": "the page-table check", "Lengths": "the length check", "CsrPages": "the CSR page-list check",
            "Slots": "the slot-mapping check"}.get(type(item).__name__, type(item).__name__)


def _skipped(settings: Settings, op: str, library_dirs: tuple, what: str, why: str) -> list:
    """One ``rule-skipped-in-capture`` warning per call site and check."""
    caller, stack = find_caller(library_dirs)
    key = (caller, op, what)
    if key in settings.skipped:
        return []
    settings.skipped.add(key)
    return [Violation("rule-skipped-in-capture", what,
                      f"{what} of {op} cannot run while a CUDA graph is being captured ({why}): the captured "
                      "call is not checked for it; its eager calls are", op=op, caller=caller, stack=stack)]


def skipped_rule(settings: Settings, op: str, library_dirs: tuple, rule_name: str, error: BaseException) -> list:
    """A rule that tried to synchronize while a graph was being captured (refused before the
    sync: the capture is intact)."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return _skipped(settings, op, library_dirs, f"rule {rule_name}", f"it synchronizes with the device: {text}")


def sync_refusal(error: BaseException) -> bool:
    """Whether ``error`` is PyTorch refusing a synchronizing operation (sync debug mode "error")."""
    return isinstance(error, RuntimeError) and "synchronizing CUDA operation" in str(error)


def no_sync_while(active: bool):
    """Make a synchronizing CUDA operation raise (before it syncs) while ``active``."""
    return _NoSync() if active else _NULL


class _NoSync:
    def __enter__(self):
        self.previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(self.previous)
        return False


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NULL = _Null()


def flush(sink=None) -> None:
    """Read the device records now (a sync), if any device check ran."""
    if _device is not None:
        _device.flush(sink)


def on_leave(sink, last: bool) -> None:
    """The sanitizer ``sink`` is leaving: read its device records (sync); ``last``: no
    sanitizer stays active."""
    if _device is not None:
        _device.on_leave(sink, last)
