"""Declarative rules: "a page table + per-row lengths + the buffers its pages index".

One ``[[rule]]`` table per target, in a config file (or a dict of the same keys)::

    [[rule]]
    target = "mylib::paged_decode"      # "pkg.module:callable" or "namespace::op"
    table = "block_table"               # the page table argument: [rows, W], or CSR indices, or slots
    lengths = "seq_lens"                # per-row token counts (optional): row r reads ceil(len / page_size) pages
    buffers = ["k_cache", "v_cache"]    # what the pages index; "kv[0]" / "kv[1]" name tuple elements
    page_dim = 0                        # the page dimension of each buffer (default 0)
    page_size = "k_cache.shape[1]"      # an integer, "BUFFER.shape[N]", or an int argument's name
    max_length = "max_seq_len"          # optional: an int argument (or integer) no length may exceed
    indptr = "kv_indptr"                # CSR page list instead of a 2D table (table = the indices) ...
    last_page_len = "kv_last_page_len"  # ... with the tokens in each row's last page (optional)
    slots = true                        # table is a slot mapping [tokens]: slot < pages * page_size; < 0 = padding
    checks = ["page-out-of-range"]      # the check ids to run (default: all that apply)
    name = "my rule"                    # optional

:func:`validate` checks a table when the config is loaded (errors name the source, the
rule and the key); :func:`make_rule` turns it into a :class:`~tsan_paged.registry.Rule`
whose check uses the shared primitives in :mod:`tsan_paged.checks`.
"""

from __future__ import annotations

import re

from .registry import Rule, parse_target
from .report import CHECKS, Violation

_DEPS: list = []  # torch and the access forms, imported with the first check (validating a config needs neither)


def _deps() -> tuple:
    if not _DEPS:
        import torch

        from . import checks
        from .access import Buffer, CsrPages, PageTable, Slots

        _DEPS[:] = [torch, checks, Buffer, CsrPages, PageTable, Slots]
    return _DEPS

_KEYS = {"target": str, "name": str, "table": str, "lengths": str, "buffers": list, "page_dim": int,
         "page_size": (int, str), "max_length": (int, str), "indptr": str, "last_page_len": str, "slots": bool,
         "checks": list}
_REQUIRED = ("target", "table", "buffers")
_REF = re.compile(r"^([A-Za-z_]\w*)(?:\[(\d+)\])?$")  # "name" or "name[i]"
_SHAPE = re.compile(r"^([A-Za-z_]\w*(?:\[\d+\])?)\.shape\[(-?\d+)\]$")  # "name.shape[N]" or "name[i].shape[N]"


class RuleError(ValueError):
    pass


def validate(spec, where: str) -> dict:
    """Check one ``[[rule]]`` table; raise :class:`RuleError` naming ``where``, the rule and the key."""
    if not isinstance(spec, dict):
        raise RuleError(f"{where}: must be a table of keys, got {spec!r}")
    label = f"{where} ({spec.get('target', 'no target')})"
    for key, value in spec.items():
        if key not in _KEYS:
            raise RuleError(f"{label}: unknown key {key!r}; allowed keys: {', '.join(_KEYS)}")
        expected = _KEYS[key]
        if not isinstance(value, expected) or (isinstance(value, bool) and expected in (int, (int, str))):
            names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
            raise RuleError(f"{label}: key {key!r} must be a {names}, got {value!r}")
    for key in _REQUIRED:
        if key not in spec:
            raise RuleError(f"{label}: missing key {key!r}")
    try:
        parse_target(spec["target"])
    except ValueError as exc:
        raise RuleError(f"{label}: key 'target': {exc}") from None
    refs = [("table", spec["table"])] + [(k, spec[k]) for k in ("lengths", "indptr", "last_page_len") if k in spec]
    refs += [("buffers", b) for b in spec["buffers"]]
    if not spec["buffers"]:
        raise RuleError(f"{label}: key 'buffers' must name at least one buffer argument")
    for key, ref in refs:
        if not isinstance(ref, str) or not _REF.match(ref):
            raise RuleError(f"{label}: key {key!r}: {ref!r} is not an argument name (or 'name[i]')")
    for key in ("page_size", "max_length"):
        value = spec.get(key)
        if isinstance(value, str) and not (_SHAPE.match(value) or _REF.match(value)):
            raise RuleError(f"{label}: key {key!r}: {value!r} is not an integer, 'BUFFER.shape[N]' or an argument name")
        if isinstance(value, int) and value <= 0 and key == "page_size":
            raise RuleError(f"{label}: key 'page_size' must be > 0, got {value}")
    if spec.get("slots") and "indptr" in spec:
        raise RuleError(f"{label}: 'slots' and 'indptr' describe different tables; give one")
    if ("lengths" in spec or "indptr" in spec or spec.get("slots")) and "page_size" not in spec:
        raise RuleError(f"{label}: missing key 'page_size' (needed with lengths, indptr or slots)")
    if "last_page_len" in spec and "indptr" not in spec:
        raise RuleError(f"{label}: 'last_page_len' needs 'indptr'")
    for check in spec.get("checks", []):
        if check not in CHECKS:
            raise RuleError(f"{label}: key 'checks': unknown check id {check!r}; known: {', '.join(sorted(CHECKS))}")
    return spec


def make_rule(spec: dict, source: str) -> Rule:
    """A :class:`Rule` for a validated spec."""
    reads = sorted({_REF.match(_base(ref)).group(1) for ref in _references(spec)})
    wanted = set(spec.get("checks", ())) or None

    accessors = _Accessors()

    def check(call):
        found = _check(call, spec, lambda ref: accessors[ref](call))
        if wanted is None:
            return found
        for item in found:  # the checks the rule asked for: descriptions filter what they find
            if hasattr(item, "only"):
                item.only = frozenset(wanted)
        return [v for v in found if not isinstance(v, Violation) or v.check in wanted]

    name = spec.get("name") or f"{source}: {spec['target']}"
    return Rule(target=spec["target"], check=check, reads=tuple(reads), name=name, source=source)


def _references(spec):
    refs = [spec["table"], *spec["buffers"]] + [spec[k] for k in ("lengths", "indptr", "last_page_len") if k in spec]
    refs += [v for v in (spec.get("page_size"), spec.get("max_length")) if isinstance(v, str)]
    return refs


def _base(ref: str) -> str:
    shape = _SHAPE.match(ref)
    return shape.group(1) if shape else ref


def _accessor(ref):
    """A function ``call -> value`` for an integer, an argument, ``name[i]`` or ``NAME.shape[N]``."""
    if isinstance(ref, int):
        return lambda call: ref
    shape = _SHAPE.match(ref)
    if shape:
        of, dim = _accessor(shape.group(1)), int(shape.group(2))
        return lambda call: int(of(call).shape[dim])
    name, element = _REF.match(ref).groups()
    if element is None:
        return lambda call: call[name]
    index = int(element)
    return lambda call: call[name][index]


class _Accessors(dict):
    """Parsed once per rule: ``accessors[ref](call)``."""

    def __missing__(self, ref):
        self[ref] = _accessor(ref)
        return self[ref]


def _check(call, spec, value_of) -> list:
    """The rule's metadata findings and the description of what its kernel reads."""
    torch, checks, Buffer, CsrPages, PageTable, Slots = _deps()
    table_arg = spec["table"]
    table = value_of(table_arg)
    page_dim = spec.get("page_dim", 0)
    page_size = value_of(spec["page_size"]) if "page_size" in spec else None
    by_pages: dict = {}  # buffers with the same page count are checked once, named together
    for ref in spec["buffers"]:
        by_pages.setdefault(int(value_of(ref).shape[page_dim]), []).append(ref)
    buffers = tuple(Buffer(" and ".join(refs), pages) for pages, refs in by_pages.items())
    if table.dtype.is_floating_point or table.dtype == torch.bool:
        return checks.check_dtype(table, table_arg, (torch.int32, torch.int64))
    if len(buffers) > 2:  # the device kernels check two page counts: an entry must fit the smallest
        buffers = (min(buffers, key=lambda b: b.pages),)

    if spec.get("slots"):
        return [Slots(table, table_arg, Buffer(b.name, b.pages * page_size)) for b in buffers]

    if "indptr" in spec:
        last = value_of(spec["last_page_len"]) if "last_page_len" in spec else None
        return [CsrPages(value_of(spec["indptr"]), table, buffers, last, page_size, indptr_arg=spec["indptr"],
                         indices_arg=table_arg, last_page_len_arg=spec.get("last_page_len", ""))]

    if table.dim() != 2:
        return [Violation("shape-mismatch", table_arg, f"{table_arg} has shape {tuple(table.shape)}, "
                                 "a page table is [rows, W]", value=tuple(table.shape))]
    found = checks.check_packed_rows(table, table_arg)
    rows = table.shape[0]
    lengths = None
    if "lengths" in spec:
        lengths_arg = spec["lengths"]
        lengths = value_of(lengths_arg)
        if lengths.dim() != 1:
            lengths = lengths.reshape(-1)
        if lengths.shape[0] != rows:
            return found + [Violation("shape-mismatch", lengths_arg, f"{lengths_arg} has {lengths.shape[0]} "
                                             f"rows, {table_arg} has {rows}", value=lengths.shape[0], bound=rows)]
    access = PageTable(table, table_arg, buffers, page_size or 1, lengths=lengths,
                       lengths_arg=spec.get("lengths", ""),
                       max_len=value_of(spec["max_length"]) if "max_length" in spec and lengths is not None else None,
                       max_len_arg=str(spec.get("max_length", "")), whole_row=lengths is None)
    found.append(access)
    if call.wants("duplicate-page"):
        def region():
            if lengths is None:
                return None, None
            return None, checks.ceil_div(lengths.to(torch.int64).clamp(min=0), page_size).clamp(max=table.shape[1])
        found += checks.check_duplicate_pages(table, table_arg, region)
    return found
