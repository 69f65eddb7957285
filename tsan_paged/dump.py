"""Dumps: what explains a bad call, saved before the process raises or aborts.

A dump keeps the integer arguments (page tables, lengths, indptr: small) in full, and of
every floating-point tensor (the KV cache, the query) only its shape, dtype, strides and
device. Files are ``tsan_paged.<pid>.<n>.<op>.pt``, created exclusively (never
overwritten), at most ``max_dumps`` per process and directory, loadable with ``weights_only=True``.
:func:`recheck` rebuilds the call with zero-cost stand-ins for the big tensors and runs the
current rules on it: that is what ``tsan-paged show DUMP`` prints.
"""

from __future__ import annotations

import itertools
from collections import Counter
import os
import re
import threading
from pathlib import Path
from typing import Optional

import torch

from . import engine
from .registry import Call, CheckOptions, registry
from .report import Violation

FORMAT = "tsan_paged-dump-1"
MAX_SAVED_ELEMENTS = 1 << 24

_counter = itertools.count()
_written: Counter = Counter()  # dump directory -> dumps this process wrote there
_lock = threading.Lock()


def write(dump_dir: str, target: str, arguments: dict, violations, max_dumps: int) -> Optional[Path]:
    """Write one dump; ``None`` once this process wrote ``max_dumps`` of them to ``dump_dir``."""
    directory = Path(dump_dir).resolve()
    with _lock:
        if _written[directory] >= max_dumps:
            return None
        _written[directory] += 1
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "target": target,
        "pid": os.getpid(),
        "cuda_capability": _capability(arguments),
        "arguments": {name: _encode(value) for name, value in arguments.items()},
        "violations": [v.to_dict() for v in violations],
    }
    op = re.sub(r"[^A-Za-z0-9_.-]", "_", target.split(":")[-1])
    while True:
        path = directory / f"tsan_paged.{os.getpid()}.{next(_counter)}.{op}.pt"
        try:
            with open(path, "xb") as f:
                torch.save(payload, f)
            return path
        except FileExistsError:
            continue


def load(path) -> dict:
    payload = torch.load(path, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a tsan_paged dump")
    return payload


def recheck(payload: dict) -> list:
    """Run the current rules for the dumped target on the dumped arguments."""
    arguments = {name: _decode(value) for name, value in payload["arguments"].items()}
    capability = tuple(payload["cuda_capability"]) if payload.get("cuda_capability") else None
    call = Call(payload["target"], arguments, CheckOptions(cuda_capability=capability))
    found = []
    for rule in registry.for_target(payload["target"]):
        found.extend(v.replace(op=payload["target"]) for v in engine.findings(rule.check(call), call))
    return found


def explain(path) -> str:
    payload = load(path)
    lines = [f"dump {path}", f"  target  {payload['target']}  (pid {payload['pid']})"]
    for name, value in payload["arguments"].items():
        lines.append(f"  {name:<28} {_describe(value)}")
    lines.append("  recorded findings:")
    lines += ["    " + Violation.from_dict(v).format().replace("\n", "\n    ") for v in payload["violations"]]
    lines.append("  re-checked with the current rules:")
    found = recheck(payload)
    lines += ["    " + v.format().replace("\n", "\n    ") for v in found] or ["    no findings"]
    return "\n".join(lines)


def _capability(arguments: dict):
    for value in arguments.values():
        if isinstance(value, torch.Tensor) and value.is_cuda:
            return list(torch.cuda.get_device_capability(value.device))
    return None


def _encode(value):
    if isinstance(value, torch.Tensor):
        meta = {"shape": list(value.shape), "dtype": str(value.dtype), "stride": list(value.stride()),
                "device": str(value.device)}
        if not value.dtype.is_floating_point and not value.dtype.is_complex and value.numel() <= MAX_SAVED_ELEMENTS:
            # Values in full; a strided view is itself a finding (bad-layout), so remember it.
            meta["data"] = value.detach().cpu().contiguous().clone()
            meta["contiguous"] = value.is_contiguous()
        return {"tensor": meta}
    if isinstance(value, (tuple, list)):
        return {"tuple" if isinstance(value, tuple) else "list": [_encode(v) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value)}
    return {"repr": repr(value)}


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.replace("torch.", ""))


def _decode(value):
    if "tensor" in value:
        meta = value["tensor"]
        if "data" in meta:
            data = meta["data"]
            if not meta.get("contiguous", True):  # rebuild a non-contiguous view of the same values
                wide = torch.empty(meta["shape"][:-1] + [meta["shape"][-1] + 1], dtype=data.dtype)
                wide[..., :-1] = data
                return wide[..., :-1]
            return data
        return torch.empty((), dtype=_dtype(meta["dtype"])).expand(meta["shape"])
    if "tuple" in value:
        return tuple(_decode(v) for v in value["tuple"])
    if "list" in value:
        return [_decode(v) for v in value["list"]]
    if "dtype" in value:
        return _dtype(value["dtype"])
    if "value" in value:
        return value["value"]
    return value["repr"]


def _describe(value) -> str:
    if "tensor" in value:
        meta = value["tensor"]
        kept = "values kept" if "data" in meta else "shape only"
        return f"tensor {meta['dtype'].replace('torch.', '')}{meta['shape']} strides {meta['stride']} on {meta['device']} ({kept})"
    if "tuple" in value or "list" in value:
        return "(" + ", ".join(_describe(v) for v in value.get("tuple", value.get("list"))) + ")"
    return repr(value.get("value", value.get("dtype", value.get("repr"))))
