"""Opt-in stateful page tracking: KV use-after-free (``page-not-allocated``) and allocator
bugs (``alloc-out-of-range``) for SGLang's KV allocators.

``PagedSanitizer(track_pages=True)`` (config key ``track_pages = true``) shadows SGLang's
allocators by wrapping, at class level, the methods that hand out and take back KV slots
(no SGLang code is edited; everything is restored exactly on exit):

- ``TokenToKVPoolAllocator`` (page size 1, a "page" is a token slot): ``alloc``, ``free``, ``clear``;
- ``PagedTokenToKVPoolAllocator``: ``alloc``, ``alloc_extend``, ``alloc_decode``,
  ``_release_page_ids`` (where ``free``, ``free_page_ids``, ``free_segment`` and
  ``free_group_end`` all release pages), ``clear``;
- ``SWATokenToKVPoolAllocator``: its full and SWA sub-allocators are instances of the two
  classes above, so they are shadowed by them; its own ``alloc*`` wrappers only name them
  (``...swa_attn_allocator``) in reports.

A class is patched when the sanitizer starts, or when its module is imported later while it
runs. An allocator built before the sanitizer started is adopted from its own free list
(``get_all_free_pages()``: ``free_pages`` + ``release_pages`` / ``staged_pages``) the first
time it is seen (a ``gc`` scan at start, or its first shadowed call): pages not in the free
list are allocated. Subclasses that override a shadowed method (e.g. ``PageInterleavePoolAllocator``)
are not tracked.

Per pool: one ``uint8`` state per page (never allocated / allocated / freed) and one
``int32`` stack id per page (the ``free`` call that released it, interned: at most
``MAX_STACKS`` distinct stacks are kept), on the allocator's device, under one lock; one more
entry at the end takes what an index out of the pool would write. Allocations and frees update
them without a host sync (a CUDA pool is never read back on the allocator's path): one Triton
launch on a CUDA pool (:meth:`PoolState.mark`), two or three torch ops on a CPU one; the range check of an allocator's output
(``alloc-out-of-range``) reads it on the host, so it runs for CPU pools only.

Reads: the rules of the kernels that read SGLang's pools (FlashInfer's decode, FlashAttention's
paged calls, SGLang's Triton decode / extend) call :func:`check_read_pages` with the table or
CSR slot list they describe.
A kernel's KV buffer is mapped to its pool by storage identity (SGLang's ``k_buffer`` /
``v_buffer`` per layer, full and SWA pools alike), else by an unambiguous page count. With
device ops (no sync), the pool's state is gathered at the table's entries into a derived table
that holds ``page + 1`` where a page is not allocated and 0 elsewhere (one Triton launch,
:func:`not_allocated`); the engine checks that
table over the region the kernel *attends to* (``ceil(seq_len / ps)`` columns, from the sliding
window's first token on a window layer) like any page table -- in CUDA graphs too, at every
replay -- and its findings become ``page-not-allocated`` with the free site's stack (read on the
host when reported). Graph-padding rows read the padding page by design and are not reported
(:func:`_padding` says how they are told apart from live rows). A CSR list gets a derived list
the same way, over its live entries only (:func:`not_allocated_entries`).
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import weakref
from typing import Optional

import torch

from . import checks
from .access import Buffer, CsrPages, PageTable
from .callsite import caller_frame, describe, short_path
from .report import MAX_EXAMPLES, Violation

NEVER, ALLOCATED, FREED = 0, 1, 2
_pool_numbers = __import__("itertools").count()
MAX_STACKS = 4096
STACK_DEPTH = 10
_HERE = os.path.dirname(os.path.abspath(__file__))
_ALLOC_METHODS = ("alloc", "alloc_extend", "alloc_decode")

# module -> {class name: {method: kind}}; kinds: alloc, free_tokens, release_pages, clear, adopt
TARGETS = {
    "sglang.srt.mem_cache.allocator.token": {
        "TokenToKVPoolAllocator": {"alloc": "alloc", "free": "free_tokens", "clear": "clear"}},
    "sglang.srt.mem_cache.allocator.paged": {
        "PagedTokenToKVPoolAllocator": {"alloc": "alloc", "alloc_extend": "alloc", "alloc_decode": "alloc",
                                        "_release_page_ids": "release_pages", "clear": "clear"}},
    "sglang.srt.mem_cache.allocator.swa": {
        "SWATokenToKVPoolAllocator": {"alloc": "adopt", "alloc_extend": "adopt", "alloc_decode": "adopt",
                                      "alloc_extend_swa_tail": "adopt"}},
}


class PoolState:
    """The shadow of one leaf allocator's pool."""

    __slots__ = ("allocator", "role", "page_size", "pages", "state", "stack", "key", "pointers", "__weakref__")

    def __init__(self, allocator, role: str):
        self.allocator = weakref.ref(allocator)
        self.role = role
        self.key = f"tracked pool {next(_pool_numbers)}"  # names the pool to the engine (Buffer name)
        self.page_size = int(allocator.page_size)
        self.pages = int(allocator.size) // self.page_size + 1  # + SGLang's padding page 0
        device = getattr(allocator, "device", "cpu")
        self.state = torch.zeros(self.pages + 1, dtype=torch.uint8, device=device)  # [pages]: out-of-pool writes
        self.stack = torch.full((self.pages + 1,), -1, dtype=torch.int32, device=device)
        self.pointers = (self.state.data_ptr(), self.stack.data_ptr())  # the mark kernel's (never reallocated)

    def mark(self, page_ids, status: int, sid: Optional[int] = None, per_page: int = 1) -> None:
        """Set the state (and the free stack) of the pages ``page_ids // per_page``, no host sync:
        on a CUDA pool one Triton launch through a pre-bound handle (:func:`_launch_mark`), on a
        CPU pool two or three torch ops. An id out of the pool (an allocator bug, which a CPU pool
        reports as alloc-out-of-range) lands in the last entry.

        On a CUDA pool the update is queued on the stream the read checks were last queued on,
        after what the current stream has queued so far: a serving loop that allocates and frees
        on a scheduling stream while the forward runs on another (SGLang's overlap scheduler)
        then never sees a page freed before a forward queued earlier reads it."""
        ids = page_ids if page_ids.dim() == 1 and page_ids.is_contiguous() else page_ids.reshape(-1).contiguous()
        device = ids.device
        if device != self.state.device or ids.dtype not in (torch.int32, torch.int64):
            ids = ids.to(device=self.state.device, dtype=torch.int64)
            device = ids.device
        if not ids.is_cuda:
            return self._fill(ids, status, sid, per_page)
        index = device.index
        current = torch._C._cuda_getCurrentRawStream(index)
        stream = tracker.read_streams.get(index)
        if stream is not None and stream.cuda_stream != current:
            stream.wait_stream(torch.cuda.current_stream(device))  # ids are made on the current stream
            ids.record_stream(stream)
            current = stream.cuda_stream
        if _kernels() is not None:
            try:
                if torch.cuda.current_device() != index:
                    with torch.cuda.device(index):  # the launcher runs in the current device's context
                        return _launch_mark(self, ids, status, sid, per_page, current)
                return _launch_mark(self, ids, status, sid, per_page, current)
            except Exception as exc:  # never the allocator's failure: torch ops from now on
                from .device import _warn_once

                _kernels_module[0] = None
                _warn_once("mark-kernel", f"tsan_paged: track_pages' mark kernel failed ({type(exc).__name__}: "
                           f"{exc}); page states are updated with torch ops from now on")
        with torch.cuda.stream(torch.cuda.ExternalStream(current, device=device)):
            self._fill(ids, status, sid, per_page)

    def _fill(self, ids, status: int, sid: Optional[int], per_page: int) -> None:
        ids = ids.long()  # index_fill_ takes int64 indices (SGLang's req_to_token is int32)
        if per_page > 1:
            ids = torch.div(ids, per_page, rounding_mode="floor")
        ids = ids.clamp(-1, self.pages)  # -1: index_fill_ counts it from the end, the last entry
        self.state.index_fill_(0, ids, status)
        if sid is not None:
            self.stack.index_fill_(0, ids, sid)

    def describe(self) -> str:
        return (f"{self.role} (pool of {self.pages} pages"
                + (f" of {self.page_size} tokens" if self.page_size > 1 else " (token slots)") + ")")


class PageTracker:
    """Process-wide shadow of SGLang's allocators; started and stopped by the sanitizers."""

    def __init__(self):
        self.lock = threading.RLock()
        self.users = 0
        self.pools = weakref.WeakKeyDictionary()  # allocator -> PoolState
        self.by_storage: dict = {}  # storage data_ptr -> weakref(PoolState)
        self.by_key: dict = {}  # PoolState.key -> weakref(PoolState): the pool a derived table's findings name
        self.patches: list = []  # (cls, name, original, wrapper)
        self._stacks: dict = {}  # frames -> id
        self._stack_list: list = []
        self._listener = None
        self._named = weakref.WeakSet()  # SWA allocators whose sub-allocators are named
        self.sinks: list = []  # the sanitizers tracking, in start order: the last one reports
        self.read_streams: dict = {}  # device index -> the stream read checks were last queued on, eagerly (mark)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        with self.lock:
            self.users += 1
            if self.users > 1:
                return
            from .interpose import interposer

            for name in TARGETS:
                module = sys.modules.get(name)
                if module is not None:
                    self._patch_module(module)
            self._listener = self._module_imported
            interposer.add_import_listener(self._listener)
            self._adopt_existing()

    def stop(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users > 0:
                return
            self.users = 0
            from .interpose import interposer

            with interposer.lock:
                if self._listener in interposer.import_listeners:
                    interposer.import_listeners.remove(self._listener)
            self._listener = None
            for cls, name, original, wrapper in reversed(self.patches):
                if cls.__dict__.get(name) is wrapper:
                    setattr(cls, name, original)
            self.patches.clear()
            self.pools = weakref.WeakKeyDictionary()
            self.by_storage.clear()
            self.by_key.clear()
            self.read_streams.clear()
            self._stacks.clear()
            self._stack_list.clear()
            self._named = weakref.WeakSet()

    @property
    def active(self) -> bool:
        return self.users > 0

    def _module_imported(self, module) -> None:
        if getattr(module, "__name__", None) in TARGETS:
            with self.lock:
                self._patch_module(module)

    def _patch_module(self, module) -> None:
        for cls_name, methods in TARGETS[module.__name__].items():
            cls = getattr(module, cls_name, None)
            if cls is None:
                continue
            for name, kind in methods.items():
                original = cls.__dict__.get(name)
                if original is None or getattr(original, "__tsan_paged_original__", None) is not None:
                    continue
                wrapper = _make_wrapper(self, cls, name, kind, original)
                setattr(cls, name, wrapper)
                self.patches.append((cls, name, original, wrapper))

    def _shadowed(self, allocator) -> bool:
        """Whether every shadowed method of ``allocator``'s class is one of our wrappers."""
        cls = type(allocator)
        kinds = {id(w): c for c, _, _, w in self.patches}
        for base in cls.__mro__:
            module = TARGETS.get(base.__module__, {})
            if base.__name__ in module and module[base.__name__] and base.__name__ != "SWATokenToKVPoolAllocator":
                return all(id(getattr(cls, m, None)) in kinds for m in module[base.__name__])
        return False

    def _adopt_existing(self) -> None:
        """Allocators built before the tracker started: adopt them from their free lists."""
        classes = tuple(c for c, _, _, _ in self.patches)
        if not classes:
            return
        parents = tuple(c for c in classes if c.__name__ == "SWATokenToKVPoolAllocator")
        every = set()
        todo = list(classes)
        while todo:  # with subclasses: an instance refers to its own class
            cls = todo.pop()
            if cls not in every:
                every.add(cls)
                todo.extend(cls.__subclasses__())
        for obj in gc.get_referrers(*every):  # in C: ~10x faster than isinstance over gc.get_objects()
            if isinstance(obj, classes):
                try:
                    if isinstance(obj, parents):
                        self._named.add(obj)
                        self.adopt_parent(obj)
                    elif self._shadowed(obj):
                        self.pool(obj)
                except Exception:  # half-built or unusual: adopted at its first call instead
                    pass

    # -- allocator state --------------------------------------------------------------------
    def pool(self, allocator, role: Optional[str] = None) -> Optional[PoolState]:
        """The shadow of ``allocator``, adopted from its free list on first sight."""
        state = self.pools.get(allocator)
        if state is not None:
            if role:
                state.role = role
            return state
        if not self._shadowed(allocator):
            return None
        state = PoolState(allocator, role or type(allocator).__name__)
        free = allocator.get_all_free_pages() if getattr(allocator, "free_pages", None) is not None else None
        state.state[1:state.pages] = ALLOCATED
        if free is not None and free.numel():
            state.mark(free, NEVER)
        self.pools[allocator] = state
        self.by_key[state.key] = weakref.ref(state)
        self._index_buffers(allocator, state)
        return state

    def _index_buffers(self, allocator, state: PoolState) -> None:
        kvcache = getattr(allocator, "_kvcache", None)
        ref = weakref.ref(state)
        for attr in ("k_buffer", "v_buffer", "kv_buffer"):
            for tensor in getattr(kvcache, attr, None) or ():
                if isinstance(tensor, torch.Tensor):
                    self.by_storage[tensor.untyped_storage().data_ptr()] = ref

    def adopt_parent(self, parent) -> None:
        """Name an SWA allocator's sub-allocators in reports (and adopt them)."""
        full = getattr(parent, "full_attn_allocator", None)
        swa = getattr(parent, "swa_attn_allocator", None)
        for attr, child, what in (("full_attn_allocator", full, "full"), ("swa_attn_allocator", swa, "SWA")):
            if child is None or (attr == "swa_attn_allocator" and child is full):
                continue
            self.pool(child, role=f"{type(parent).__name__}.{attr} ({type(child).__name__}, the {what} pool)")

    def stack_id(self) -> int:
        frames = []
        frame = sys._getframe(2)
        while frame is not None and len(frames) < STACK_DEPTH:
            code = frame.f_code
            if not code.co_filename.startswith(_HERE):
                frames.append((code.co_filename, frame.f_lineno, code.co_name))
            frame = frame.f_back
        key = tuple(frames)
        sid = self._stacks.get(key)
        if sid is None:
            if len(self._stack_list) >= MAX_STACKS:
                return -2
            sid = self._stacks[key] = len(self._stack_list)
            self._stack_list.append(key)
        return sid

    def format_stack(self, sid: int) -> str:
        if sid == -1:
            return "      (freed before tracking started, or never allocated)"
        if sid == -2 or sid >= len(self._stack_list):
            return f"      (stack not kept: over {MAX_STACKS} distinct free stacks)"
        return "\n".join(f"      {short_path(f)}:{line} in {name}" for f, line, name in reversed(self._stack_list[sid]))

    def on_alloc(self, allocator, state: PoolState, method: str, out) -> list:
        """Mark what ``method`` handed out; findings for indices past the pool."""
        if out is None or not isinstance(out, torch.Tensor) or out.numel() == 0:
            return []
        tokens = out if out.dim() == 1 else out.reshape(-1)
        ps, pages = state.page_size, state.pages
        with self.lock:
            state.mark(tokens, ALLOCATED, per_page=ps)
        if tokens.is_cuda:
            return []  # the range check reads the indices on the host: CPU pools only (module docstring)
        tokens = tokens.to(torch.int64)
        low, high = (int(x) for x in torch.aminmax(tokens))
        found = []
        if low < ps or high >= pages * ps:
            bad = ((tokens < ps) | (tokens >= pages * ps)).nonzero().flatten()
            i = int(bad[0])
            value = int(tokens[i])
            examples = tuple(((j,), int(tokens[j])) for j in bad[:MAX_EXAMPLES].tolist())
            page = value // ps if value >= 0 else value
            kind = "past the end of" if value >= pages * ps else ("the padding page of" if value >= 0 else "negative, outside")
            found.append(Violation(
                "alloc-out-of-range", "out_indices",
                f"{state.role}.{method} handed out index {value} at position {i} (page {page}), {kind} its pool "
                f"of {pages} pages: it can hand out indices {ps}..{pages * ps - 1} (pages 1..{pages - 1}; page 0 is "
                f"SGLang's padding page). Its free list or its index arithmetic is at fault: an allocator bug, "
                f"not a table-building one", index=(i,), value=value, bound=pages * ps, count=int(bad.numel()),
                examples=examples, op=f"{type(allocator).__module__}:{type(allocator).__name__}.{method}"))
        return found

    def on_release(self, state: PoolState, page_ids, sid: int) -> None:
        with self.lock:
            for ids in page_ids:
                if ids is not None and ids.numel():
                    state.mark(ids, FREED, sid)

    def on_clear(self, allocator, sid: int) -> None:
        with self.lock:
            state = self.pools.get(allocator)
            if state is not None and state.pages == int(allocator.size) // int(allocator.page_size) + 1:
                held = state.state == ALLOCATED
                state.stack.copy_(torch.where(held, sid, state.stack))
                state.state.copy_(torch.where(held, FREED, state.state))
            else:  # first sight (its __init__) or resized: adopt from its free list
                self.pools.pop(allocator, None)
                self.pool(allocator, role=state.role if state is not None else None)

    # -- reads ----------------------------------------------------------------------------
    def pool_of(self, tensor) -> Optional[PoolState]:
        ref = self.by_storage.get(tensor.untyped_storage().data_ptr())
        state = ref() if ref is not None else None
        if state is not None and state.allocator() is not None:
            return state
        pages = int(tensor.shape[0])
        matches = [s for a, s in list(self.pools.items()) if s.pages == pages]
        return matches[0] if len(matches) == 1 else None

    def read_accesses(self, call, access, tensors, window_left=None, q_len=None, region=None,
                      slots: bool = False) -> list:
        """The derived tables (or slot lists) of a read (module docstring): device ops, no host
        sync. ``window_left`` / ``q_len``: the kernel's exact window and query rows, where the
        call's own ``window_left`` / ``max_q_len`` / ``q_len_per_req`` do not say them;
        ``region``: per-row ``(first, end)`` columns instead (ragged queries); ``slots``: a dense
        table's entries are token slots (SGLang's ``req_to_token``), not pages."""
        if call.get("enable_block_sparse_attention") or not call.wants("page-not-allocated"):
            return []
        if window_left is None:
            window_left = call.get("window_left")
        q_len = q_len or call.get("max_q_len") or call.get("q_len_per_req") or 1
        if isinstance(access, CsrPages):
            return self._read_list(access, tensors, int(q_len))
        if access.lengths is None:
            return []
        lengths = access.lengths.reshape(-1)
        out = []
        for (view, index_of, _), kv in zip(checks.table_views(access), tensors):
            with self.lock:
                state = self.pool_of(kv)
                if state is None or state.state.device != view.device:
                    continue
                if slots:
                    derived = not_allocated_slots(view, lengths, state.state[:state.pages], state.page_size, q_len)
                else:
                    derived = not_allocated(view, lengths, state.state[:state.pages], q_len)
                self._note_read(view)
            if region is None and access.explicit_region:
                region = (access.first, access.end)
            bounds = dict(first=region[0], end=region[1], explicit_region=True) if region is not None else {}
            out.append(PageTable(derived, access.arg, (Buffer(state.key, 1),), access.page_size, lengths=lengths,
                                 lengths_arg=access.lengths_arg, length_offset=access.length_offset,
                                 window_left=-1 if window_left is None else int(window_left), q_len=int(q_len),
                                 tile=1, index_of=index_of, guard=0, only=_PAGE_FINDINGS,
                                 relabel=_slot_not_allocated if slots else _not_allocated,
                                 reported_as="page-not-allocated", **bounds))
        return out

    def _read_list(self, access: CsrPages, tensors, q_len: int) -> list:
        """A CSR list's derived list: what each live entry holds, + 1, where its page is not allocated."""
        with self.lock:
            state = next(filter(None, map(self.pool_of, tensors)), None)
            if state is None or state.state.device != access.indices.device:
                return []
            per_page = state.page_size if access.unit == "slot" else 1
            derived = not_allocated_entries(access.indptr, access.indices, state.state[:state.pages], per_page, q_len,
                                            rows=int(access.indptr.shape[0]) - 1)
            self._note_read(derived)
        return [CsrPages(access.indptr, derived, (Buffer(state.key, 1),), indptr_arg=access.indptr_arg,
                         indices_arg=access.indices_arg, guard=0, only=_PAGE_FINDINGS, unit=access.unit,
                         relabel=_slot_not_allocated if access.unit == "slot" else _not_allocated,
                         reported_as="page-not-allocated")]

    def _note_read(self, tensor) -> None:
        if tensor.is_cuda and not torch.cuda.is_current_stream_capturing():
            self.read_streams[tensor.device.index] = torch.cuda.current_stream(tensor.device)

    def explain(self, state: PoolState, page: int, arg: str, index: tuple, row: int, col: int,
                slot: Optional[int] = None) -> str:
        """What a read of a page that is not allocated means (reads the page's state: a sync on a
        CUDA pool, done when the finding is reported, never in the checked call). ``slot``: the
        entry is that token slot (a slot list: ``col`` is a token), not the page."""
        status, sid = _read_back(state, page)
        page_size = state.page_size
        if slot is not None:
            tokens = f"slot-list entry {col}"
        elif page_size > 1:
            tokens = f"tokens {col * page_size}..{(col + 1) * page_size - 1}"
        else:
            tokens = f"token {col}"
        if status == FREED:
            what = (f"page {page} is FREE: released to {state.describe()} and not allocated since, "
                    f"yet the kernel reads it (row {row}'s {tokens}) - a KV use-after-free; the memory is still "
                    f"there, so nothing else reports it and the row's attention output is silently wrong.\n"
                    f"    freed by (most recent call last):\n{self.format_stack(sid)}")
        elif status == ALLOCATED:
            what = (f"page {page} of {state.describe()} was not allocated when the kernel read it (row {row}'s "
                    f"{tokens}; allocated again by the time this is reported, e.g. at a graph replay's flush)"
                    + (f".\n    last freed by (most recent call last):\n{self.format_stack(sid)}" if sid >= 0
                       else ""))
        elif page == 0:
            what = (f"page 0 is SGLang's padding page (never handed out) in {state.describe()}, yet the kernel "
                    f"reads it (row {row}'s {tokens}; not a graph-padding row, which reads page 0 at "
                    f"length <= q_len + 1): a table entry that was never written, or a slot whose "
                    f"full->SWA mapping was cleared (freed) while this row still attends to it")
        else:
            what = (f"page {page} of {state.describe()} is not allocated (free since tracking started, "
                    f"no free seen), yet the kernel reads it (row {row}'s {tokens})")
        entry = f"{page}" if slot is None else f"slot {slot}" + (f" (page {page})" if page_size > 1 else "")
        return f"{arg}[{', '.join(map(str, index))}] = {entry}: {what}"


_PAGE_FINDINGS = frozenset({"page-out-of-range"})


def _read_back(state: PoolState, page: int) -> tuple:
    """``(status, free stack id)`` of ``page``, for a report. On a CUDA pool this reads the device
    (a sync, on the reporting path only: never while a graph is being captured, since device
    records are read after replays), with a sync-debug mode the user set left out of it."""
    cuda = state.state.is_cuda
    previous = torch.cuda.get_sync_debug_mode() if cuda else 0
    if previous:
        torch.cuda.set_sync_debug_mode(0)
    try:
        return int(state.state[page]), int(state.stack[page])
    finally:
        if previous:
            torch.cuda.set_sync_debug_mode(previous)


def _not_allocated(finding: Violation, buffers) -> Violation:
    """A derived table's finding (value ``page + 1`` at the reading row and column) as the
    ``page-not-allocated`` it stands for."""
    ref = tracker.by_key.get(buffers[0].name)
    state = ref() if ref is not None else None
    page = int(finding.value) - 1
    index = finding.index
    examples = tuple((i, int(v) - 1) for i, v in finding.examples)
    if state is None:  # the pool is gone (its allocator was freed) by the time this is reported
        text = f"{finding.arg}[{', '.join(map(str, index))}] = {page}: the page was not allocated when read"
    else:
        text = tracker.explain(state, page, finding.arg, index, index[0], index[-1])
    return Violation("page-not-allocated", finding.arg, text, index=index, value=page, bound="allocated",
                     count=finding.count, examples=examples)


_MARK_BLOCK = 1024
_mark_launchers: dict = {}  # (device, ids dtype, ids 16-byte aligned, with a stack) -> compiled kernel


_kernels_module: list = []


def _kernels():
    """:mod:`tsan_paged.kernels` if Triton is there, else None (imported at first use: Triton's
    import is not paid at the sanitizer's start)."""
    if not _kernels_module:
        from . import kernels

        _kernels_module.append(kernels if kernels.available() else None)
    return _kernels_module[0]


def _launch_mark(pool: PoolState, ids, status: int, sid: Optional[int], per_page: int, stream: int) -> None:
    """Triton's ``mark`` kernel (``kernels._mark_src``) on raw ``stream``: after the first launch,
    through the compiled kernel's own launcher (no Triton Python launcher: a few microseconds)."""
    n = ids.numel()
    if n == 0:
        return
    grid = -(-n // _MARK_BLOCK)
    has_stack = sid is not None
    pointer = ids.data_ptr()
    key = (ids.device.index, ids.dtype, pointer % 16 == 0, has_stack)
    compiled = _mark_launchers.get(key)
    if compiled is not None:
        compiled.run(grid, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, pointer,
                     *pool.pointers, n, per_page, pool.pages, status, sid if has_stack else 0,
                     _MARK_BLOCK, has_stack)  # the launcher takes the constexprs too
        return
    with torch.cuda.stream(torch.cuda.ExternalStream(stream, device=ids.device)):
        compiled = _kernels().kernel("mark", False)[(grid,)](ids, pool.state, pool.stack, n, per_page, pool.pages,
                                                              status, sid if has_stack else 0, BLOCK=_MARK_BLOCK,
                                                              HAS_STACK=has_stack)
    if getattr(compiled, "packed_metadata", None) is not None and hasattr(compiled, "function"):
        _mark_launchers[key] = compiled


def _slot_not_allocated(finding: Violation, buffers) -> Violation:
    """A derived slot list's finding (value ``slot + 1``) as the ``page-not-allocated`` it stands for."""
    ref = tracker.by_key.get(buffers[0].name)
    state = ref() if ref is not None else None
    slot = int(finding.value) - 1
    index = finding.index
    examples = tuple((i, int(v) - 1) for i, v in finding.examples)
    if state is None:
        text = f"{finding.arg}[{', '.join(map(str, index))}] = {slot}: the slot's page was not allocated when read"
    else:
        text = tracker.explain(state, slot // state.page_size, finding.arg, index, index[0], index[-1], slot=slot)
    return Violation("page-not-allocated", finding.arg, text, index=index, value=slot, bound="allocated",
                     count=finding.count, examples=examples)


_capture_buffers: dict = {}  # (table address, shape, strides, device) -> a derived table made in a capture


def _capture_buffer(table, shape):
    """The derived table of ``table`` while a CUDA graph is being captured: one per static table
    (and shape), shared by every captured call that reads it and kept for the process (the
    graphs captured with it write it at every replay); None outside a capture."""
    if not torch.cuda.is_current_stream_capturing():
        return None
    key = (table.data_ptr(), tuple(table.shape), tuple(table.stride()), table.device.index)
    out = _capture_buffers.get(key)
    if out is None:
        out = _capture_buffers[key] = torch.empty(shape, dtype=torch.int32, device=table.device)
    return out


def not_allocated_entries(indptr, indices, state, per_page: int, q_len: int, rows: int, interpret: bool = False):
    """The derived list of a CSR list: ``entry + 1`` where the page of an entry
    (``entry // per_page``) is not ALLOCATED, else 0, for the live entries
    ``[indptr[0], indptr[rows])``. A graph-padding row (at most ``q_len + 1`` entries,
    SGLang's padding slot 0) is told apart by its row's length, found by a search of ``indptr``.
    On CUDA (``interpret``: the same kernel under Triton's interpreter) one Triton launch over the
    live entries; in a capture the list is made once per static buffer (SGLang's graph
    ``kv_indices`` is sized for the largest batch and context, and shared by every layer and
    batch size). On a CPU, torch ops. No host sync either way."""
    if (indices.is_cuda or interpret) and _kernels() is not None:
        flat = indices.reshape(-1)
        n = flat.numel()
        out = _capture_buffer(flat, (n,)) if flat.is_cuda else None
        if out is None:
            out = torch.empty(n, dtype=torch.int32, device=flat.device)
        if n:
            _kernels().kernel("not_allocated_list", interpret)[(-(-n // BLOCK),)](
                flat, indptr, state, out, n, rows, per_page, state.shape[0], q_len + 1, BLOCK=BLOCK,
                SEARCH_STEPS=max(rows, 1).bit_length() + 1)
        return out
    entries = indices.reshape(-1).to(torch.int64)
    bounds = indptr.to(torch.int64)
    rows = bounds.numel() - 1
    row = (torch.searchsorted(bounds, torch.arange(entries.numel(), device=entries.device), right=True) - 1)
    row_len = (bounds[1:] - bounds[:-1])[row.clamp(0, max(rows - 1, 0))] if rows > 0 else torch.zeros_like(entries)
    pages = torch.div(entries, per_page, rounding_mode="floor")
    got = state[pages.clamp(0, state.shape[0] - 1)]
    padding = (pages == 0) & (row_len <= q_len + 1)
    bad = (got != ALLOCATED) & (pages >= 0) & (pages < state.shape[0]) & ~padding
    return torch.where(bad, entries + 1, 0).to(torch.int32)


BLOCK = 1024


def not_allocated(table, lengths, state, q_len: int, interpret: bool = False):
    """The derived table of ``table [rows, W]`` (module docstring): ``page + 1`` where
    ``state[page]`` is not ALLOCATED (a page of the pool, not a graph-padding read), else 0.
    One Triton launch on a CUDA table (``interpret``: the same kernel under Triton's interpreter;
    in a capture the table is made once per static table and shape, which every layer shares),
    torch ops on a CPU one; no host sync either way."""
    rows, width = table.shape
    if table.is_cuda or interpret:
        kernels = _kernels()
        if kernels is not None:
            out = _capture_buffer(table, (rows, width)) if table.is_cuda else None
            if out is None:
                out = torch.empty((rows, width), dtype=torch.int32, device=table.device)
            n = rows * width
            if n:
                kernels.kernel("not_allocated", interpret)[(-(-n // BLOCK),)](
                    table, lengths.contiguous(), state, out, n, width, table.stride(0), table.stride(1),
                    state.shape[0], q_len + 1, BLOCK=BLOCK)
            return out
    entries = table.to(torch.int64)
    pages = state.shape[0]
    got = state[entries.clamp(0, pages - 1)]  # one gather of the state at the table
    bad = (got != ALLOCATED) & (entries >= 0) & (entries < pages) & ~_padding(entries, lengths, q_len)
    return torch.where(bad, entries + 1, 0).to(torch.int32)


def not_allocated_slots(table, lengths, state, per_page: int, q_len: int):
    """:func:`not_allocated` for a table of token slots (page ``slot // per_page``): ``slot + 1``
    where the slot's page is not allocated, else 0; torch ops (no host sync)."""
    entries = table.to(torch.int64)
    pages = torch.div(entries, per_page, rounding_mode="floor")
    got = state[pages.clamp(0, state.shape[0] - 1)]
    bad = (got != ALLOCATED) & (entries >= 0) & (pages < state.shape[0]) & ~_padding(pages, lengths, q_len)
    return torch.where(bad, entries + 1, 0).to(torch.int32)


def _padding(entries, lengths, q_len: int):
    """Entries of CUDA-graph padding rows, which read SGLang's padding page by design.

    SGLang's graph runner pads a batch to a captured size with rows whose ``req_pool_indices``
    is 0 and whose ``seq_lens`` is the backend's fill value, 1 (``cuda_graph_buffer_registry.py``:
    ZERO / FILL_SENTINEL; ``get_cuda_graph_seq_len_fill_value``); a target-verify row then reads
    ``1 + q_len`` tokens. Row 0 of ``req_to_token`` is reserved and never written ("+1 padding row
    at index 0", ``memory_pool.py``), so every entry such a row reads is page 0, directly or
    through ``full_to_swa_index_mapping[0] = 0``. So a read of page 0 by a row of length
    ``<= q_len + 1`` is not reported. A live row reads at least the page of the token it decodes,
    allocated for this step, and is longer than ``q_len + 1`` once its prompt is more than a
    token: a live row whose SWA mapping a free cleared reads page 0 at a longer length, and is
    reported.
    """
    return (entries == 0) & (lengths.to(entries.device, torch.int64) <= q_len + 1)[:, None]


def _make_wrapper(tracker: PageTracker, cls, name: str, kind: str, original):
    if kind == "alloc":
        def wrapper(self, *args, **kwargs):
            state = tracker.pool(self)
            out = original(self, *args, **kwargs)
            if state is not None and out is not None:
                found = tracker.on_alloc(self, state, name, out)
                if found:
                    _report(found)
            return out
    elif kind == "free_tokens":
        def wrapper(self, free_index, *args, **kwargs):
            state = tracker.pool(self)
            out = original(self, free_index, *args, **kwargs)
            if state is not None and self.free_group is None and free_index.numel():
                tracker.on_release(state, (free_index,), tracker.stack_id())
            return out
    elif kind == "release_pages":
        def wrapper(self, *page_ids):
            state = tracker.pool(self)
            out = original(self, *page_ids)
            if state is not None:
                tracker.on_release(state, page_ids, tracker.stack_id())
            return out
    elif kind == "clear":
        def wrapper(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            if tracker._shadowed(self):
                tracker.on_clear(self, tracker.stack_id())
            return out
    else:  # adopt: an SWA allocator names its sub-allocators
        def wrapper(self, *args, **kwargs):
            if self not in tracker._named:
                tracker._named.add(self)
                tracker.adopt_parent(self)
            return original(self, *args, **kwargs)

    wrapper.__name__ = getattr(original, "__name__", name)
    wrapper.__qualname__ = getattr(original, "__qualname__", name)
    wrapper.__doc__ = getattr(original, "__doc__", None)
    wrapper.__wrapped__ = original
    wrapper.__tsan_paged_original__ = original
    return wrapper


def _report(found: list) -> None:
    """An allocator finding: reported through the sanitizer that started tracking last (of those
    still tracking), acted on by its mode."""
    sink = tracker.sinks[-1] if tracker.sinks else None
    if sink is not None:
        caller, stack = _allocator_caller()
        sink.report_found([v.replace(caller=caller, stack=stack) for v in found])


def _allocator_caller():
    """The first frame outside tsan_paged and SGLang's allocator package, and the stack."""
    package = sys.modules.get("sglang.srt.mem_cache.allocator")
    inside = (os.path.dirname(package.__file__),) if getattr(package, "__file__", None) else ()
    caller, _ = describe(caller_frame(inside, depth=2))
    _, stack = describe(caller_frame((), depth=2))  # from the allocator's own frame up
    return caller, stack


tracker = PageTracker()


def start(sanitizer) -> PageTracker:
    """Start shadowing (reference-counted over sanitizers); sets ``sanitizer.options.page_tracker``.
    Allocator findings go to ``sanitizer.report_found`` while it is the last one started."""
    tracker.start()
    tracker.sinks.append(sanitizer)
    sanitizer.options.page_tracker = tracker
    return tracker


def stop(sanitizer) -> None:
    if getattr(sanitizer.options, "page_tracker", None) is None:
        return
    sanitizer.options.page_tracker = None
    if sanitizer in tracker.sinks:
        tracker.sinks.remove(sanitizer)
    tracker.stop()


def enabled(call) -> bool:
    """Whether page tracking is on for this call (its rule must run :func:`check_read_pages`)."""
    page_tracker = getattr(call.options, "page_tracker", None)
    return page_tracker is not None and page_tracker.active


def check_read_pages(call, access, tensors, window_left=None, q_len=None, region=None, slots=False) -> list:
    """The ``page-not-allocated`` check of a read's :class:`~tsan_paged.access.PageTable` or
    :class:`~tsan_paged.access.CsrPages` (``[]`` unless tracking): derived tables the engine
    checks (no host sync, in CUDA graphs too); ``tensors`` the KV buffer each view of the table
    indexes (``(k, v)``, in order; a CSR list: any of its buffers). ``window_left`` / ``q_len``:
    the kernel's exact window and query rows where the call's arguments do not name them;
    ``region``: per-row ``(first, end)`` columns read, where rows differ in query rows (default:
    the access's own explicit region); ``slots``: a dense table of token slots, not pages."""
    if not enabled(call):
        return []
    return call.options.page_tracker.read_accesses(call, access, tensors, window_left, q_len, region, slots)
