"""Configuration: TOML files (stdlib ``tomllib``), dicts, and the environment.

Every key is validated when the config is loaded, so a typo is an error at start naming
the file, the key and what is allowed, not a surprise at the first kernel call.

```toml
mode = "log"              # log | raise | abort
exit_code = 86            # status of a process ended by abort mode
dump_dir = "/tmp/tsan_paged"
max_dumps = 8             # per process; dumps never overwrite each other
dump_on_log = false       # also dump on errors in log mode
max_reports = 10000       # Violations kept in PagedSanitizer.reports
report_dir = ""           # JSON lines per process: <dir>/tsan_paged[.rank<R>].<pid>.jsonl
dedup = true              # log each (op, check, caller) once; false: log every finding
device_path = "auto"      # CUDA tables (docs/gpu.md): auto | sync | deferred | torch
device_action = "auto"    # device findings: auto (trap in abort mode, else guard) | none | trap | guard
device_poll_s = 0.1       # deferred device records: snapshot at most this often (seconds)
track_pages = false       # shadow SGLang's KV allocators: page-not-allocated, alloc-out-of-range (tracking.py)
abort_peers = true        # abort mode in a torch.distributed job: the other ranks end too (distributed.py)

[checks]                  # per check id: "error" | "warning" | "off"
"dead-page-out-of-range" = "error"
"duplicate-page" = "warning"

[[suppress]]              # ASan-style: drop findings matching all the given globs
check = "dead-page-out-of-range"
op = "flashinfer.decode:*"
caller = "*/trtllm_mha_backend.py:*"

[[rule]]                  # declarative rules: see tsan_paged/declarative.py
target = "mylib::paged_decode"
table = "block_table"
lengths = "seq_lens"
buffers = ["kv_cache"]
page_size = "kv_cache.shape[1]"
```

Environment: ``TSAN_PAGED_CONFIG`` names a config file; ``TSAN_PAGED_REPORT_DIR``
overrides ``report_dir`` (``tsan-paged run`` sets it).
"""

from __future__ import annotations

import fnmatch
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

from .report import CHECKS

MODES = ("log", "raise", "abort")
SEVERITIES = ("error", "warning", "off")
DEFAULT_EXIT_CODE = 86
DEFAULT_DUMP_DIR = "tsan_paged_dumps"
OFF_BY_DEFAULT = frozenset({"duplicate-page"})


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the source and the key."""


@dataclass
class Config:
    mode: str = "log"
    exit_code: int = DEFAULT_EXIT_CODE
    dump_dir: str = DEFAULT_DUMP_DIR
    max_dumps: int = 8
    dump_on_log: bool = False
    max_reports: int = 10000
    report_dir: str = ""
    dedup: bool = True
    device_path: str = "auto"     # CUDA tables: auto | sync | deferred | torch (tsan_paged/device.py)
    device_action: str = "auto"   # on a device finding: auto | none | trap | guard
    device_poll_s: float = 0.1    # deferred device records: snapshot period, seconds
    track_pages: bool = False     # shadow SGLang's KV allocators (tsan_paged/tracking.py)
    abort_peers: bool = True      # abort mode: end the other ranks of a torch.distributed job (distributed.py)
    checks: dict = field(default_factory=dict)  # check id -> "error" | "warning" | "off"
    suppress: list = field(default_factory=list)  # [{"check"?, "op"?, "caller"?: glob}]
    rule: list = field(default_factory=list)  # [[rule]] tables: declarative rules (tsan_paged.declarative)
    source: str = "defaults"

    def suppressed(self, violation) -> bool:
        """Whether a suppression matches ``violation`` (every glob a suppression gives)."""
        for entry in self.suppress:
            if all(fnmatch.fnmatchcase(str(getattr(violation, key)), pattern) for key, pattern in entry.items()):
                return True
        return False

    def to_dict(self) -> dict:
        """The keys of this config, as :func:`from_dict` takes them."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source"}

    def severity(self, check: str) -> str:
        """The severity ``check`` is reported with, or ``"off"``."""
        if check in self.checks:
            return self.checks[check]
        return "off" if check in OFF_BY_DEFAULT else CHECKS[check]

    def disabled_checks(self) -> frozenset:
        return frozenset(c for c in CHECKS if self.severity(c) == "off")


_TYPES = {"mode": str, "exit_code": int, "dump_dir": str, "max_dumps": int, "dump_on_log": bool,
          "max_reports": int, "report_dir": str, "dedup": bool, "checks": dict, "suppress": list, "rule": list,
          "device_path": str, "device_action": str, "device_poll_s": (int, float),
          "track_pages": bool, "abort_peers": bool}
DEVICE_PATHS = ("auto", "sync", "deferred", "torch")
DEVICE_ACTIONS = ("auto", "none", "trap", "guard")
_SUPPRESS_KEYS = ("check", "op", "caller")


def load(config: Union[None, str, os.PathLike, dict, Config]) -> Config:
    """A :class:`Config` from a TOML path, a dict of the same keys, or ``None`` (defaults).

    ``TSAN_PAGED_REPORT_DIR`` in the environment, when set, overrides ``report_dir``.
    """
    loaded = _load(config)
    report_dir = os.environ.get("TSAN_PAGED_REPORT_DIR")
    if report_dir:
        loaded.report_dir = report_dir
    return loaded


def _load(config) -> Config:
    if config is None:
        return Config()
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return from_dict(config, source="config dict")
    path = Path(config)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return from_dict(data, source=str(path))


def from_dict(data: dict, source: str) -> Config:
    allowed = sorted(_TYPES)
    for key, value in data.items():
        if key not in _TYPES:
            raise ConfigError(f"{source}: unknown key {key!r}; allowed keys: {', '.join(allowed)}")
        expected = _TYPES[key]
        if not isinstance(value, expected) or (expected in (int, (int, float)) and isinstance(value, bool)):
            name = "number" if isinstance(expected, tuple) else expected.__name__
            raise ConfigError(f"{source}: key {key!r} must be a {name}, got {value!r}")
    for key, allowed_values in (("device_path", DEVICE_PATHS), ("device_action", DEVICE_ACTIONS)):
        if key in data and data[key] not in allowed_values:
            raise ConfigError(f"{source}: key {key!r} must be one of {', '.join(allowed_values)}, got {data[key]!r}")
    if "device_poll_s" in data and not data["device_poll_s"] >= 0:
        raise ConfigError(f"{source}: key 'device_poll_s' must be >= 0, got {data['device_poll_s']}")
    if "mode" in data:
        _check_mode(data["mode"], f"{source}: key 'mode'")
    for key in ("max_dumps", "max_reports"):
        if key in data and data[key] < 0:
            raise ConfigError(f"{source}: key {key!r} must be >= 0, got {data[key]}")
    if "exit_code" in data and not 1 <= data["exit_code"] <= 255:
        raise ConfigError(f"{source}: key 'exit_code' must be in 1..255, got {data['exit_code']}")
    for check, severity in data.get("checks", {}).items():
        if check not in CHECKS:
            raise ConfigError(f"{source}: [checks] has unknown check id {check!r}; known: {', '.join(sorted(CHECKS))}")
        if severity not in SEVERITIES:
            raise ConfigError(f"{source}: [checks] {check!r} must be one of {', '.join(SEVERITIES)}, got {severity!r}")
    for i, entry in enumerate(data.get("suppress", [])):
        where = f"{source}: suppress entry {i + 1}"
        if not isinstance(entry, dict) or not entry:
            raise ConfigError(f"{where} must be a table with one or more of {', '.join(_SUPPRESS_KEYS)}")
        for key, pattern in entry.items():
            if key not in _SUPPRESS_KEYS:
                raise ConfigError(f"{where}: unknown key {key!r}; allowed: {', '.join(_SUPPRESS_KEYS)}")
            if not isinstance(pattern, str):
                raise ConfigError(f"{where}: {key!r} must be a string (a glob), got {pattern!r}")
        if "check" in entry and not fnmatch.filter(CHECKS, entry["check"]):
            raise ConfigError(f"{where}: check {entry['check']!r} matches no check id; known: {', '.join(sorted(CHECKS))}")
    from .declarative import RuleError, validate

    for i, spec in enumerate(data.get("rule", [])):
        try:
            validate(spec, f"{source}: rule {i + 1}")
        except RuleError as exc:
            raise ConfigError(str(exc)) from None
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in data.items() if k in known}, source=source)


def _check_mode(mode, where: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"{where} must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def check_mode(mode: Optional[str]) -> Optional[str]:
    return None if mode is None else _check_mode(mode, "mode")
