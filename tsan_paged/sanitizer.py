"""PagedSanitizer: check paged-KV kernel calls before they run.

Turn it on around a block or a function::

    from tsan_paged import PagedSanitizer
    with PagedSanitizer(mode="raise"):
        flashinfer.decode.trtllm_batch_decode_with_kv_cache(...)

While active, every call to a target of a registered rule is caught (Python entry points by
:mod:`tsan_paged.interpose`, dispatcher ops by :mod:`tsan_paged.dispatch`), its arguments
are bound by name and checked by the rules, and findings are handled by mode:

- ``log``: report (loguru), then call the kernel unchanged;
- ``raise``: report, dump, raise :class:`PageTableViolation` in the caller; the kernel is
  not called;
- ``abort``: report, dump, flush, and end the process at once with ``os._exit(exit_code)``
  (default 86) - for servers whose loops swallow exceptions.

Only error-severity findings raise or abort; warnings are reported and the call goes on.
A rule that cannot bind (its target is missing, or the signature lost a name it reads) is
a ``rule-unbound`` warning, and so is a rule of yours (not a built-in one) whose target never
resolved while the sanitizer was active: reported at its exit, or at process exit for one
that never exits. A rule that raises is a ``rule-error`` warning. The sanitizer itself never
stops a program in ``log`` mode.

Findings are logged (loguru) and kept in :attr:`PagedSanitizer.reports`. The process summary
printed at exit and the per-process report files hold the findings of the sanitizers the user
turned on for the process (``TSAN_PAGED``, ``tsan-paged run``, the pytest plugin's session),
of sanitizers entered inside one, and of ``PagedSanitizer(summary=True)``; a block's own
sanitizer (a test that inspects its reports) does not add to them.

Patches are process-wide and reference-counted over all active sanitizers: nesting,
re-entering the same instance, exceptions in the block and exits on other threads leave
nothing behind once the last one exits. Calls are checked by the most recently entered
active sanitizer. Rules registered while a sanitizer is active apply from its next entry.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import os
import sys
import threading
import traceback
from collections import Counter
from typing import Optional

from loguru import logger

from . import config as config_mod
from .callsite import find_caller
from . import dump as dump_mod
from .dispatch import ModeCatcher, bind_schema, loaded_namespaces, op_interposer, resolve_overloads
from .interpose import Patched, interposer
from .registry import Call, CheckOptions, Registry, UnboundArgument, is_dispatcher_target, registry
from . import distributed, engine
from .access import Settings
from .report import PageTableViolation, Violation, reporter


_PATH_ORDER = (engine.SKIPPED, engine.CAPTURED, engine.DEVICE, engine.HOST)
_state_lock = threading.RLock()
_active: list = []  # entered sanitizers, most recent last
_serials = itertools.count(1)
_local = threading.local()  # .checking: a rule is running on this thread


class PagedSanitizer(contextlib.ContextDecorator):
    """Context manager and decorator that checks paged-KV kernel calls made while active.

    Args:
        mode: ``"log"``, ``"raise"`` or ``"abort"``; default from ``config``, else ``"log"``.
        config: a TOML path, a dict of config keys, or a :class:`tsan_paged.config.Config`.
        dump_dir: where dumps go (default ``./tsan_paged_dumps``).
        registry: the rules to use (default: built-in rules plus every ``@tsan_paged.rule``).
        summary: whether findings also go to the process summary printed at exit and to the
            per-process report files. Default: when entered inside a sanitizer that does, or when
            the config names a ``report_dir``; the process-wide sanitizers (``TSAN_PAGED``, the
            pytest plugin's session) do.

    Attributes:
        reports: every :class:`Violation` seen while active (up to ``max_reports``).
        checked: how many calls were checked, per ``(target, how)``: ``how`` is ``"host"`` (torch
            checks), ``"device"`` (a sync-free device launch), ``"captured"`` (a device launch
            captured into a CUDA graph: it checks at every replay) or ``"skipped"`` (a check that
            cannot run while a graph is captured; reported as ``rule-skipped-in-capture``).
    """

    def __init__(self, mode: Optional[str] = None, config=None, dump_dir: Optional[str] = None, *,
                 registry: Optional[Registry] = None, dump_on_log: Optional[bool] = None,
                 max_dumps: Optional[int] = None, exit_code: Optional[int] = None,
                 device_action: Optional[str] = None, track_pages: Optional[bool] = None,
                 summary: Optional[bool] = None):
        self.config = config_mod.load(config)
        overrides = {"mode": config_mod.check_mode(mode), "dump_dir": dump_dir, "dump_on_log": dump_on_log,
                     "max_dumps": max_dumps, "exit_code": exit_code, "device_action": device_action,
                     "track_pages": track_pages}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if overrides:
            self.config = config_mod.from_dict({**self.config.to_dict(), **overrides}, source=self.config.source)
        self.mode = self.config.mode
        self.registry = registry if registry is not None else _default_registry()
        if self.config.rule:  # the config's [[rule]] tables, on top of the registry's rules
            from .declarative import make_rule

            self.registry = self.registry.copy()
            for spec in self.config.rule:
                self.registry.add(make_rule(spec, source=self.config.source))
        self.options = CheckOptions(disabled=self.config.disabled_checks())
        self.settings = Settings(mode=self.mode, device_path=self.config.device_path,
                                 device_action=self.config.device_action, poll_s=self.config.device_poll_s,
                                 severity=self.config.severity, sink=self)
        self.reports: list = []
        self.checked: Counter = Counter()  # (target, how) -> calls checked: how is engine.HOST, DEVICE, ...
        self.dropped = 0
        self.suppressed = 0
        self._deferred_errors: list = []  # device findings read after their call (raise mode raises them)
        self.dumps: list = []
        self._depth = 0
        self._rules: dict = {}  # target -> rules that bind, fixed at entry
        self._mode_catcher: Optional[ModeCatcher] = None
        self._lock = threading.Lock()
        self.serial = next(_serials)  # unique for the process's life (id() is reused once freed)
        self._summary_arg = summary
        self.summary = bool(summary)  # decided at entry (see __init__'s doc)
        self._logged: set = set()  # (op, check, caller) logged, for a sanitizer outside the summary
        self._resolved: set = set()  # targets that resolved (or were reported unbound) while active

    # -- lifecycle --------------------------------------------------------------------
    def __enter__(self) -> "PagedSanitizer":
        with _state_lock:
            self._depth += 1
            if self._depth > 1:
                return self
            self._rules = {target: list(rules) for target, rules in self.registry.rules.items() if rules}
            self.summary = self._summary_arg if self._summary_arg is not None else (
                any(s.summary for s in _active) or bool(self.config.report_dir))
            if self.config.report_dir and self.summary:
                reporter.open_report_dir(self.config.report_dir, self.config.max_reports)
            self._resolved = set()
            if any(not r.builtin for rules in self._rules.values() for r in rules):
                reporter.at_finish(_report_unresolved_at_exit)  # for sanitizers that never exit
            _active.append(self)
            try:
                if self.config.track_pages:  # shadow SGLang's allocators (tsan_paged/tracking.py)
                    from . import tracking

                    tracking.start(self)
                interposer.install([t for t in self._rules if not is_dispatcher_target(t)])
                for target in self._rules:
                    patched = interposer.patched.get(target)
                    if patched is not None:
                        self._bind_rules(patched)
                dispatcher_targets = [t for t in self._rules if is_dispatcher_target(t)]
                if dispatcher_targets:
                    self._check_dispatcher_targets(dispatcher_targets)
                    op_interposer.install(dispatcher_targets)
                    if op_interposer.pending:  # a library imported later registers them
                        interposer.add_import_listener(op_interposer.retry_pending)
                    mode_only = [t for t in dispatcher_targets if t in op_interposer.mode_only]
                    if mode_only:
                        self._mode_catcher = ModeCatcher(mode_only, self._on_op_call)
                        self._mode_catcher.__enter__()
            except BaseException:
                self._leave()
                raise
        return self

    def __exit__(self, *exc_info) -> bool:
        with _state_lock:
            self._depth -= 1
            if self._depth == 0:
                self._leave()
        if self._depth == 0 and exc_info[0] is None:
            self._raise_deferred()
        return False

    def _leave(self) -> None:
        self._depth = 0
        try:
            self._report_unresolved()
        except Exception as exc:  # never the reason a program fails
            logger.warning(f"tsan_paged: could not list the rules whose targets never resolved: {exc}")
        if self._mode_catcher is not None:
            catcher, self._mode_catcher = self._mode_catcher, None
            try:
                catcher.__exit__(None, None, None)
            except Exception as exc:  # entered on another thread: its mode stack is not ours
                logger.warning(f"tsan_paged: could not pop the dispatch mode on this thread: {exc}")
        try:  # CUDA tables were checked on the device: read their records now
            engine.on_leave(self, last=all(s is self for s in _active))
        except Exception as exc:
            logger.warning(f"tsan_paged: could not read device check records: {exc}")
        if self.options.page_tracker is not None:
            from . import tracking

            tracking.stop(self)
        if self in _active:
            _active.remove(self)
        if _active:
            interposer.install([t for s in _active for t in s._rules if not is_dispatcher_target(t)])
        else:
            interposer.restore()
            op_interposer.restore()

    def flush(self) -> None:
        """Read the device check records now (a sync) and report what is new; in ``raise``
        mode, raise the deferred errors (CUDA graph replays) as :class:`PageTableViolation`."""
        engine.flush(self)
        self._raise_deferred()

    def report_found(self, violations, defer: bool = False) -> None:
        """Findings made outside a kernel call's rules (device records read later, allocator
        shadow): configured, recorded and acted on by mode. ``defer``: in ``raise`` mode,
        raise them at the next :meth:`flush` or at exit instead of now."""
        kept = self._configured(violations)
        self._record(kept)
        errors = [v for v in kept if v.severity == "error"]
        if errors and self.mode == "abort":
            _abort(errors, None, self.config.exit_code, tell_peers=self.config.abort_peers)
        if errors and self.mode == "raise":
            if not defer:
                raise PageTableViolation(errors)
            with self._lock:
                self._deferred_errors.extend(errors)

    def _raise_deferred(self) -> None:
        with self._lock:
            errors, self._deferred_errors = self._deferred_errors, []
        if errors:
            raise PageTableViolation(errors)

    @property
    def active(self) -> bool:
        return self._depth > 0

    @property
    def errors(self) -> list:
        return [v for v in self.reports if v.severity == "error"]

    # -- binding ----------------------------------------------------------------------
    def _bind_rules(self, patched: Patched) -> None:
        """Drop (and report) rules whose arguments the target's signature no longer has."""
        self._resolved.add(patched.target)
        bound = []
        for rule in self._rules.get(patched.target, []):
            missing = patched.binder.missing(rule.reads) if patched.binder else list(rule.reads)
            if missing:
                self._unbound(patched.target, f"rule {rule.name} reads {missing}, which "
                                              f"{patched.target} no longer takes (library drift?)")
            else:
                bound.append(rule)
        self._rules[patched.target] = bound

    def _check_dispatcher_targets(self, targets) -> None:
        """Report ops missing from a loaded library, and rules their schema no longer binds.

        An op whose whole namespace is not loaded (vLLM not imported) is simply pending,
        like a Python target whose module is not imported: it is caught once registered.
        """
        for target in targets:
            overloads = resolve_overloads(target)
            if overloads:
                self._resolved.add(target)
            else:
                if target.split("::")[0] in loaded_namespaces():
                    self._unbound(target, f"dispatcher op {target} is not registered, though its namespace "
                                          "is (library drift?); calls to it are caught once it is")
                continue
            schema = overloads[0]._schema
            names = {a.name for a in schema.arguments}
            bound = []
            for rule in self._rules[target]:
                missing = [n for n in rule.reads if n not in names]
                if missing:
                    self._unbound(target, f"rule {rule.name} reads {missing}, not in the schema {schema}")
                else:
                    bound.append(rule)
            self._rules[target] = bound

    def _unbound(self, target: str, message: str) -> None:
        self._resolved.add(target)  # reported once, not again as "never resolved" at exit
        self._record([Violation("rule-unbound", target, message, op=target)])

    def _report_unresolved(self, final: bool = False) -> None:
        """``rule-unbound`` for each of the user's rules (config ``[[rule]]`` tables, ``@rule``
        functions; not the built-in ones, whose libraries may simply not be in use) whose target
        never resolved while this sanitizer was active: a typo in a module or op name would
        otherwise pass silently forever. A target an enclosing active sanitizer also checks is
        left to it (the pytest plugin's per-test sanitizers), unless ``final`` (process exit)."""
        outer = set()
        if not final:
            for other in _active:
                if other is self:
                    break
                outer.update(other._rules)
        for target, rules in self._rules.items():
            mine = [r for r in rules if not r.builtin]
            if not mine or target in self._resolved or target in outer or _resolved_now(target):
                continue
            names = ", ".join(f"{r.name} ({r.source})" for r in mine)
            self._unbound(target, f"{target} never resolved while the sanitizer was active, so rule {names} "
                                  f"checked nothing: {_why_unresolved(target)}")

    # -- calls ------------------------------------------------------------------------
    def _on_python_call(self, patched: Patched, args: tuple, kwargs: dict):
        rules = self._rules.get(patched.target)
        if not rules:
            return patched.original(*args, **kwargs)
        arguments = _bound(patched, args, kwargs)
        if arguments is None:  # a malformed call: the library raises its own error
            return patched.original(*args, **kwargs)
        self._check_and_act(patched.target, rules, arguments, patched.library_dirs)
        return _call_checked(patched.original, *args, **kwargs)

    def _on_compiled_call(self, site, args: tuple, kwargs: dict) -> None:
        """A checked call in compiled code, at a run of its graph (:mod:`tsan_paged.compiled`):
        checked as an eager call is, its caller the line the graph was traced from."""
        rules = self._rules.get(site.target)
        patched = interposer.patched.get(site.target)
        arguments = _bound(patched, args, kwargs) if rules and patched is not None else None
        if arguments is None:
            return
        self._check_and_act(site.target, rules, arguments, patched.library_dirs, where=(site.caller, site.stack))

    def _on_compiled_call_not_checked(self, site) -> None:
        """A call compiled code makes that its graph could not hold a check for: said once per site."""
        if site.target not in self._rules:
            return
        self._count_checked(site.target, {engine.SKIPPED})
        key = (site.caller, site.target, "compiled")
        if key in self.settings.skipped:
            return
        self.settings.skipped.add(key)
        self._record(self._configured([Violation(
            "rule-skipped-in-capture", site.target,
            f"the call of {site.target} in torch.compile'd code is not checked: its arguments hold "
            f"{site.leaves[0]} objects, which an op of a compiled graph cannot take; call it outside the "
            "compiled region (torch.compiler.disable) to have it checked", op=site.target, caller=site.caller,
            stack=site.stack)]))

    def _on_op_call(self, target: str, op, args: tuple, kwargs: dict, call_original):
        rules = self._rules.get(target)
        if not rules or getattr(_local, "checking", False):
            return call_original()
        self._check_and_act(target, rules, bind_schema(op, args, kwargs), (_torch_dir(),))
        return _call_checked(call_original)

    def _check_and_act(self, target: str, rules, arguments: dict, library_dirs: tuple, where=None) -> None:
        # While a CUDA graph is being captured, Python's cyclic GC is paused for the check: a
        # collection our allocations set off could destroy a dead CUDAGraph, which is not
        # permitted during capture and would break the user's capture (SGLang's graph runner
        # freezes the GC around capture for the same reason).
        if self.mode == "abort" and self.config.abort_peers:
            distributed.watch(self.config.exit_code, _peer_aborted)  # once a torch.distributed job exists
        capture = engine.capturing()
        paused = capture and gc.isenabled()
        if paused:
            gc.disable()
        try:
            self._check_and_act_now(target, rules, arguments, library_dirs, capture, where)
        finally:
            if paused:
                gc.enable()

    def _check_and_act_now(self, target: str, rules, arguments: dict, library_dirs: tuple, capture: bool,
                           where=None) -> None:
        paths = set()
        violations = self._run_rules(target, rules, arguments, library_dirs, capture, paths)
        self._count_checked(target, paths)
        if not violations:
            return
        caller, stack = where or find_caller(library_dirs)
        violations = self._configured([v.replace(op=target, caller=caller, stack=stack) for v in violations])
        self._record(violations)
        errors = [v for v in violations if v.severity == "error"]
        if not errors:
            return
        dump_path = None
        if self.mode != "log" or self.config.dump_on_log:
            dump_path = self._dump(target, arguments, violations)
        if self.mode == "raise":
            exc = PageTableViolation(errors)
            exc.dump_path = dump_path
            raise exc
        if self.mode == "abort":
            _abort(errors, dump_path, self.config.exit_code, tell_peers=self.config.abort_peers)

    def _run_rules(self, target: str, rules, arguments: dict, library_dirs: tuple = (), capture: bool = False,
                   paths: Optional[set] = None) -> list:
        """The findings of ``rules`` on one call: each rule describes (and checks metadata), the
        engine checks the descriptions (on the device for CUDA tensors). ``capture``: the current
        CUDA stream is capturing a graph; ``paths`` gets how the descriptions were checked."""
        paths = set() if paths is None else paths
        found = []
        call = Call(target, arguments, self.options)
        _local.checking = True
        try:
            for rule in rules:
                # A rule of the user's may read values on the host: while a CUDA graph is being
                # captured, a sync is refused before it happens (the capture survives) and the
                # rule is skipped for this call site. Built-in rules only describe.
                guarded = capture and not rule.builtin
                try:
                    with engine.no_sync_while(guarded):
                        items = list(rule.check(call))
                    found.extend(engine.execute(items, call, self.settings, target, library_dirs, capture, paths))
                except UnboundArgument as exc:
                    found.append(Violation("rule-unbound", target, f"rule {rule.name} reads {exc.args[0]!r}, "
                                                                   f"which {target} does not take (library drift?)"))
                except Exception as exc:
                    if guarded and engine.sync_refusal(exc):
                        paths.add(engine.SKIPPED)
                        found += engine.skipped_rule(self.settings, target, library_dirs, rule.name, exc)
                        continue
                    found.append(Violation("rule-error", target, f"rule {rule.name} raised "
                                           f"{type(exc).__name__}: {exc}; the call was not checked\n"
                                           + "".join(traceback.format_exception(exc)[-3:]).rstrip()))
        finally:
            _local.checking = False
        return found

    def _count_checked(self, target: str, paths: set) -> None:
        """Count one checked call by how it was checked: skipped in a capture if any of its checks
        was, else captured into a CUDA graph, else on the device, else on the host."""
        how = next((p for p in _PATH_ORDER if p in paths), engine.HOST)
        key = (target, how)
        with self._lock:
            self.checked[key] += 1
        if self.summary:
            reporter.count_checked(key)

    def _configured(self, violations) -> list:
        """The findings the config keeps: per-check severities ("off" drops), then suppressions."""
        severity, kept = self.config.severity, []
        for v in violations:
            level = severity(v.check)
            if level == "off":
                continue
            if v.severity != level:
                v = v.replace(severity=level)
            if self.config.suppress and self.config.suppressed(v):
                self.suppressed += 1
                continue
            kept.append(v)
        return kept

    def _record(self, violations) -> None:
        for v in violations:
            if self.summary:  # logged, counted for the process summary, written to the report file
                reporter.report(v, dedup=self.config.dedup)
            else:  # logged only
                key = (v.op, v.check, v.caller)
                if key not in self._logged or not self.config.dedup:
                    self._logged.add(key)
                    reporter.log(v)
            with self._lock:
                if len(self.reports) < self.config.max_reports:
                    self.reports.append(v)
                else:
                    self.dropped += 1

    def _dump(self, target: str, arguments: dict, violations) -> Optional[str]:
        try:
            path = dump_mod.write(self.config.dump_dir, target, arguments, violations, self.config.max_dumps)
        except Exception as exc:  # a full disk must not hide the finding
            logger.error(f"tsan_paged: could not write a dump to {self.config.dump_dir}: {exc}")
            return None
        if path is not None:
            self.dumps.append(str(path))
            logger.bind(tsan_paged=True).error(f"tsan_paged: dumped the call to {path} "
                                               f"(explain it with: tsan-paged show {path})")
        return str(path) if path else None


def current() -> Optional[PagedSanitizer]:
    """The sanitizer that checks calls now: the most recently entered active one."""
    return _active[-1] if _active else None


def _bound(patched: Patched, args: tuple, kwargs: dict) -> Optional[dict]:
    """A Python call's arguments by parameter name, or ``None`` when the call does not fit the
    signature."""
    try:
        return patched.binder.bind(args, kwargs) if patched.binder else dict(enumerate(args), **kwargs)
    except TypeError:
        return None


def _call_checked(original, *args, **kwargs):
    """Run a checked kernel entry point. Targets it calls itself on this thread (FlashInfer's
    ``trtllm_batch_decode_with_kv_cache`` -> ``xqa_batch_decode_with_kv_cache`` -> ``xqa``)
    are not checked again: the call the program made was checked at its entry."""
    outer = getattr(_local, "in_checked_call", False)
    _local.in_checked_call = True
    try:
        return original(*args, **kwargs)
    finally:
        _local.in_checked_call = outer


def _passes_through() -> bool:
    """On this thread, a rule is running or a checked kernel entry point is."""
    return getattr(_local, "checking", False) or getattr(_local, "in_checked_call", False)


def _dispatch_python_call(patched: Patched, args: tuple, kwargs: dict):
    sanitizer = _active[-1] if _active else None
    if sanitizer is None or _passes_through():
        return patched.original(*args, **kwargs)
    return sanitizer._on_python_call(patched, args, kwargs)


def _resolved_now(target: str) -> bool:
    if is_dispatcher_target(target):
        return resolve_overloads(target) is not None
    return target in interposer.patched


def _why_unresolved(target: str) -> str:
    """Why a target did not resolve: a module never imported (or not installed), an op never
    registered."""
    from importlib.util import find_spec

    if is_dispatcher_target(target):
        namespace = target.split("::")[0]
        if namespace in loaded_namespaces():
            return f"namespace {namespace!r} has ops, but not this one (a typo? library drift?)"
        return f"no op of namespace {namespace!r} was ever registered (its library never loaded, or a typo)"
    module = target.partition(":")[0]
    top = module.partition(".")[0]
    try:
        installed = find_spec(top) is not None  # a top-level name: finds, imports nothing
    except (ImportError, ValueError):
        installed = False
    if not installed:
        return f"no module {top!r} is installed (a typo?)"
    return f"module {module!r} was never imported in this process (a typo? not on the code path?)"


def _report_unresolved_at_exit() -> None:
    """At process exit (before the summary): sanitizers still active, outermost last."""
    for sanitizer in reversed(list(_active)):
        try:
            sanitizer._report_unresolved(final=sanitizer is _active[0])
        except Exception:
            pass


def _report_resolve_error(target: str, message: str) -> None:
    for sanitizer in list(_active):
        if target in sanitizer._rules:
            sanitizer._unbound(target, message)


def _target_patched(patched: Patched) -> None:
    for sanitizer in list(_active):
        if patched.target in sanitizer._rules:
            sanitizer._bind_rules(patched)


def _dispatch_op_call(target: str, op, args: tuple, kwargs: dict, call_original):
    sanitizer = _active[-1] if _active else None
    if sanitizer is None or _passes_through():
        return call_original()
    return sanitizer._on_op_call(target, op, args, kwargs, call_original)


interposer.on_call = _dispatch_python_call
op_interposer.on_call = _dispatch_op_call
interposer.on_resolve_error = _report_resolve_error
interposer.on_patched = _target_patched


def _abort(errors, dump_path, exit_code: int, tell_peers: bool = False) -> None:
    rank = distributed.rank()
    logger.bind(tsan_paged=True).critical(
        f"tsan_paged: aborting{'' if rank is None else f' rank {rank}'} (mode=abort, exit status {exit_code}) on "
        f"{errors[0].check} in {errors[0].op}" + (f"; dump {dump_path}" if dump_path else ""))
    _end(exit_code, lambda: tell_peers and distributed.announce(f"{errors[0].check} in {errors[0].op}"))


def _peer_aborted(message: str, own) -> None:
    """The watcher thread saw another rank of this job abort (tsan_paged/distributed.py)."""
    logger.bind(tsan_paged=True).critical(f"tsan_paged: ending rank {own}: {message}")
    _end(None, lambda: None)


def _end(exit_code, before_exit) -> None:
    """Write what the reporter holds, flush, run ``before_exit``, and (with an exit code) exit now."""
    reporter.finish()
    try:
        logger.complete()
        before_exit()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        if exit_code is not None:
            os._exit(exit_code)


@functools.lru_cache(maxsize=None)
def _torch_dir() -> str:
    import torch

    return os.path.dirname(os.path.abspath(torch.__file__))


def _default_registry() -> Registry:
    from . import rules  # noqa: F401  (registers the built-in rules)

    return registry
