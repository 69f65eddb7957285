"""What a finding looks like, and how findings are told to the user.

A rule returns :class:`Violation` objects that say *what* is wrong (check id, argument,
index, value, bound). The sanitizer adds *where* (the op and the caller's line) and hands
them to :class:`Reporter`, which logs each new (op, check, caller) once through loguru,
counts repeats, and prints a one-screen summary when the process exits.
"""

from __future__ import annotations

import atexit
import dataclasses
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

from loguru import logger

CHECKS = {
    "page-out-of-range": "error",
    "dead-page-out-of-range": "warning",
    "seq-len-exceeds-table": "error",
    "seq-len-exceeds-max": "error",
    "negative-seq-len": "error",
    "shape-mismatch": "error",
    "bad-dtype": "error",
    "bad-device": "error",
    "bad-layout": "error",
    "duplicate-page": "warning",
    "page-not-allocated": "error",
    "alloc-out-of-range": "error",
    "rule-unbound": "warning",
    "rule-error": "warning",
}
"""Every check id this sanitizer can report, with its default severity."""

MAX_EXAMPLES = 5


@dataclass(frozen=True)
class Violation:
    """One finding: which check failed, on which argument, where, and by how much.

    ``index`` is the exact position of the first offending entry: ``(row, col)`` in a 2D
    table, ``(row, kv, col)`` in a ``[B, 2, W]`` table, ``(row,)`` for a per-row length,
    ``None`` for a whole-argument check. ``count`` is how many entries offend and
    ``examples`` holds the first few as ``(index, value)`` pairs.
    """

    check: str
    arg: str
    message: str
    index: Optional[tuple] = None
    value: Any = None
    bound: Any = None
    count: int = 1
    examples: tuple = ()
    severity: str = ""
    op: str = ""
    caller: str = ""
    stack: tuple = ()

    def __post_init__(self):
        if self.check not in CHECKS:
            raise ValueError(f"unknown check id {self.check!r}; known: {sorted(CHECKS)}")
        if not self.severity:
            object.__setattr__(self, "severity", CHECKS[self.check])

    def replace(self, **changes) -> "Violation":
        return dataclasses.replace(self, **changes)

    def format(self, with_stack: bool = False) -> str:
        text = f"[{self.severity}] {self.check} in {self.op or '?'}: {self.message}"
        if self.count > 1:
            shown = ", ".join(f"{_index_text(self.arg, i)}={v}" for i, v in self.examples)
            text += f"\n    {self.count} offending entries; first: {shown}"
        if self.caller:
            text += f"\n    caller {self.caller}"
        if with_stack and self.stack:
            text += "\n    stack (most recent call last):\n" + "".join(
                f"      {line}\n" for line in self.stack
            ).rstrip("\n")
        return text

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["index"] = list(self.index) if self.index is not None else None
        out["examples"] = [[list(i), v] for i, v in self.examples]
        out["stack"] = list(self.stack)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Violation":
        data = dict(data)
        data["index"] = tuple(data["index"]) if data.get("index") is not None else None
        data["examples"] = tuple((tuple(i), v) for i, v in data.get("examples", ()))
        data["stack"] = tuple(data.get("stack", ()))
        return cls(**data)


def _index_text(arg: str, index) -> str:
    if index is None:
        return arg
    return f"{arg}[{', '.join(str(i) for i in index)}]"


class PageTableViolation(RuntimeError):
    """Raised in ``raise`` mode, in the caller, before the kernel runs."""

    def __init__(self, violations):
        self.violations = list(violations)
        first = self.violations[0]
        text = first.format(with_stack=False)
        if len(self.violations) > 1:
            others = ", ".join(sorted({v.check for v in self.violations[1:]}))
            text += f"\n    ({len(self.violations) - 1} more finding(s) in this call: {others})"
        super().__init__(text)


class Reporter:
    """Process-wide log of findings: first of each (op, check, caller) logged, all counted."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: Counter = Counter()
        self.first: dict = {}
        self._atexit_registered = False

    def report(self, violation: Violation) -> None:
        key = (violation.op, violation.check, violation.caller)
        with self._lock:
            self.counts[key] += 1
            new = key not in self.first
            if new:
                self.first[key] = violation
            if not self._atexit_registered:
                atexit.register(self.print_summary)
                self._atexit_registered = True
        if new:
            level = "ERROR" if violation.severity == "error" else "WARNING"
            logger.bind(tsan_paged=True).log(level, "tsan_paged: " + violation.format(with_stack=True))

    def summary(self) -> str:
        with self._lock:
            items = sorted(self.counts.items(), key=lambda kv: (self.first[kv[0]].severity != "error", -kv[1]))
        if not items:
            return ""
        errors = sum(n for k, n in items if self.first[k].severity == "error")
        warnings = sum(n for k, n in items if self.first[k].severity != "error")
        lines = [f"tsan_paged summary: {errors} error(s), {warnings} warning(s) in {len(items)} distinct finding(s)"]
        for key, n in items[:20]:
            v = self.first[key]
            lines.append(f"  {n:>7} x {v.severity:<7} {v.check:<24} {v.op}  at {v.caller or '?'}")
        if len(items) > 20:
            lines.append(f"  ... and {len(items) - 20} more")
        return "\n".join(lines)

    def print_summary(self) -> None:
        """Print the summary to the process's real stderr (at exit, loguru's sinks may be closed)."""
        text = self.summary()
        if text:
            try:
                sys.__stderr__.write(text + "\n")
                sys.__stderr__.flush()
            except (AttributeError, OSError, ValueError):
                pass

    def clear(self) -> None:
        with self._lock:
            self.counts.clear()
            self.first.clear()


reporter = Reporter()
"""The process's reporter; every sanitizer in the process reports through it."""

