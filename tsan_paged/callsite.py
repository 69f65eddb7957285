"""Where a checked call came from: the first frame outside the sanitizer and the kernel's library.

Reports name that frame as ``"file:line in function"`` (paths relative to the working
directory when under it) and keep the stack up to it. The walk runs on every reported call
(and, on the device path, on every call): whether a code object is "inside" is cached.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
# The catchers, the rules and what they call; not demo.py or cli.py, which are real callers.
INSIDE = tuple(os.path.join(_HERE, name) for name in (
    "sanitizer.py", "interpose.py", "dispatch.py", "engine.py", "access.py", "device.py", "kernels.py", "checks.py",
    "declarative.py", "tracking.py", "registry.py")) + (os.path.join(_HERE, "rules") + os.sep,)
STACK_LIMIT = 12

# (id(code), library dirs) -> (code, inside). Keyed by id: hashing a code object hashes its
# constants (~0.3-1 us each, on every frame of every walk). Holding the code keeps its id its own.
_inside: dict = {}


def caller_frame(library_dirs: tuple = (), depth: int = 1):
    """The first frame, from ``depth`` frames up, outside tsan_paged's machinery and ``library_dirs``."""
    frame = sys._getframe(depth)
    while frame is not None:
        code = frame.f_code
        cached = _inside.get((id(code), library_dirs))
        if cached is None or cached[0] is not code:
            if len(_inside) > 65536:
                _inside.clear()
            cached = _inside[(id(code), library_dirs)] = (
                code, code.co_filename.startswith(INSIDE + tuple(library_dirs)) or _generated(code.co_filename))
        if not cached[1]:
            return frame
        frame = frame.f_back
    return None


def _generated(path: str) -> bool:
    """Code torch.compile generated (inductor's modules, FX's ``forward``): the caller is the
    user's code that runs it."""
    return path.startswith("<eval_with_key>") or f"{os.sep}torchinductor_" in path


def describe(frame) -> tuple:
    """``(caller, stack)``: ``"file:line in function"`` of ``frame``, and the stack up to it."""
    if frame is None:
        return "", ()
    stack = []
    while frame is not None and len(stack) < STACK_LIMIT:
        stack.append(f"{short_path(frame.f_code.co_filename)}:{frame.f_lineno} in {frame.f_code.co_name}")
        frame = frame.f_back
    stack.reverse()
    return stack[-1], tuple(stack)


def find_caller(library_dirs: tuple = ()) -> tuple:
    return describe(caller_frame(library_dirs, depth=2))


def short_path(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel
