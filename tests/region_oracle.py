"""Read-region oracle: what a rule says a kernel reads, against what the kernel does.

For one call of a real kernel (run under Triton's interpreter) on a page table whose every
entry is a distinct, valid page:

- the rule's region: each entry is planted, one at a time, with an out-of-range id and the call
  is made under the sanitizer with ``dead-page-out-of-range`` as an error (strict): the check id
  of the finding at that entry says whether the rule calls it live (``page-out-of-range``) or
  dead (``dead-page-out-of-range``). The kernel never runs on a planted table (raise mode
  raises before it). This is the sanitizer as a user runs it, nothing re-derived here.
- what the kernel's output depends on: the pages of the entries are poisoned with NaN in K and
  V; an entry "changes the output" when its request's output rows change (NaN or otherwise).
  Requests read disjoint pages, so one run poisons one entry per request at once.
- what the kernel dereferences: the interpreter's loads are traced (``trace_loads``); an entry
  is dereferenced when a load with its mask set touched its page in K or V. A load that is
  masked in the softmax afterwards (a window's edge inside a loaded tile) does not change the
  output but still dereferences the page: an out-of-range id there faults on a GPU. The trace
  sees it; NaN cannot.

No false negative: every entry the rule calls dead leaves the output unchanged and is never
dereferenced. Tightness: of the entries the rule calls live, how many change the output and
how many are dereferenced (the rule is exact when all are dereferenced).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from tsan_paged import PagedSanitizer, PageTableViolation

STRICT = {"mode": "raise", "max_dumps": 0, "checks": {"dead-page-out-of-range": "error"}}


def rule_live(call, table, cells, bad) -> dict:
    """``{cell: True (live) / False (dead)}``: the sanitizer's verdict on ``bad`` planted at each cell
    of ``table`` (in place, restored), ``call()`` making the checked call: live where the finding
    is ``page-out-of-range``, dead where it is ``dead-page-out-of-range`` or where there is none
    (a CSR list's entries past ``indptr[-1]``: never read, not even warned about). Where there is
    none the kernel runs on the planted table: the caller makes ``bad`` an index its buffers can
    take safely (views of a larger allocation), so that a rule wrong there reads poisoned memory,
    which the oracle then sees, instead of crashing the test."""
    verdict = {}
    with PagedSanitizer(config=STRICT, summary=False):
        for cell in cells:
            saved = table[cell].clone()
            table[cell] = bad
            found, reports = set(), []
            try:
                call()
            except PageTableViolation as exc:
                reports = [str(v) for v in exc.violations]
                found = {v.check for v in exc.violations if v.check.endswith("page-out-of-range")}
            finally:
                table[cell] = saved
            assert len(found) <= 1, (cell, reports)
            verdict[cell] = found == {"page-out-of-range"}
    return verdict


@contextlib.contextmanager
def trace_loads():
    """Records the addresses of every enabled lane of every load the interpreter makes."""
    from triton.runtime.interpreter import InterpreterBuilder

    seen = []
    original = InterpreterBuilder.create_masked_load

    def traced(self, ptrs, mask, other, *args):
        seen.append(np.asarray(ptrs.data)[np.asarray(mask.data, dtype=bool)].astype(np.uint64).ravel())
        return original(self, ptrs, mask, other, *args)

    InterpreterBuilder.create_masked_load = traced
    try:
        yield seen
    finally:
        InterpreterBuilder.create_masked_load = original


def pages_touched(seen, buffer: torch.Tensor, rows_per_page: int = 1) -> set:
    """The pages (dim-0 index // rows_per_page) of ``buffer``'s storage that the traced loads hit."""
    if not seen:
        return set()
    addresses = np.concatenate(seen)
    base = buffer.untyped_storage().data_ptr()
    row_bytes = buffer.stride(0) * buffer.element_size()
    end = base + buffer.untyped_storage().nbytes()
    inside = addresses[(addresses >= base) & (addresses < end)]
    return set((((inside - base) // row_bytes) // rows_per_page).tolist())


def changed_rows(out: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Per output row: whether it differs from ``base`` (a NaN anywhere in it counts)."""
    flat, ref = out.reshape(out.shape[0], -1).float(), base.reshape(base.shape[0], -1).float()
    return (flat.isnan() | ((flat - ref).abs() > 1e-3 * (1 + ref.abs()))).any(-1)


@dataclass
class Tally:
    """Counts over all examples, for one kernel."""

    examples: int = 0
    dead: int = 0
    dead_changed: list = field(default_factory=list)  # false negatives (output)
    dead_loaded: list = field(default_factory=list)  # false negatives (dereference)
    live: Counter = field(default_factory=Counter)  # boundary -> live entries probed
    live_changed: Counter = field(default_factory=Counter)
    live_loaded: Counter = field(default_factory=Counter)
    live_total: Counter = field(default_factory=Counter)  # kind ("", "window, ", ...) -> live entries
    live_total_loaded: Counter = field(default_factory=Counter)

    def summary(self, name: str) -> str:
        parts = [f"{name}: {self.examples} examples, {self.dead} dead entries probed, false negatives: "
                 f"{len(self.dead_changed)} by output, {len(self.dead_loaded)} by dereference"]
        for kind in sorted(self.live_total):
            parts.append(f"{kind}live entries dereferenced: {self.live_total_loaded[kind]}/{self.live_total[kind]}")
        for where in sorted(self.live):
            parts.append(f"{where} live entry: changes the output {self.live_changed[where]}/{self.live[where]}, "
                         f"dereferenced {self.live_loaded[where]}/{self.live[where]}")
        return "; ".join(parts)
