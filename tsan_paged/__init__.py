"""tsan_paged: a sanitizer for paged-KV attention kernels.

``with PagedSanitizer(mode="raise"): ...`` checks every call to a paged kernel that has a
rule (FlashInfer's ``trtllm_batch_decode_with_kv_cache`` built in; add your own with
``@tsan_paged.rule``) against the KV buffers its page table indexes, before the kernel runs.
"""

from .config import ConfigError
from .registry import Call, Rule, registry, rule
from .report import CHECKS, PageTableViolation, Violation
from .sanitizer import PagedSanitizer, current
from . import rules as _builtin_rules  # noqa: F401  (registers the built-in rules)

__all__ = ["PagedSanitizer", "PageTableViolation", "Violation", "rule", "registry", "Rule", "Call",
           "CHECKS", "ConfigError", "current"]
__version__ = "0.1.0"
