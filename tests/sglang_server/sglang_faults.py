"""Faults planted in SGLang's own code, for the real-server tests (``tests/test_sglang_server.py``).

A fault is a one-line edit of an SGLang 0.5.23 function's source: the line is replaced, the
function recompiled from SGLang's file (same file name and line numbers, so tracebacks and the
sanitizer's reports name SGLang's real lines) and its ``__code__`` swapped in place, so every
reference to the function (a class attribute, a wrapper holding it) runs the faulty body. Nothing
of the sanitizer is touched: it must find the fault as it would find a real bug.

``TSAN_PAGED_TEST_FAULT=<name>`` plants one (in every process that imports the edited module),
``TSAN_PAGED_TEST_FAULT_AT=<n>`` (default 30) says at which call of the edited line it fires (once):

- ``alloc-past-end``: the seed's allocator bug. SGLang's KV allocator (``TokenToKVPoolAllocator.alloc``,
  ``PagedTokenToKVPoolAllocator.alloc_extend`` / ``alloc_decode``) hands out, as the last index of
  an allocation, one slot past the end of its pool: page ``num_pages + 1``, the page count of the
  KV buffers (``size + page_size`` rows), like the seed's page 8657 of 8657.
- ``premature-free``: a decode step (``ScheduleBatch.prepare_for_decode``) frees the first KV slots
  of a running request through SGLang's allocator while the request still attends to them (a KV
  use-after-free: in range, so only ``track_pages`` sees it).
- ``corrupt-req-to-token``: a decode step writes one past the end of the KV buffers into a
  running request's ``req_to_token`` row, before the attention reads it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import inspect
import os
import sys
import textwrap

FIRED_MARK = "TSAN_PAGED_TEST_FAULT fired"  # printed (stderr) when a fault fires: tests wait for it


class Edit:
    """Replace ``old`` (one whole line of ``qualname``'s source, stripped) by ``new``."""

    def __init__(self, module: str, qualname: str, old: str, new: str):
        self.module, self.qualname, self.old, self.new = module, qualname, old, new

    def apply(self, module) -> None:
        obj = module
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        function = getattr(obj, "__tsan_paged_original__", obj)  # under a tracking wrapper: the original
        lines, first = inspect.getsourcelines(function)
        hits = [i for i, line in enumerate(lines) if line.strip() == self.old]
        if len(hits) != 1:
            raise RuntimeError(f"fault edit: {self.qualname} has {len(hits)} lines {self.old!r} (SGLang changed?)")
        i = hits[0]
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        lines[i] = indent + self.new + "\n"
        source = textwrap.dedent("".join(lines))
        code = compile("\n" * (first - 1) + source, function.__code__.co_filename, "exec")
        namespace: dict = {}
        exec(code, module.__dict__, namespace)  # defines the edited function under its own name
        edited = next(v for v in namespace.values() if inspect.isfunction(v))
        if edited.__code__.co_freevars != function.__code__.co_freevars:
            raise RuntimeError(f"fault edit: {self.qualname}'s closure changed")
        function.__code__ = edited.__code__


class Trigger:
    """Counts calls of an edited line; ``fire()`` is true once, at call number ``at``."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def fire(self) -> bool:
        self.calls += 1
        if self.calls != self.at:
            return False
        sys.stderr.write(f"{FIRED_MARK}: {os.environ.get('TSAN_PAGED_TEST_FAULT')} (pid {os.getpid()})\n")
        sys.stderr.flush()
        return True


def past_end(allocator, indices):
    """``indices`` with its last entry moved to page ``num_pages + 1``, at the trigger's call."""
    if indices is None or indices.numel() == 0 or not TRIGGER.fire():
        return indices
    page_size = int(allocator.page_size)
    pages = int(allocator.size) // page_size  # SGLang's pool: pages 1..pages, page 0 is padding
    out = indices.clone()
    out.view(-1)[-1] = (pages + 1) * page_size + int(out.view(-1)[-1]) % page_size
    return out


def _longest_running(batch) -> tuple:
    """``(its row of req_to_token, its length)`` of the batch's longest request."""
    lengths = batch.seq_lens_cpu.tolist()
    row = max(range(len(lengths)), key=lengths.__getitem__)
    return int(batch.req_pool_indices[row]), int(lengths[row])


def free_early(batch):
    """Free the first KV slots (a quarter, at least one page) of the longest running request."""
    if not batch.reqs or not TRIGGER.fire():
        return
    pool_row, length = _longest_running(batch)
    page_size = int(batch.token_to_kv_pool_allocator.page_size)
    count = max(page_size, (length // 4) // page_size * page_size)
    slots = batch.req_to_token_pool.req_to_token[pool_row, :count].to(batch.out_cache_loc.dtype)
    batch.token_to_kv_pool_allocator.free(slots)


def corrupt_row(batch):
    """Write one past the end of the KV buffers into the longest running request's row."""
    if not batch.reqs or not TRIGGER.fire():
        return
    pool_row, length = _longest_running(batch)
    allocator = batch.token_to_kv_pool_allocator
    rows = int(allocator.size) + int(allocator.page_size)  # the KV buffers' rows (memory_pool.py)
    batch.req_to_token_pool.req_to_token[pool_row, length // 2] = rows


ALLOCATOR_TOKEN = "sglang.srt.mem_cache.allocator.token"
ALLOCATOR_PAGED = "sglang.srt.mem_cache.allocator.paged"
SCHEDULE_BATCH = "sglang.srt.managers.schedule_batch"
DECODE_ALLOC = "self.out_cache_loc = alloc_for_decode(self, token_per_req=1)"

FAULTS = {
    "alloc-past-end": [
        Edit(ALLOCATOR_TOKEN, "TokenToKVPoolAllocator.alloc", "return select_index",
             "return _tsan_fault(self, select_index)"),
        Edit(ALLOCATOR_PAGED, "PagedTokenToKVPoolAllocator.alloc_extend", "return out_indices",
             "return _tsan_fault(self, out_indices)"),
        Edit(ALLOCATOR_PAGED, "PagedTokenToKVPoolAllocator.alloc_decode", "return out_indices",
             "return _tsan_fault(self, out_indices)"),
    ],
    "premature-free": [Edit(SCHEDULE_BATCH, "ScheduleBatch.prepare_for_decode", DECODE_ALLOC,
                            DECODE_ALLOC + "; _tsan_fault(self)")],
    "corrupt-req-to-token": [Edit(SCHEDULE_BATCH, "ScheduleBatch.prepare_for_decode", DECODE_ALLOC,
                                  DECODE_ALLOC + "; _tsan_fault(self)")],
}
HELPERS = {"alloc-past-end": past_end, "premature-free": free_early, "corrupt-req-to-token": corrupt_row}
TRIGGER = Trigger(int(os.environ.get("TSAN_PAGED_TEST_FAULT_AT", "30")))


class _PlantAfterImport(importlib.abc.MetaPathFinder):
    """Applies the edits of a module right after it is imported."""

    def __init__(self, edits: dict, helper):
        self.edits, self.helper = edits, helper

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.edits:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        loader, edits, helper = spec.loader, self.edits.pop(fullname), self.helper

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                module.__dict__["_tsan_fault"] = helper
                for edit in edits:
                    edit.apply(module)

        spec.loader = Loader()
        return spec


def install_from_environment() -> None:
    name = os.environ.get("TSAN_PAGED_TEST_FAULT")
    if not name:
        return
    if name not in FAULTS:
        raise SystemExit(f"TSAN_PAGED_TEST_FAULT={name!r}: one of {', '.join(FAULTS)}")
    edits: dict = {}
    for edit in FAULTS[name]:
        edits.setdefault(edit.module, []).append(edit)
    sys.meta_path.insert(0, _PlantAfterImport(edits, HELPERS[name]))
