"""The dispatcher catcher, for rules whose target is a PyTorch op ``"ns::op"``.

Ops registered with ``torch.library`` / ``TORCH_LIBRARY`` (vLLM's ``_C`` ops, sgl-kernel,
user ops) are caught by a Python kernel registered for **just those ops**, at the
``BackendSelect`` dispatch key: it runs after autograd and before the CPU/CUDA kernel, on
every thread, checks the call and redispatches to the original kernel below it. Every
other op -- all of aten -- never enters Python, so unchecked ops pay nothing. Restoring
destroys the registration, which gives the op back its previous (fallthrough) entry.

What only a TorchDispatchMode can see is kept for it: an op that already has its own
``BackendSelect`` kernel (factory-style ops) cannot be wrapped there without hiding that
kernel, so :class:`ModeCatcher` -- a TorchDispatchMode whose fast path is one dict lookup,
active on the thread that entered the sanitizer -- catches those. Ops not registered yet
when the sanitizer starts (a library imported later) are registered when a module import
completes.
"""

from __future__ import annotations

import sys
import threading
from typing import Callable

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .registry import parse_target

_NOT_SEEN = object()


def resolve_overloads(target: str):
    """The ``OpOverload`` objects a target names; ``None`` when the op is not registered."""
    ns, op = parse_target(target)
    packet_name, _, overload = op.partition(".")
    try:
        packet = getattr(getattr(torch.ops, ns), packet_name)
        names = [overload] if overload else packet.overloads()
        return [getattr(packet, name) for name in names]
    except (AttributeError, RuntimeError):
        return None


_namespaces: list = [None, frozenset()]  # [key, namespaces]


def loaded_namespaces() -> frozenset:
    """Namespaces with at least one registered op. Listing every op costs milliseconds, so the
    answer is kept until a module is imported, a library loaded or an op defined from Python
    (the ways a namespace appears)."""
    key = (len(sys.modules), len(torch.ops.loaded_libraries), len(torch.library._defs))
    if _namespaces[0] != key:
        _namespaces[:] = [key, frozenset(name.partition("::")[0] for name in torch._C._dispatch_get_all_op_names())]
    return _namespaces[1]


def bind_schema(func, args: tuple, kwargs: dict) -> dict:
    """Bind a dispatcher call's arguments by the names in the op's schema."""
    arguments = {}
    for i, param in enumerate(func._schema.arguments):
        if i < len(args) and not param.kwarg_only:
            arguments[param.name] = args[i]
        elif param.name in kwargs:
            arguments[param.name] = kwargs[param.name]
        elif param.has_default_value():
            arguments[param.name] = param.default_value
    return arguments


class OpInterposer:
    """Process-wide: the Python kernels registered for target ops, and what is left to register."""

    def __init__(self):
        self.lock = threading.RLock()
        self.registered: dict = {}  # target -> [OpOverload]
        self.pending: set = set()  # targets whose op is not registered yet
        self.mode_only: set = set()  # targets that need the TorchDispatchMode
        self._libraries: dict = {}  # namespace -> torch.library.Library
        self.on_call: Callable = None  # (target, op, args, kwargs, call_original) -> result

    def install(self, targets) -> None:
        with self.lock:
            for target in targets:
                if target not in self.registered and target not in self.mode_only:
                    self._try_register(target)

    def retry_pending(self, module=None) -> None:
        """After an import: register targets whose op appeared meanwhile."""
        with self.lock:
            for target in list(self.pending):
                self._try_register(target)

    def restore(self) -> None:
        with self.lock:
            for library in self._libraries.values():
                library._destroy()
            self._libraries.clear()
            self.registered.clear()
            self.pending.clear()
            self.mode_only.clear()

    def _try_register(self, target: str) -> None:
        overloads = resolve_overloads(target)
        if overloads is None:
            self.pending.add(target)
            return
        self.pending.discard(target)
        if any(torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "BackendSelect") for op in overloads):
            self.mode_only.add(target)
            return
        ns = parse_target(target)[0]
        library = self._libraries.get(ns)
        if library is None:
            library = self._libraries[ns] = torch.library.Library(ns, "IMPL")
        for op in overloads:
            library.impl(op, self._make_kernel(target, op), "BackendSelect", with_keyset=True)
        self.registered[target] = overloads

    def _make_kernel(self, target: str, op):
        on_call = self.on_call
        below = torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.BackendSelect)
        meta = torch._C.DispatchKey.Meta

        def tsan_paged_kernel(keyset, *args, **kwargs):
            if keyset.has(meta):  # meta tensors (fake tensors, opcheck, AOT tracing): no values, no kernel runs
                return op.redispatch(keyset & below, *args, **kwargs)
            return on_call(target, op, args, kwargs, lambda: op.redispatch(keyset & below, *args, **kwargs))

        return tsan_paged_kernel


class ModeCatcher(TorchDispatchMode):
    """The fallback: a TorchDispatchMode for ops that cannot take a BackendSelect kernel."""

    def __init__(self, targets, on_call: Callable):
        super().__init__()
        self._by_name = set(targets)
        self._target_of: dict = {}  # OpOverload -> target or None, filled on first sight
        self._on_call = on_call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        target = self._target_of.get(func, _NOT_SEEN)
        if target is _NOT_SEEN:
            name = func.name()  # "ns::op.overload" or "ns::op" for the default overload
            packet = name.split(".", 1)[0]
            target = name if name in self._by_name else packet if packet in self._by_name else None
            self._target_of[func] = target
        kwargs = kwargs or {}
        if target is None or _without_values(args, kwargs):
            return func(*args, **kwargs)
        return self._on_call(target, func, args, kwargs, lambda: func(*args, **kwargs))


def _without_values(args, kwargs) -> bool:
    """Whether a call's tensors are meta or fake tensors (FakeTensorMode, ``torch.library.opcheck``,
    AOT tracing): nothing to check, and no kernel reads memory."""
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(t, torch.Tensor) and (t.is_meta or isinstance(t, FakeTensor))
               for t in pytree.tree_leaves((args, kwargs)))


op_interposer = OpInterposer()
