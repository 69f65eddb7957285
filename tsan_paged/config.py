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

[checks]                  # per check id: "error" | "warning" | "off"
"dead-page-out-of-range" = "error"
"duplicate-page" = "warning"
```
"""

from __future__ import annotations

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
    checks: dict = field(default_factory=dict)  # check id -> "error" | "warning" | "off"
    source: str = "defaults"

    def severity(self, check: str) -> str:
        """The severity ``check`` is reported with, or ``"off"``."""
        if check in self.checks:
            return self.checks[check]
        return "off" if check in OFF_BY_DEFAULT else CHECKS[check]

    def disabled_checks(self) -> frozenset:
        return frozenset(c for c in CHECKS if self.severity(c) == "off")


_TYPES = {"mode": str, "exit_code": int, "dump_dir": str, "max_dumps": int, "dump_on_log": bool,
          "max_reports": int, "checks": dict}


def load(config: Union[None, str, os.PathLike, dict, Config]) -> Config:
    """A :class:`Config` from a TOML path, a dict of the same keys, or ``None`` (defaults)."""
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
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(f"{source}: key {key!r} must be a {expected.__name__}, got {value!r}")
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
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in data.items() if k in known}, source=source)


def _check_mode(mode, where: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"{where} must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def check_mode(mode: Optional[str]) -> Optional[str]:
    return None if mode is None else _check_mode(mode, "mode")
