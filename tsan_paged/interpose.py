"""The Python-callable catcher: wrap a kernel entry point wherever it is bound.

Most paged kernels (FlashInfer 0.7 through TVM-FFI, pybind modules) never reach the
PyTorch dispatcher, so they are caught at their Python entry point. A target
``"pkg.mod:fn"`` is replaced by a wrapper

- in its defining module (so ``pkg.mod.fn(...)`` and the module's own global lookups see it),
- in every already-imported module whose namespace holds the same object under any name
  (package re-exports, ``from pkg.mod import fn as k`` in a serving backend, a test's
  module global),
- in modules imported later while active: an import hook patches a target module when it
  is first imported and rebinds names in every module imported afterwards.

A method target ``"pkg.mod:Cls.meth"`` is also wrapped under the class's aliases of it, in
the class and its subclasses: another name for the same function (FlashInfer's
``begin_forward = plan``) and a ``functools.partialmethod`` of it (``run_return_lse``).

Everything is put back exactly on :meth:`Interposer.restore`: a name is restored only if it
still holds what we put there (a name the program rebound meanwhile is left alone). Bindings
this cannot see: references captured before the sanitizer started in closures, other classes'
attributes, ``functools.partial`` objects and containers.

Entry is incremental: the module sweep is done once per process and target, then only over
modules imported since (new modules are appended to ``sys.modules``, so they are found from
its end), and the names found are remembered and re-wrapped directly at the next entry. A
decorated function entered on every call pays microseconds, not a sweep of thousands of
modules. Two consequences: a module-level name an already-swept module binds to a target
*after* its import (not by importing) is not seen; and the packages a kernel library itself
imports (the standard library, torch, numpy, triton, ...: ``FOUNDATION``) are not swept,
since they cannot hold a library's entry point unless it is theirs.
"""

from __future__ import annotations

import functools
import os
import importlib._bootstrap
import importlib.abc
import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

from .registry import SignatureBinder, parse_target

FOUNDATION = frozenset(sys.stdlib_module_names) | {
    "torch", "torchgen", "functorch", "numpy", "triton", "sympy", "mpmath", "networkx", "jinja2", "markupsafe",
    "typing_extensions", "filelock", "fsspec", "packaging", "loguru", "tsan_paged", "_pytest", "pytest", "pluggy",
    "hypothesis"}
"""Top-level packages whose modules are not swept (unless a target is theirs): what kernel
libraries are built on, which never bind a kernel library's entry point."""


@dataclass
class Patched:
    """One wrapped target: the original, its wrapper, its binder and where it was put."""

    target: str
    original: Callable
    wrapper: Callable = None
    binder: Optional[SignatureBinder] = None
    library_dirs: tuple = ()
    sites: list = field(default_factory=list)  # [(namespace dict or object, name)] now holding wrapper
    aliases: list = field(default_factory=list)  # [(class, name, old value, new value)]: class aliases


class Interposer:
    """Process-wide: the set of wrapped targets and the import hook that keeps it complete."""

    def __init__(self):
        self.lock = threading.RLock()
        self.patched: dict = {}  # target -> Patched
        self.pending: set = set()  # targets whose module is not imported yet
        self._by_id: dict = {}  # id(original) -> Patched
        # Kept across activations (see the module docstring):
        self._swept: dict = {}  # module name -> weakref(module): swept (or skipped) for every covered original
        self._modules_seen: tuple = (0, None, None)  # sys.modules' size, last key and module at the last sweep
        self._covered: set = set()  # id(original): every module in _swept was swept for it
        self._known_sites: dict = {}  # id(original) -> (original, [(namespace, name)]) found in earlier activations
        self._resolved: dict = {}  # target -> (original, binder, library_dirs) of its last patch
        self._unfinished: dict = {}  # name -> module still executing when swept: swept again at each entry
        self._watcher: Optional[ImportWatcher] = None
        self.on_call: Callable = None  # (Patched, args, kwargs) -> result
        self.on_resolve_error: Callable = None  # (target, message) -> None
        self.on_patched: Callable = None  # (Patched) -> None, for targets patched on import
        self.import_listeners: list = []  # more callbacks (module) -> None while watching

    # -- public -----------------------------------------------------------------------
    def install(self, targets) -> None:
        """Wrap every target in ``targets`` not wrapped yet; watch imports for the rest."""
        with self.lock:
            new = [t for t in targets if t not in self.patched and t not in self.pending]
            for target in new:
                self._try_patch(target)
            fresh = {id(p.original): p for p in self.patched.values() if id(p.original) not in self._covered}
            if fresh and self._swept:  # never swept for: the modules swept before (at the first entry, none)
                self._sweep_modules(self._swept_modules(), fresh)
            self._sweep_modules(self._new_modules())  # imported since the last sweep (first entry: all)
            self._covered = {id(p.original) for p in self.patched.values()}
            if self.patched or self.pending:  # modules imported later: the import hook
                self._watch_imports()

    def restore(self) -> None:
        """Put every original back where a wrapper was put; stop watching imports."""
        with self.lock:
            if self._watcher is not None:
                try:
                    sys.meta_path.remove(self._watcher)
                except ValueError:
                    pass
                self._watcher = None
            for patched in self.patched.values():
                for namespace, name in patched.sites:
                    if isinstance(namespace, dict):
                        if namespace.get(name) is patched.wrapper:
                            namespace[name] = patched.original
                    elif getattr(namespace, name, None) is patched.wrapper:
                        setattr(namespace, name, patched.original)
                for cls, name, old, new in patched.aliases:
                    if cls.__dict__.get(name) is new:
                        setattr(cls, name, old)
                self._known_sites[id(patched.original)] = (patched.original, list(patched.sites))
            self.patched.clear()
            self.pending.clear()
            self._by_id.clear()
            self.import_listeners.clear()

    # -- patching ---------------------------------------------------------------------
    def _try_patch(self, target: str) -> None:
        module_name, attr_path = parse_target(target)
        module = sys.modules.get(module_name)
        if module is None:
            self.pending.add(target)
            return
        self.pending.discard(target)
        owner, name = module, attr_path
        try:
            *parents, name = attr_path.split(".")
            for part in parents:
                owner = getattr(owner, part)
            original = getattr(owner, name)
        except AttributeError:
            self._resolve_error(target, f"{module_name} has no attribute {attr_path!r} "
                                        f"({_version_of(module_name)}): the rule cannot bind")
            return
        if not callable(original):
            self._resolve_error(target, f"{target} is a {type(original).__name__}, not a callable")
            return
        resolved = self._resolved.get(target)
        if resolved is None or resolved[0] is not original:
            try:
                binder = SignatureBinder(original)
            except (TypeError, ValueError):
                binder = None  # no introspectable signature: rules see positional args only
            resolved = self._resolved[target] = (original, binder, _library_dirs(module_name, private=name.startswith("_")))
        patched = Patched(target, original, binder=resolved[1], library_dirs=resolved[2])
        patched.wrapper = self._make_wrapper(patched)
        self.patched[target] = patched
        self._by_id[id(original)] = patched
        self._by_id[id(patched.wrapper)] = patched
        namespace = getattr(owner, "__dict__", None)
        if isinstance(namespace, dict) and namespace.get(name) is original:
            namespace[name] = patched.wrapper
            patched.sites.append((namespace, name))
        else:  # e.g. a class attribute bound through a descriptor
            setattr(owner, name, patched.wrapper)
            patched.sites.append((owner, name))
        known = self._known_sites.get(id(original))
        if known is not None and known[0] is original:  # names found by earlier sweeps
            for site in known[1]:
                if site not in patched.sites:
                    self._wrap_site(patched, *site)
        if isinstance(owner, type):
            self._wrap_class_aliases(owner, patched)
        if self.on_patched is not None:
            self.on_patched(patched)

    @staticmethod
    def _wrap_class_aliases(cls: type, patched: Patched) -> None:
        """Other names for the wrapped method in ``cls`` and its subclasses: the same function
        (``begin_forward = plan``) or a ``partialmethod`` of it (``run_return_lse``)."""
        classes, seen = [cls], set()
        while classes:
            klass = classes.pop()
            if klass in seen:
                continue
            seen.add(klass)
            classes.extend(klass.__subclasses__())
            for name, value in list(vars(klass).items()):
                if value is patched.original:
                    new = patched.wrapper
                elif isinstance(value, functools.partialmethod) and value.func is patched.original:
                    new = functools.partialmethod(patched.wrapper, *value.args, **value.keywords)
                else:
                    continue
                setattr(klass, name, new)
                patched.aliases.append((klass, name, value, new))

    def _make_wrapper(self, patched: Patched):
        on_call = self.on_call
        compiling = _is_compiling()

        @functools.wraps(patched.original)
        def tsan_paged_wrapper(*args, **kwargs):
            if compiling():  # dynamo is tracing the call: the check goes into the graph (compiled.py)
                _compiled_check()(patched.target, args, kwargs)
                return patched.original(*args, **kwargs)
            return on_call(patched, args, kwargs)

        tsan_paged_wrapper.__tsan_paged_original__ = patched.original
        return tsan_paged_wrapper

    @staticmethod
    def _wrap_site(patched: Patched, namespace, name: str) -> None:
        """Put the wrapper at ``namespace[name]`` if it holds the original (or record it if it
        already holds the wrapper), so that restore puts the original back there."""
        if isinstance(namespace, dict):
            value = namespace.get(name)
            if value is patched.original:
                namespace[name] = patched.wrapper
        else:
            value = getattr(namespace, name, None)
            if value is patched.original:
                setattr(namespace, name, patched.wrapper)
        if value is patched.original or value is patched.wrapper:
            patched.sites.append((namespace, name))

    def _sweep_modules(self, modules, by_id: Optional[dict] = None) -> None:
        """Rebind every module-level name that holds an original (of ``by_id``, default: every
        patched target) to its wrapper; names already holding a wrapper (bound from a patched
        module while active) are recorded too, so that restore puts the original back there."""
        by_id = self._by_id if by_id is None else by_id
        if not by_id:
            return
        ids = by_id.keys()
        for module in modules:
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict) or ids.isdisjoint(map(id, namespace.values())):
                continue  # the common case, in C: no name of this module holds a target
            for name, value in list(namespace.items()):
                patched = by_id.get(id(value))
                if patched is not None and (namespace, name) not in patched.sites:
                    self._wrap_site(patched, namespace, name)

    def _new_modules(self) -> list:
        """Modules imported since the last call (all of them the first time), to sweep; those of
        ``FOUNDATION`` packages (not targets' own) are recorded but not returned."""
        modules = sys.modules
        # Modules that were still executing at an earlier sweep may have bound names since.
        new = [m for m in self._unfinished.values() if m is not None]
        self._unfinished = {n: m for n, m in self._unfinished.items() if _initializing(n, m)}
        # Any import appends to sys.modules: if its size and its last module are the same objects
        # as at the last sweep, nothing was imported since (a module removed and imported anew
        # comes back last, as another object).
        count, last = len(modules), next(reversed(modules), None)
        seen_count, seen_last, seen_module = self._modules_seen
        if count == seen_count and last == seen_last and _same(seen_module, modules.get(last)):
            return new
        own = {parse_target(p.target)[0].partition(".")[0] for p in self.patched.values()}
        swept = self._swept
        for name, module in reversed(list(modules.items())):  # new modules are appended to sys.modules
            if _same(swept.get(name), module):
                break
            swept[name] = _ref(module)
            top = name.partition(".")[0]
            if top not in FOUNDATION or top in own:
                new.append(module)
                if _initializing(name, module):
                    self._unfinished[name] = module
        self._modules_seen = (count, last, _ref(modules.get(last)))
        return new

    def _swept_modules(self) -> list:
        """The modules swept before, as ``sys.modules`` holds them now (``FOUNDATION`` left out)."""
        swept = self._swept
        return [m for name, m in list(sys.modules.items())
                if _same(swept.get(name), m) and name.partition(".")[0] not in FOUNDATION]

    def _resolve_error(self, target: str, message: str) -> None:
        if self.on_resolve_error is not None:
            self.on_resolve_error(target, message)

    # -- imports ----------------------------------------------------------------------
    def add_import_listener(self, listener: Callable) -> None:
        """Also call ``listener(module)`` after each import, until :meth:`restore`."""
        with self.lock:
            if listener not in self.import_listeners:
                self.import_listeners.append(listener)
            self._watch_imports()

    def _watch_imports(self) -> None:
        if self._watcher is None:
            self._watcher = ImportWatcher(self._module_imported)
            sys.meta_path.insert(0, self._watcher)

    def _module_imported(self, module) -> None:
        with self.lock:
            if self._watcher is None:
                return
            name = module.__name__
            for target in [t for t in self.pending if parse_target(t)[0] == name]:
                self._try_patch(target)
                patched = self.patched.get(target)
                if patched is not None:  # re-exports made while the package imported
                    self._sweep_modules([m for m in list(sys.modules.values())
                                         if getattr(m, "__name__", "").startswith(name.split(".")[0])],
                                        {id(patched.original): patched})
                    self._covered.add(id(patched.original))  # older modules could not import it
            self._sweep_modules([module])
            self._swept[name] = _ref(module)
            for listener in list(self.import_listeners):
                listener(module)


class ImportWatcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself; tells the interposer when a module finished executing."""

    def __init__(self, callback):
        self.callback = callback
        self._busy = threading.local()

    def find_spec(self, fullname, path, target=None):
        if getattr(self._busy, "active", False):
            return None
        self._busy.active = True
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy.active = False
        loader = spec.loader
        if loader is not None and hasattr(loader, "exec_module") and not isinstance(loader, type):
            spec.loader = _NotifyingLoader(loader, self.callback)
        return spec


class _NotifyingLoader(importlib.abc.Loader):
    """Delegates to the real loader, then reports the executed module."""

    def __init__(self, loader, callback):
        self._loader = loader
        self._callback = callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._callback(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def _ref(module):
    """A weak reference to ``module`` (an id could be reused by a module imported anew under the
    same name, which would then pass for swept), or the object where it takes none."""
    try:
        return weakref.ref(module)
    except TypeError:
        return module


def _same(ref, module) -> bool:
    return ref is not None and (ref is module or (isinstance(ref, weakref.ref) and ref() is module))


def _initializing(name: str, module) -> bool:
    """Whether ``module`` is still executing its body: importlib holds a lock per module being
    imported (its spec's flag is the slower fallback)."""
    locks = getattr(importlib._bootstrap, "_module_locks", None)
    if isinstance(locks, dict):
        return name in locks
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _is_compiling():
    """``torch.compiler.is_compiling`` (true while dynamo traces), or a constant false without torch."""
    torch = sys.modules.get("torch")
    compiler = getattr(torch, "compiler", None)
    return getattr(compiler, "is_compiling", None) or (lambda: False)


def _compiled_check():
    from .compiled import check

    return check


FRAMEWORKS = frozenset({"sglang", "vllm"})
"""Serving stacks that ship kernel modules and call them from their own backends: for their
targets the library is the target's own package, so the backend's line is the caller."""


def _library_dirs(module_name: str, private: bool = False) -> tuple:
    """Where frames are 'inside the kernel's library', not 'the caller'.

    The defining module's file, and for an installed package (under site-packages) the whole
    top-level package, so a library calling its own entry point is attributed to its user
    (for a serving stack, ``FRAMEWORKS``, the target's own package only, and none of it for a
    ``private`` target, a ``_helper`` its own module's code calls: SGLang's
    ``TorchNativeAttnBackend._run_sdpa_forward_decode``, whose caller is the backend's
    ``forward_decode``); and torch, whose wrappers (``torch.compiler.disable``) may stand between
    a caller and the entry point.
    """
    dirs = []
    module = sys.modules.get(module_name)
    top_name = module_name.split(".")[0]
    if getattr(module, "__file__", None) and not (private and top_name in FRAMEWORKS):
        dirs.append(module.__file__)
    if top_name in FRAMEWORKS:
        if getattr(module, "__file__", None) and not private:
            dirs.append(os.path.dirname(module.__file__) + os.sep)
    else:
        for path in list(getattr(sys.modules.get(top_name), "__path__", None) or []):
            if "site-packages" in path or "dist-packages" in path:
                dirs.append(path)
    torch = sys.modules.get("torch")
    if getattr(torch, "__file__", None):
        dirs.append(os.path.dirname(torch.__file__) + os.sep)
    return tuple(dirs)


def _version_of(module_name: str) -> str:
    from importlib import metadata

    top = module_name.split(".")[0]
    for dist in metadata.packages_distributions().get(top, [top]):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return "version unknown"


interposer = Interposer()
