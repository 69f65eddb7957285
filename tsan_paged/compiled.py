"""Checks inside ``torch.compile``'d code.

A checked Python entry point called from compiled code cannot run its check the eager way: dynamo
would trace the check's Python, and the check reads values (a data-dependent guard: a broken
compile under ``fullgraph=True``, a graph break at every call otherwise). So while dynamo traces
the entry point's wrapper, the wrapper puts one op of its own into the graph before the call,
``tsan_paged::check(tensors, site)``:

- the op takes the call's tensor arguments; everything else about the call (the target, the
  arguments that are not tensors, their structure, and where in the user's code the call is) is a
  *site*, recorded once when the graph is traced and named by the op's ``site`` number;
- at every run of the compiled graph the op's implementation rebuilds the call's arguments from
  the site and the real tensors, and hands them to the sanitizer active then: the same rules and
  the same engine as an eager call (device launches on CUDA tensors, so ``mode="reduce-overhead"``
  captures the check in its CUDA graphs);
- the op is registered as effectful (``torch.library._register_effectful_op``): nothing removes
  it for having no output, and it stays in program order with the graph's other effects;
- its fake implementation does nothing, so tracing reads no value: no guard, no graph break.

The op is traced in by :func:`check_in_graph` under ``torch._dynamo.nonstrict_trace``: dynamo does
not trace the sanitizer's Python, it records a call that AOT tracing runs once with fake tensors,
which records the site and emits the op.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.utils import _pytree as pytree

from .callsite import _HERE, INSIDE, STACK_LIMIT, short_path

_lock = threading.Lock()
_sites: list = []  # site number -> Site
_by_key: dict = {}  # what a site was traced from -> its number


@dataclass(frozen=True)
class Site:
    """A checked call in compiled code, as traced: what the op's tensors are the leaves of."""

    target: str
    spec: Any  # the pytree spec of (args, kwargs)
    leaves: tuple  # the leaves, None where a tensor goes
    tensor_positions: tuple
    caller: str
    stack: tuple


def _record(target: str, args: tuple, kwargs: dict) -> tuple:
    """``(the call's tensors, its site's number)``, or ``([], None)`` for a call that a checked
    entry point makes inside its own traced code (not checked, as in eager code); a call traced
    again (the ``eager`` backend runs this at every call) finds its site."""
    caller, stack, nested = _user_frame()
    if nested:
        return [], None
    leaves, spec = pytree.tree_flatten((args, kwargs))
    positions = tuple(i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor))
    constants = tuple(None if i in positions else leaf for i, leaf in enumerate(leaves))
    key = (target, repr(spec), repr(constants), stack)
    with _lock:
        number = _by_key.get(key)
        if number is None:
            _sites.append(Site(target, spec, constants, positions, caller, stack))
            number = _by_key[key] = len(_sites) - 1
    return [leaves[i] for i in positions], number


def _user_frame() -> tuple:
    """``(caller, stack, nested)``: the line of the user's code the traced call is on, from dynamo's
    record of the frames it traces (else the Python stack now), outside tsan_paged and torch;
    ``nested``: the call is made inside another checked entry point, whose wrapper is on the stack
    too (FlashInfer's ``trtllm_batch_decode_with_kv_cache`` calling ``xqa_batch_decode_with_kv_cache``:
    eager code checks only the outer call, :func:`tsan_paged.sanitizer._call_checked`)."""
    frames = []
    try:  # AOT tracing runs this for a node of dynamo's graph, whose meta has the user's stack
        import re
        from torch.fx.traceback import get_current_meta

        trace = (get_current_meta() or {}).get("stack_trace") or ""
        frames = [(f, int(n), name) for f, n, name in re.findall(r'File "([^"]+)", line (\d+), in (\S+)', trace)]
    except Exception:
        pass
    if not frames:
        frame = sys._getframe(1)
        while frame is not None:
            frames.insert(0, (frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
            frame = frame.f_back
    wrapper = os.path.join(_HERE, "interpose.py")
    nested = sum(1 for file, _, name in frames if file == wrapper and name == "tsan_paged_wrapper") > 1
    inside = INSIDE + (os.path.join(_HERE, "compiled.py"), os.path.dirname(torch.__file__) + os.sep, "<eval_with_key>")
    users = [f for f in frames if not f[0].startswith(inside)]
    stack = tuple(f"{short_path(file)}:{line} in {name}" for file, line, name in users)[-STACK_LIMIT:]
    return (stack[-1] if stack else "", stack, nested)


@torch.library.custom_op("tsan_paged::check", mutates_args=())
def _check_op(tensors: list[torch.Tensor], site: int) -> None:
    """At a run of a compiled graph: check the call ``site`` recorded, with its real ``tensors``."""
    from .sanitizer import current

    sanitizer = current()
    if sanitizer is None:
        return
    recorded = _sites[site]
    leaves = list(recorded.leaves)
    for position, tensor in zip(recorded.tensor_positions, tensors):
        leaves[position] = tensor
    args, kwargs = pytree.tree_unflatten(leaves, recorded.spec)
    sanitizer._on_compiled_call(recorded, args, kwargs)


@_check_op.register_fake
def _(tensors, site):
    return None


torch.library._register_effectful_op(_check_op._opoverload, torch.library.EffectType.ORDERED)


@torch.library.custom_op("tsan_paged::not_checked", mutates_args=())
def _not_checked_op(site: int) -> None:
    """At a run of a compiled graph: a call its trace could not put a check in for (the warning
    is said once per site)."""
    from .sanitizer import current

    sanitizer = current()
    if sanitizer is not None:
        sanitizer._on_compiled_call_not_checked(_sites[site])


@_not_checked_op.register_fake
def _(site):
    return None


torch.library._register_effectful_op(_not_checked_op._opoverload, torch.library.EffectType.ORDERED)

_GRAPH_LEAVES = (torch.Tensor, int, float, bool, str, type(None), torch.dtype, torch.device)


def check(target: str, args: tuple, kwargs: dict) -> None:
    """What a checked entry point's wrapper does while dynamo traces it (dynamo traces this too):
    put the check into the graph, or, for a call with an argument a graph's op cannot take (an
    object of the library's, e.g. a KV pool passed as ``self``), a warning that it is not checked."""
    foreign = tuple(sorted({type(leaf).__name__ for leaf in pytree.tree_leaves((args, kwargs))
                            if not isinstance(leaf, _GRAPH_LEAVES)}))
    if foreign:
        not_checked_in_graph(target, ", ".join(foreign))
    else:
        check_in_graph(target, args, kwargs)


@torch._dynamo.nonstrict_trace
def not_checked_in_graph(target: str, types: str) -> int:
    caller, stack, nested = _user_frame()
    if nested:
        return -1
    with _lock:
        _sites.append(Site(target, None, (types,), (), caller, stack))
        number = len(_sites) - 1
    torch.ops.tsan_paged.not_checked(number)
    return number


@torch._dynamo.nonstrict_trace
def check_in_graph(target: str, args: tuple, kwargs: dict) -> int:
    """Traced into a compiled graph in place of the eager check (module docstring); the site's
    number, -1 for a nested call (a nonstrict-traced function must return a tensor, an int or a list)."""
    tensors, site = _record(target, args, kwargs)
    if site is None:
        return -1
    torch.ops.tsan_paged.check(tensors, site)
    return site


def site(number: int) -> Optional[Site]:
    return _sites[number] if 0 <= number < len(_sites) else None
