"""What a paged kernel reads: the descriptions rules return, which :mod:`tsan_paged.engine` checks.

A rule says *what* its kernel dereferences, from the kernel's source; it does not check
values itself. The engine checks a description with torch on CPU tensors
(:mod:`tsan_paged.checks`) and with one Triton launch on CUDA tensors (:mod:`tsan_paged.device`:
no host sync, capturable in CUDA graphs), with the same findings either way: check ids,
index, value, bound, count, message.

Forms:

- :class:`PageTable`: a dense table ``[rows, W]`` (``[B, 2, W]`` with ``kv_split``: K ids,
  then V ids; ``[H, B, W]`` with ``sparse_batch``). Row ``r`` reads columns
  ``first[r] <= c < end[r]``: from per-row lengths (``end = ceil((len + length_offset) / ps)``,
  ``first`` from a sliding window), the whole row, or explicit ``first`` / ``end`` tensors.
  Out-of-range entries inside that region are ``page-out-of-range`` errors, outside it
  ``dead-page-out-of-range`` warnings; lengths are checked against 0, ``max_len`` and the
  table's capacity.
- :class:`CsrPages`: ``indptr [B + 1]`` + ``indices`` (+ ``last_page_len [B]``): row ``i``
  reads ``indices[indptr[i]:indptr[i + 1]]``; entries past ``indptr[-1]`` are never read.
  With ``writes`` (FlashInfer's ``append_paged_kv_cache``) only the entries tokens are
  written to are dereferenced.
- :class:`Slots`: a slot mapping ``[tokens]`` a cache-write kernel writes through; negative
  slots are padding the kernel skips (vLLM's), or out of range (``negative_skipped=False``:
  SGLang's pools, whose ``k_buffer[loc] = k`` wraps a negative slot onto the last rows).
- :class:`Lengths`: per-row lengths alone (a Python rule's ``checks.check_lengths``).
- :class:`HostCheck`: a check only the host can make (``duplicate-page``, ``track_pages``'
  page state): run eagerly, skipped with a ``rule-skipped-in-capture`` warning while a CUDA
  graph is being captured.

``guard`` is the value a ``device_action = "guard"`` writes over offending entries before the
kernel runs: one the kernel reads harmlessly (an in-range page for a read, ``-1`` where the
kernel skips it), or ``None`` where no value is safe (a write through the table): the engine
then reports without guarding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .report import CHECKS


@dataclass(frozen=True)
class Buffer:
    """A buffer the table's pages (or slots) index: its name in reports and its size, counted in
    ``unit``s (what an entry names, in reports: "page", "slot", "row")."""

    name: str
    pages: int
    unit: str = "page"


@dataclass(eq=False, slots=True)
class PageTable:
    table: torch.Tensor
    arg: str
    buffers: tuple  # (Buffer,) or (K Buffer, V Buffer): kv_split tables index one each, others both
    page_size: int = 1
    lengths: Optional[torch.Tensor] = None  # [rows] (sparse: [H * B]); None: no length checks
    lengths_arg: str = "seq_lens"
    length_offset: int = 0  # tokens added to every length (FlashAttention's new k/v)
    max_len: Optional[int] = None
    max_len_arg: str = "max_seq_len"
    whole_row: bool = False  # every column is read (trtllm-gen), lengths only checked
    window_left: int = -1  # >= 0: the first column read skips S = len - q_len - window_left tokens ...
    q_len: int = 1
    tile: int = 0  # ... in whole tiles of this many tokens (0: the page size)
    first: Optional[torch.Tensor] = None  # explicit per-row bounds (a Python rule's region)
    end: Optional[torch.Tensor] = None
    explicit_region: bool = False  # first/end given (either may be None: unbounded on that side)
    kv_split: bool = False
    sparse_batch: Optional[int] = None  # [H, B, W] tables: reports (h, b, col)
    index_of: Optional[Callable] = None  # (row, col) -> the index a report shows (a Python rule's; on the
    #                                      device, the first one seen for a form serves its later calls)
    length_index_of: Optional[Callable] = None  # row -> the index of a length finding
    guard: Optional[int] = 0
    only: Optional[frozenset] = None  # check ids to keep (a TOML rule's ``checks``)
    form: Optional[tuple] = None  # a key the rule guarantees fixes everything but the tensors' values
    relabel: Optional[Callable] = None  # (finding, buffers) -> the finding it stands for (a derived table:
    #                                     track_pages' page states); a module-level function (it keys plans)
    reported_as: Optional[str] = None  # with relabel: the check id its findings become (its severity decides
    #                                    the device's trap and guard)

    @property
    def rows(self) -> int:
        if self.sparse_batch:
            return int(self.table.shape[0] * self.table.shape[1])
        return int(self.table.shape[0])

    @property
    def width(self) -> int:
        return int(self.table.shape[-1])

    def tensors(self) -> tuple:
        return tuple(t for t in (self.table, self.lengths, self.first, self.end) if t is not None)


@dataclass(eq=False)
class Lengths:
    lengths: torch.Tensor
    arg: str
    max_len: Optional[int] = None
    max_len_arg: str = "max_seq_len"
    page_size: Optional[int] = None  # with width: lengths past width * page_size exceed the table
    width: Optional[int] = None
    table_arg: str = ""
    index_of: Optional[Callable] = None
    only: Optional[frozenset] = None

    def tensors(self) -> tuple:
        return (self.lengths,)


@dataclass(eq=False)
class Writes:
    """Tokens a kernel writes through a CSR page list: token ``t`` lands in row
    ``batch_indices[t]`` at position ``positions[t]``, i.e. in page
    ``indices[indptr[b] + positions[t] // page_size]``."""

    batch_indices: torch.Tensor
    positions: torch.Tensor
    tokens: int
    batch_arg: str = "batch_indices"
    positions_arg: str = "positions"


@dataclass(eq=False)
class CsrPages:
    indptr: torch.Tensor
    indices: torch.Tensor
    buffers: tuple
    last_page_len: Optional[torch.Tensor] = None
    page_size: Optional[int] = None
    indptr_arg: str = "indptr"
    indices_arg: str = "indices"
    last_page_len_arg: str = "last_page_len"
    writes: Optional[Writes] = None
    guard: Optional[int] = 0
    only: Optional[frozenset] = None
    unit: str = "page"  # what an entry is, in reports: "page", or "slot" (SGLang's token-slot lists)
    relabel: Optional[Callable] = None  # as PageTable's: a derived list's findings as what they stand for
    reported_as: Optional[str] = None

    def tensors(self) -> tuple:
        w = self.writes
        return tuple(t for t in (self.indptr, self.indices, self.last_page_len,
                                 w.batch_indices if w else None, w.positions if w else None) if t is not None)


@dataclass(eq=False)
class Slots:
    slots: torch.Tensor
    arg: str
    buffer: Buffer  # its ``pages`` is the slot count (pages * page_size)
    tokens: Optional[int] = None  # only the first ``tokens`` entries are read
    guard: Optional[int] = -1  # the kernel skips negative slots
    only: Optional[frozenset] = None
    negative_skipped: bool = True  # False: a negative slot is written too (torch indexing wraps it)

    def tensors(self) -> tuple:
        return (self.slots,)


@dataclass(eq=False)
class HostCheck:
    """A check that reads values on the host (a sync on CUDA tensors): ``run() -> [Violation]``."""

    what: str  # what is checked, for the rule-skipped-in-capture warning
    run: Callable
    cuda: bool = True  # whether its tensors are on a CUDA device (else it is just run)


ACCESSES = (PageTable, Lengths, CsrPages, Slots, HostCheck)


def is_access(item) -> bool:
    return isinstance(item, ACCESSES)


@dataclass
class Settings:
    """What the engine needs of the sanitizer that checks a call, so that the engine and the
    device code never import it: the configuration, and the one narrow entry findings made
    later (device records read after their call) are handed to, ``sink.report_found``."""

    mode: str = "log"
    device_path: str = "auto"
    device_action: str = "auto"
    poll_s: float = 0.1
    severity: Callable = lambda check: CHECKS[check]  # check id -> "error" | "warning" | "off"
    sink: object = None  # has report_found(violations, defer) and serial
    errs: Optional[int] = None  # bit per device-record check configured as an error (set on first use)
    skipped: set = field(default_factory=set)  # (call site, what): rule-skipped-in-capture said once
