"""Rules: what to check for which target, and the binding of a call's arguments by name.

A target is either a Python callable, ``"package.module:attribute"``, or a PyTorch
dispatcher op, ``"namespace::op"`` (every overload) or ``"namespace::op.overload"``.
A rule is a function ``check(call) -> iterable of Violation`` that reads the call's
arguments by name, ``call["block_tables"]``, however the caller passed them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional


class UnboundArgument(KeyError):
    """A rule read an argument name the target's signature does not have (library drift)."""


class Call:
    """A call's arguments, bound by parameter name, defaults applied."""

    __slots__ = ("target", "arguments", "options")

    def __init__(self, target: str, arguments: dict, options: Optional["CheckOptions"] = None):
        self.target = target
        self.arguments = arguments
        self.options = options or CheckOptions()

    def __getitem__(self, name: str):
        try:
            return self.arguments[name]
        except KeyError:
            raise UnboundArgument(name) from None

    def read(self, names) -> tuple:
        """The values of ``names``, in order (one lookup per name, no per-name call)."""
        arguments = self.arguments
        try:
            return tuple([arguments[n] for n in names])
        except KeyError as exc:
            raise UnboundArgument(exc.args[0]) from None

    def get(self, name: str, default=None):
        return self.arguments.get(name, default)

    def __contains__(self, name: str) -> bool:
        return name in self.arguments

    def wants(self, check: str) -> bool:
        """Whether ``check`` is switched on: rules skip costly checks nobody asked for."""
        return check not in self.options.disabled


@dataclass
class CheckOptions:
    """What the active configuration asks of rules while they check a call."""

    disabled: frozenset = frozenset({"duplicate-page"})
    cuda_capability: Optional[tuple] = None  # set by `tsan-paged show` to the dumped device's
    page_tracker: Optional[object] = None  # tsan_paged.tracking's tracker while track_pages is on


@dataclass
class Rule:
    target: str
    check: Callable[[Call], Iterable]
    reads: tuple = ()
    name: str = ""
    source: str = "python"
    builtin: bool = field(init=False)  # a rule of tsan_paged.rules (its library may just not be in use)

    def __post_init__(self):
        self.builtin = self.source == "tsan_paged.rules" or self.source.startswith("tsan_paged.rules.")


@dataclass
class Registry:
    rules: dict = field(default_factory=dict)  # target -> [Rule]

    def add(self, rule: Rule) -> Rule:
        parse_target(rule.target)  # validate early
        existing = self.rules.setdefault(rule.target, [])
        existing[:] = [r for r in existing if r.name != rule.name]  # re-registering replaces
        existing.append(rule)
        return rule

    def remove(self, target: str, name: Optional[str] = None) -> None:
        if name is None:
            self.rules.pop(target, None)
        else:
            self.rules[target] = [r for r in self.rules.get(target, []) if r.name != name]

    def copy(self) -> "Registry":
        return Registry({target: list(rules) for target, rules in self.rules.items()})

    def for_target(self, target: str) -> list:
        return self.rules.get(target, [])

    def all(self) -> list:
        return [r for rules in self.rules.values() for r in rules]


registry = Registry()
"""The default registry: built-in rules and every ``@rule`` the program registers."""


def rule(target: str, *, reads: Iterable[str] = (), name: Optional[str] = None,
         registry: Registry = registry):
    """Register ``fn(call) -> iterable of Violation`` as a rule for ``target``.

    ``reads`` names the arguments the rule needs; when the target's signature no longer
    has one of them (library drift), the sanitizer reports ``rule-unbound`` instead of
    running the rule. Reading an undeclared name that does not exist is reported the same
    way, at the call.
    """
    parse_target(target)

    def decorate(fn):
        registry.add(Rule(target=target, check=fn, reads=tuple(reads),
                          name=name or f"{fn.__module__}.{fn.__qualname__}",
                          source=getattr(fn, "__module__", "python")))
        return fn

    return decorate


def is_dispatcher_target(target: str) -> bool:
    return "::" in target


def parse_target(target: str) -> tuple:
    """``"pkg.mod:attr.path"`` -> ``("pkg.mod", "attr.path")``; ``"ns::op"`` -> ``("ns", "op")``."""
    if not isinstance(target, str):
        raise TypeError(f"rule target must be a string, got {type(target).__name__}")
    if is_dispatcher_target(target):
        ns, _, op = target.partition("::")
        if ns and op and ":" not in op and all(p.isidentifier() for p in op.split(".")) and ns.isidentifier():
            return ns, op
    else:
        module, sep, attr = target.partition(":")
        if sep and module and attr and all(p.isidentifier() for p in module.split(".") + attr.split(".")):
            return module, attr
    raise ValueError(f"bad rule target {target!r}: use 'package.module:callable' or 'namespace::op'")


class SignatureBinder:
    """Binds ``(args, kwargs)`` to parameter names like ``inspect.Signature.bind`` + defaults.

    Plain parameter lists (the common case for kernel entry points) take a fast path that
    costs a couple of microseconds; anything else falls back to ``inspect``.
    """

    def __init__(self, fn):
        self.signature = inspect.signature(fn)
        params = list(self.signature.parameters.values())
        kinds = {p.kind for p in params}
        self.simple = kinds <= {inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY}
        self.positional = tuple(p.name for p in params if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.names = frozenset(p.name for p in params)
        self.defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        self.accepts_any_keyword = inspect.Parameter.VAR_KEYWORD in kinds

    def bind(self, args: tuple, kwargs: dict) -> dict:
        """The bound arguments; ``TypeError`` when the call does not fit the signature."""
        if not self.simple:
            bound = self.signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return dict(bound.arguments)
        if len(args) > len(self.positional):
            raise TypeError("too many positional arguments")
        arguments = dict(self.defaults)
        arguments.update(zip(self.positional, args))
        for key in kwargs:
            if key not in self.names or key in self.positional[:len(args)]:
                raise TypeError(f"unexpected or repeated argument {key!r}")
        arguments.update(kwargs)
        if len(arguments) != len(self.names):
            raise TypeError(f"missing arguments {sorted(self.names - arguments.keys())}")
        return arguments

    def missing(self, reads: Iterable[str]) -> list:
        if self.accepts_any_keyword:
            return []
        return [name for name in reads if name not in self.names]
