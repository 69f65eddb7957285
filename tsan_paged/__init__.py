"""tsan_paged: a sanitizer for paged-KV attention kernels.

``with PagedSanitizer(mode="raise"): ...`` checks every call to a paged kernel that has a
rule (FlashInfer's ``trtllm_batch_decode_with_kv_cache`` built in; add your own with
``@tsan_paged.rule``) against the KV buffers its page table indexes, before the kernel runs.
``TSAN_PAGED=log|raise|abort`` in the environment does the same for every Python process
that inherits it.

Names are imported on first use, so that the start-up hook (``tsan_paged._autostart``)
costs a process that never imports torch next to nothing.
"""

import importlib

__version__ = "0.2.0"

_EXPORTS = {
    "PagedSanitizer": "sanitizer", "current": "sanitizer",
    "PageTableViolation": "report", "Violation": "report", "CHECKS": "report",
    "rule": "registry", "registry": "registry", "Rule": "registry", "Call": "registry",
    "ConfigError": "config",
    "checks": None,
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tsan_paged' has no attribute {name!r}")
    module = importlib.import_module(f".{_EXPORTS[name] or name}", __name__)
    value = module if _EXPORTS[name] is None else getattr(module, name)
    globals()[name] = value
    return value
