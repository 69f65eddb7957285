"""The dispatcher catcher: a TorchDispatchMode for rules whose target is ``"ns::op"``.

Ops registered with ``torch.library`` / ``TORCH_LIBRARY`` (vLLM's ``_C`` ops, sgl-kernel,
user ops) are seen here, on the thread that entered the sanitizer. Every aten op in scope
enters this mode, so the fast path is one dict lookup keyed by the op overload object;
the sanitizer installs the mode only when an active rule targets a dispatcher op.
"""

from __future__ import annotations

from typing import Callable

from torch.utils._python_dispatch import TorchDispatchMode

_NOT_SEEN = object()


class DispatchCatcher(TorchDispatchMode):
    def __init__(self, targets, on_call: Callable):
        """``targets``: ``"ns::op"`` or ``"ns::op.overload"`` names; ``on_call(target, func, arguments)``."""
        super().__init__()
        self._by_name = set(targets)
        self._target_of: dict = {}  # OpOverload -> target or None, filled on first sight
        self._on_call = on_call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        target = self._target_of.get(func, _NOT_SEEN)
        if target is _NOT_SEEN:
            target = self._match(func)
        if target is None:
            return func(*args, **(kwargs or {}))
        return self._on_call(target, func, bind_schema(func, args, kwargs or {}), args, kwargs or {})

    def _match(self, func):
        name = func.name()  # "ns::op.overload" or "ns::op" for the default overload
        packet = name.split(".", 1)[0]
        target = name if name in self._by_name else packet if packet in self._by_name else None
        self._target_of[func] = target
        return target


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
