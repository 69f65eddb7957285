"""Start the sanitizer in every Python process that inherits ``TSAN_PAGED``.

The installed ``tsan_paged_autostart.pth`` runs, at interpreter start-up,
``import os; os.environ.get("TSAN_PAGED") and __import__("tsan_paged._autostart", fromlist=["start"]).start()``:
with the variable unset that is one dictionary lookup. With it set, this module checks the
mode and the config (``TSAN_PAGED_CONFIG``) at once -- a bad value ends the process with
status 2 and a message naming the variable, the file and the key, rather than running
unsanitized -- and starts a process-lifetime :class:`PagedSanitizer` when torch is first
imported (every kernel it checks needs torch; a process that never imports torch pays
only this module's import).

``TSAN_PAGED``: ``1``/``on``/``true`` (mode from the config, else ``log``), ``log``,
``raise`` or ``abort``; ``0``/``off``/``false``/empty: off.
"""

from __future__ import annotations

import os
import sys

OFF = ("", "0", "off", "false", "no")
ON = ("1", "on", "true", "yes")

sanitizer = None  # the process's PagedSanitizer once started


def settings():
    """``(mode or None, config)`` from the environment; ``None`` when switched off."""
    from . import config as config_mod

    value = os.environ.get("TSAN_PAGED", "").strip().lower()
    if value in OFF:
        return None
    mode = None if value in ON else value
    if mode is not None and mode not in config_mod.MODES:
        raise config_mod.ConfigError(f"TSAN_PAGED={value!r}: use 1, log, raise or abort (0 or empty: off)")
    path = os.environ.get("TSAN_PAGED_CONFIG") or None
    try:
        config = config_mod.load(path)
    except config_mod.ConfigError as exc:
        raise config_mod.ConfigError(f"TSAN_PAGED_CONFIG: {exc}") from None
    return mode, config


def start() -> None:
    try:
        found = settings()
    except Exception as exc:  # ConfigError, or a config file we cannot read
        sys.stderr.write(f"tsan_paged: cannot start: {exc}\n")
        sys.stderr.flush()
        os._exit(2)
    if found is None:
        return
    if "torch" in sys.modules:
        _start_sanitizer(*found)
        return
    from .interpose import ImportWatcher

    def on_import(module):
        if module.__name__ == "torch" and sanitizer is None:
            sys.meta_path[:] = [f for f in sys.meta_path if f is not watcher]
            _start_sanitizer(*found)

    watcher = ImportWatcher(on_import)
    sys.meta_path.insert(0, watcher)


def _start_sanitizer(mode, config) -> None:
    global sanitizer
    from .sanitizer import PagedSanitizer

    sanitizer = PagedSanitizer(mode=mode, config=config, summary=True)
    sanitizer.__enter__()  # for the life of the process
