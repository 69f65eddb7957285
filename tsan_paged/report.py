"""What a finding looks like, and how findings are told to the user.

A rule returns :class:`Violation` objects that say *what* is wrong (check id, argument,
index, value, bound). The sanitizer adds *where* (the op and the caller's line) and hands
them to :class:`Reporter`, which logs each new (op, check, caller) once through loguru,
counts repeats, and prints a one-screen summary when the process exits.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

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
    "rule-skipped-in-capture": "warning",
    "unsupported-form": "warning",
    "device-records-corrupted": "error",
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


CHECKED_FLUSH_S = 2.0
"""How often (seconds), at most, a process's checked-call counts are written to its report file
while they keep changing, so that a process killed without running its exit handlers (a server's
workers are often SIGKILLed by their parent) still leaves them."""

CHECKED_IDLE_S = 0.2
"""Once the counts stop changing (a server between requests, a worker about to be killed), they
are written within this many seconds: a process killed while idle leaves its exact counts; one
killed while busy loses at most the last :data:`CHECKED_FLUSH_S` seconds of them."""


class Reporter:
    """Process-wide log of findings, and the count of checked calls.

    The first finding of each (op, check, caller) is logged through loguru (every finding
    when ``dedup`` is off). At exit a summary of the findings and of the calls checked per
    target is printed to stderr (when there is either).

    With a report directory, each sanitized process writes JSON lines to
    ``<dir>/tsan_paged[.rank<R>].<pid>.jsonl`` (a new file per process, never overwritten): a
    ``start`` record (pid, rank, command line) when the process is sanitized, each new finding
    (at most ``max_lines``), its ``checked`` counts when they change (every
    :data:`CHECKED_FLUSH_S` seconds while they keep changing, within :data:`CHECKED_IDLE_S` once
    they stop), and a ``summary`` record with both counts at exit. So a clean run still says
    which processes were sanitized and what each checked. A forked child starts afresh.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.counts: Counter = Counter()
        self.first: dict = {}
        self.checked: Counter = Counter()  # (op, how) -> calls checked (sanitizer.PagedSanitizer.checked)
        self.report_dir: Optional[str] = None
        self.report_path: Optional[Path] = None
        self.max_lines = 10000
        self._lines = 0
        self._atexit_registered = False
        self._finished = None  # pid whose summary was written
        self._at_finish: list = []  # callbacks run before the summary
        self._flusher: Optional[threading.Thread] = None
        self._flushed_total = 0  # sum of the checked counts last written

    def open_report_dir(self, directory: str, max_lines: int = 10000) -> None:
        """Write this process's records under ``directory`` (first call in a process wins); the
        file is created now, with the ``start`` record."""
        with self._lock:
            self._after_fork()
            if self.report_dir is None:
                self.report_dir, self.max_lines = str(directory), max_lines
            self._report_file()
            self._register_atexit()

    def _report_file(self) -> Path:
        """This process's file under ``report_dir``, created on first use (after a fork too) with
        its ``start`` record."""
        if self.report_path is None:
            Path(self.report_dir).mkdir(parents=True, exist_ok=True)
            rank = _rank()
            stem = f"tsan_paged.{f'rank{rank}.' if rank else ''}{os.getpid()}"
            for n in range(1000):
                path = Path(self.report_dir) / (f"{stem}.jsonl" if n == 0 else f"{stem}.{n}.jsonl")
                try:
                    with open(path, "x", encoding="utf-8"):
                        break
                except FileExistsError:
                    continue
            self.report_path = path
            self._append({"type": "start", **self._origin(), "argv": _command_line()})
        return self.report_path

    def count_checked(self, key: tuple) -> None:
        """One more call checked: ``key`` is ``(op, how)``."""
        with self._lock:
            self.checked[key] += 1
            if not self._atexit_registered:  # the exit summary says what a clean run checked
                self._register_atexit()
            if self._flusher is None and self.report_dir is not None:  # the first count of this process
                self._flusher = threading.Thread(target=self._flush_checked_loop, name="tsan_paged-report",
                                                 daemon=True)
                self._flusher.start()

    def _flush_checked_loop(self) -> None:
        """Write the counts when they change: at once when they stop changing, else every
        :data:`CHECKED_FLUSH_S` seconds."""
        pid = os.getpid()
        seen, written_at = 0, time.monotonic()
        while os.getpid() == pid and self._finished != pid:
            time.sleep(CHECKED_IDLE_S)
            with self._lock:
                total = sum(self.checked.values())
                busy, seen = total != seen, total
                if total == self._flushed_total or self._finished == pid or self.report_dir is None:
                    continue
                if busy and time.monotonic() - written_at < CHECKED_FLUSH_S:
                    continue
                self._flushed_total, written_at = total, time.monotonic()
                self._report_file()
                self._append({"type": "checked", **self._origin(), "title": _process_title(),
                              "checked": _checked_rows(self.checked)})

    def report(self, violation: Violation, dedup: bool = True) -> None:
        key = (violation.op, violation.check, violation.caller)
        with self._lock:
            self._after_fork()
            self.counts[key] += 1
            new = key not in self.first
            if new:
                self.first[key] = violation
            self._register_atexit()
            tell = new or not dedup
            if tell and self.report_dir is not None and self._lines < self.max_lines:
                self._lines += 1
                self._report_file()
                self._append({"type": "violation", **self._origin(), **violation.to_dict()})
        if tell:
            self.log(violation)

    @staticmethod
    def log(violation: Violation) -> None:
        """Log one finding through loguru (filter on ``extra["tsan_paged"]``)."""
        from loguru import logger  # imported on first report: start-up stays light

        level = "ERROR" if violation.severity == "error" else "WARNING"
        logger.bind(tsan_paged=True).log(level, "tsan_paged: " + violation.format(with_stack=True))

    def at_finish(self, callback) -> None:
        """Run ``callback()`` at exit, before the summary is written."""
        with self._lock:
            if callback not in self._at_finish:
                self._at_finish.append(callback)
            self._register_atexit()

    def summary(self) -> str:
        with self._lock:
            items = [(self.first[k], n) for k, n in self.counts.items()]
            checked = Counter(self.checked)
        return format_summary(items, checked=checked)

    def finish(self) -> None:
        """At exit (or before an abort): the summary to stderr and to the report file."""
        if os.getpid() == self._pid and self._finished != self._pid:
            for callback in list(self._at_finish):
                try:
                    callback()
                except Exception:
                    pass
        with self._lock:
            if os.getpid() != self._pid or self._finished == self._pid:
                return
            self._finished = self._pid
            if self.report_dir is not None:
                self._report_file()
                self._append({"type": "summary", **self._origin(),
                              "counts": [[*key, self.first[key].severity, n] for key, n in self.counts.items()],
                              "title": _process_title(), "checked": _checked_rows(self.checked)})
        text = self.summary()
        if text:
            try:  # at exit, loguru's sinks (or pytest's capture) may be closed: use the real stderr
                sys.__stderr__.write(text + "\n")
                sys.__stderr__.flush()
            except (AttributeError, OSError, ValueError):
                pass

    def clear(self) -> None:
        with self._lock:
            self.counts.clear()
            self.first.clear()
            self.checked.clear()

    def _append(self, record: dict) -> None:
        try:
            with open(self.report_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, default=str) + "\n")
        except OSError:
            pass  # a full disk must not stop the program; the log still has the finding

    def _origin(self) -> dict:
        return {"pid": os.getpid(), "rank": _rank()}

    def _after_fork(self) -> None:
        if os.getpid() != self._pid:  # a forked child: its own counts and (on first use) its own file
            self._pid = os.getpid()
            self.counts.clear()
            self.first.clear()
            self.checked.clear()
            self.report_path, self._lines = None, 0
            self._atexit_registered = False
            self._flusher, self._flushed_total = None, 0

    def _register_atexit(self) -> None:
        if not self._atexit_registered:
            atexit.register(self.finish)
            if "multiprocessing" in sys.modules:
                # fork/forkserver children end in os._exit after multiprocessing's finalizers,
                # and clear them when they start: re-register in every child.
                import multiprocessing.util as mp_util

                mp_util.Finalize(None, self.finish, exitpriority=-100)
                mp_util.register_after_fork(self, _finalize_in_child)
            self._atexit_registered = True


def _finalize_in_child(reporter: Reporter) -> None:
    import multiprocessing.util as mp_util

    mp_util.Finalize(None, reporter.finish, exitpriority=-100)


def format_summary(items, title: str = "tsan_paged summary", checked: Optional[Counter] = None) -> str:
    """One screen: ``items`` is ``[(first Violation, count)]``, ``checked`` the calls checked per
    ``(op, how)``; empty when there is neither."""
    if not items and not checked:
        return ""
    items = sorted(items, key=lambda item: (item[0].severity != "error", -item[1]))
    errors = sum(n for v, n in items if v.severity == "error")
    warnings = sum(n for v, n in items if v.severity != "error")
    lines = [f"{title}: {errors} error(s), {warnings} warning(s) in {len(items)} distinct finding(s)"
             + ("" if checked is None else f"; {sum(checked.values()):,} call(s) checked")]
    for v, n in items[:20]:
        lines.append(f"  {n:>7} x {v.severity:<7} {v.check:<24} {v.op}  at {v.caller or '?'}")
    if len(items) > 20:
        lines.append(f"  ... and {len(items) - 20} more")
    if checked:
        lines.append(format_checked(checked))
    return "\n".join(lines)


HOW = {"host": "on the host", "device": "on the device", "captured": "captured in CUDA graphs (checked at each replay)",
       "skipped": "skipped in CUDA graph capture"}


def format_checked(checked: Counter, indent: str = "  ") -> str:
    """The calls checked, per target, most first: ``checked`` maps ``(op, how)`` to a count."""
    per_op: dict = {}
    for (op, how), n in checked.items():
        per_op.setdefault(op, Counter())[how] += n
    rows = sorted(per_op.items(), key=lambda item: (-sum(item[1].values()), item[0]))
    width = max(len(op) for op, _ in rows)
    lines = [f"{indent}checked calls per target:"]
    for op, hows in rows:
        detail = ", ".join(f"{n:,} {HOW.get(how, how)}" for how, n in sorted(hows.items(), key=lambda i: -i[1]))
        lines.append(f"{indent}  {op:<{width}}  {sum(hows.values()):>9,}  ({detail})")
    return "\n".join(lines)


def _checked_rows(checked: Counter) -> list:
    return [[op, how, n] for (op, how), n in checked.items()]


def _rank():
    return os.environ.get("RANK") or os.environ.get("LOCAL_RANK")


def _process_title() -> str:
    """The process's command line as ``ps`` shows it now: a server's worker may have retitled itself
    (``setproctitle``: SGLang's ``sglang::scheduler``); its Python ``argv`` is the spawner's."""
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return ""


def _command_line() -> list:
    """This process's command line, as far as it can be told (a spawned worker's is Python's own)."""
    argv = list(getattr(sys, "orig_argv", None) or sys.argv)
    return [a if len(a) <= 200 else a[:200] + "..." for a in argv[:24]]


def merge_report_dir(directory) -> tuple:
    """Merge every process's JSON lines under ``directory``: ``(text, error count)``.

    The text opens with one line that says how many processes were sanitized, how many calls
    they checked and how many findings they made, then the calls checked per target, one line
    per process, and the merged findings with their first report each."""
    files = sorted(Path(directory).glob("tsan_paged.*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{directory}: no tsan_paged.*.jsonl report files")
    merged: dict = {}  # key -> [first Violation, count, processes]
    checked_all: Counter = Counter()
    processes = []
    for path in files:
        firsts, counts, checked = {}, None, Counter()
        origin, argv, ended = {}, None, False
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a killed process
            origin = {"pid": record.get("pid"), "rank": record.get("rank")}
            kind = record.get("type")
            if record.get("title"):  # the process's title as it set it since (SGLang's "sglang::scheduler")
                argv = [record["title"]]
            if kind == "start":
                argv = record.get("argv")
            elif kind == "violation":
                data = {k: v for k, v in record.items() if k not in ("type", "pid", "rank")}
                v = Violation.from_dict(data)
                firsts.setdefault((v.op, v.check, v.caller), v)
            elif kind in ("checked", "summary"):
                checked = Counter({(op, how): n for op, how, n in record.get("checked", [])})
                if kind == "summary":
                    counts, ended = {tuple(c[:3]): c[4] for c in record["counts"]}, True
        if counts is None:  # no summary: the process died first; count what it wrote
            counts = {key: 1 for key in firsts}
        for key, n in counts.items():
            if key in firsts or key in merged:
                entry = merged.setdefault(key, [firsts.get(key), 0, 0])
                entry[0] = entry[0] or firsts.get(key)
                entry[1] += n
                entry[2] += 1
        checked_all.update(checked)
        errors = sum(n for key, n in counts.items() if key in firsts and firsts[key].severity == "error")
        command = " ".join(a.replace("\n", "\\n") for a in argv)[:120] if argv else "?"
        processes.append(f"  pid {origin.get('pid')}, rank {origin.get('rank') or '-'}, {sum(counts.values())} "
                         f"finding(s), {errors} error(s), {sum(checked.values()):,} call(s) checked"
                         f"{'' if ended else ' (no exit summary: counts as last written)'}: {command}  [{path.name}]")
    items = [(v, n) for v, n, _ in merged.values() if v is not None]
    errors = sum(n for v, n in items if v.severity == "error")
    headline = (f"{len(files)} process(es) sanitized; {sum(checked_all.values()):,} call(s) checked; "
                f"{sum(n for _, n in items)} finding(s), {errors} error(s)  (reports: {directory})")
    lines = [headline]
    if checked_all:
        lines.append(format_checked(checked_all))
    else:
        lines.append("  no call of a checked target was made: no rule's kernel ran in these processes")
    lines += ["  processes:"] + ["  " + p for p in processes]
    if items:
        lines += ["", format_summary(items, "merged"), ""]
        lines += [v.format(with_stack=True) for v, _ in sorted(items, key=lambda i: i[0].severity != "error")]
    return "\n".join(lines), errors


reporter = Reporter()
"""The process's reporter; every sanitizer in the process reports through it."""


def _in_forked_child() -> None:
    """A fork copies the parent's counts, its file and its lock (perhaps held by a thread the child
    does not have): the child starts afresh, and writes its own file from its first record."""
    reporter._lock = threading.Lock()
    reporter._after_fork()


os.register_at_fork(after_in_child=_in_forked_child)
