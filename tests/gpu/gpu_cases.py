"""One checked call per built-in rule (and a TOML and a Python rule), for CUDA-graph tests and benchmarks.

Each case builds valid inputs the way its library builds them, a ``call()`` that makes the real
call (capturable: no host sync), and ``plant()``, which writes one fault into the tensors the
call reads, in place (so a captured graph reads it at its next replay), and returns the finding
expected: ``(check, index, value, bound)``.

Real libraries where they run on an H200 (sm90): FlashInfer's xqa decode (through
``trtllm_batch_decode_with_kv_cache``, ``xqa_batch_decode_with_kv_cache`` and ``xqa``), its
paged decode wrapper in CUDA-graph mode, ``append_paged_kv_cache``. Stand-ins where they do not
install (vLLM, flash-attn): the ops and function are registered here under their real names
and schemas (vLLM's ``csrc/torch_bindings.cpp``, flash-attn 2.8.3's ``flash_attn_interface.py``)
with CUDA implementations in torch that read through the table as their kernels do; the rules
are the built-in ones, untouched. Not run: FlashInfer's MLA decode and trtllm context kernels
(trtllm-gen / sm100-sm120 only); their rules use the same dense-table kernel as the decode rule.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

PAGE, KV_HEADS, QO_HEADS, HEAD_DIM = 64, 8, 32, 128


@dataclass
class Case:
    name: str
    call: Callable  # the checked call, as a program makes it
    plant: Callable  # () -> (check, index, value, bound)
    config: Optional[dict] = None  # PagedSanitizer(config=...) for the case (a TOML rule)
    registry: object = None  # PagedSanitizer(registry=...) (a Python rule)
    state: dict = field(default_factory=dict)
    guarded: bool = True  # a guard value is safe: a fault planted into a graph is rewritten before the kernel


def _kv(pages, dev, dtype=torch.bfloat16, layout="HND", seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    shape = (pages, KV_HEADS, PAGE, HEAD_DIM) if layout == "HND" else (pages, PAGE, KV_HEADS, HEAD_DIM)
    return (torch.randn(shape, generator=g, device=dev, dtype=dtype),
            torch.randn(shape, generator=g, device=dev, dtype=dtype))


def _decode_batch(dev, batch=8, ctx=2048, pages=4000, seed=0):
    """A decode batch: lengths in (ctx/2, ctx], tables a little wider than a row needs."""
    g = torch.Generator(device=dev).manual_seed(seed + 1)
    width = math.ceil(ctx / PAGE) + 2
    lens = torch.randint(ctx // 2, ctx + 1, (batch,), generator=g, device=dev).to(torch.int32)
    table = torch.randint(0, pages, (batch, width), generator=g, device=dev, dtype=torch.int32)
    query = torch.randn(batch, QO_HEADS, HEAD_DIM, generator=g, device=dev, dtype=torch.bfloat16)
    return table, lens, query, width


def _seed_plant(table, lens, pages, row=5):
    """The seed's one-past-the-end, on a column the row reads."""
    width = table.shape[1]
    lens[row] = (width - 2) * PAGE
    table[row, width - 3] = pages
    return ("page-out-of-range", (row, width - 3), pages, pages)


_WORKSPACE: dict = {}


def workspace(dev):
    if dev not in _WORKSPACE:
        _WORKSPACE[dev] = torch.zeros(256 * 1024 * 1024, dtype=torch.uint8, device=dev)
    return _WORKSPACE[dev]


# -- FlashInfer ---------------------------------------------------------------------------------

def trtllm_decode(dev="cuda") -> Case:
    import flashinfer.decode

    pages = 4000
    k, v = _kv(pages, dev)
    table, lens, query, width = _decode_batch(dev, pages=pages)
    out = torch.empty_like(query)
    kwargs = dict(query=query, kv_cache=(k, v), workspace_buffer=workspace(dev), block_tables=table, seq_lens=lens,
                  max_seq_len=width * PAGE, bmm1_scale=1 / math.sqrt(HEAD_DIM), kv_layout="HND", out=out)
    return Case("flashinfer.decode.trtllm_batch_decode_with_kv_cache",
                lambda: flashinfer.decode.trtllm_batch_decode_with_kv_cache(**kwargs),
                lambda: _seed_plant(table, lens, pages), state=kwargs)


def xqa_decode(dev="cuda") -> Case:
    import flashinfer.decode

    pages = 4000
    k, v = _kv(pages, dev, seed=1)
    table, lens, query, width = _decode_batch(dev, pages=pages, seed=1)
    out = torch.empty_like(query)
    kwargs = dict(query=query, kv_cache=(k, v), workspace_buffer=workspace(dev), block_tables=table, seq_lens=lens,
                  max_seq_len=width * PAGE, bmm1_scale=1 / math.sqrt(HEAD_DIM), kv_layout="HND", out=out)

    def plant():
        table[3, 1] = -7
        return ("page-out-of-range", (3, 1), -7, pages)

    return Case("flashinfer.decode.xqa_batch_decode_with_kv_cache",
                lambda: flashinfer.decode.xqa_batch_decode_with_kv_cache(**kwargs), plant, state=kwargs)


def xqa_raw(dev="cuda") -> Case:
    import flashinfer.decode  # noqa: F401  (imports flashinfer.xqa)

    module = sys.modules["flashinfer.xqa"]  # looked up at call time, as FlashInfer's own caller does
    pages = 4000
    k, v = _kv(pages, dev, seed=2)
    table, lens, query, width = _decode_batch(dev, pages=pages, seed=2)
    out = torch.empty_like(query)
    ws = workspace(dev)
    # as xqa_batch_decode_with_kv_cache calls it (flashinfer/decode.py)
    args = dict(q=query.unsqueeze(1), k_cache=k, v_cache=v, page_table=table, seq_lens=lens.unsqueeze(1),
                output=out.unsqueeze(1), workspace_buffer=ws[8 * 1024 * 1024:], semaphores=ws[:8 * 1024 * 1024],
                num_kv_heads=KV_HEADS, page_size=PAGE, q_scale=1.0, kv_scale=1.0, kv_layout="HND")

    def plant():
        table[6, 2] = pages + 3
        return ("page-out-of-range", (6, 2), pages + 3, pages)

    return Case("flashinfer.xqa.xqa", lambda: module.xqa(**args), plant, state=args)


def _csr_list(pages, batch, per_row, seed):
    """A CSR page list on the host as FlashInfer's tests build one: ``(counts, indptr, indices,
    last_page_len)``, distinct pages, last pages holding 1..PAGE tokens."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    counts = torch.randint(per_row[0], per_row[1] + 1, (batch,), generator=g)
    indptr = torch.zeros(batch + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(counts, 0)
    indices = torch.randperm(pages, generator=g)[:int(indptr[-1])].to(torch.int32)
    last = torch.randint(1, PAGE + 1, (batch,), generator=g, dtype=torch.int32)
    return counts, indptr, indices, last


def decode_wrapper(dev="cuda") -> Case:
    """BatchDecodeWithPagedKVCacheWrapper in CUDA-graph mode: plan (eager), run (captured)."""
    import flashinfer.decode

    pages, batch = 3000, 8
    k, v = _kv(pages, dev, seed=3)
    _, indptr, indices, last = _csr_list(pages, batch, (8, 32), seed=3)
    buffers = dict(paged_kv_indptr_buffer=torch.zeros(batch + 1, dtype=torch.int32, device=dev),
                   paged_kv_indices_buffer=torch.zeros(batch * 40, dtype=torch.int32, device=dev),
                   paged_kv_last_page_len_buffer=torch.zeros(batch, dtype=torch.int32, device=dev))
    wrapper = flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper(
        torch.zeros(128 * 1024 * 1024, dtype=torch.uint8, device=dev), "HND", use_cuda_graph=True, **buffers)
    wrapper.plan(indptr, indices, last, QO_HEADS, KV_HEADS, HEAD_DIM, PAGE, q_data_type=torch.bfloat16,
                 kv_data_type=torch.bfloat16)
    query = torch.randn(batch, QO_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    out = torch.empty_like(query)

    def plant():  # into the buffer the captured run reads (plan copied the indices there)
        position = int(indptr[4]) + 1
        wrapper._paged_kv_indices_buf[position] = pages
        return ("page-out-of-range", (4, 1), pages, pages)

    return Case("BatchDecodeWithPagedKVCacheWrapper.run", lambda: wrapper.run(query, (k, v), out=out), plant,
                state=dict(wrapper=wrapper))


def append_kv(dev="cuda") -> Case:
    import flashinfer.page

    pages, batch = 2000, 6
    k, v = _kv(pages, dev, seed=4)
    counts, indptr, indices, last = _csr_list(pages, batch, (2, 5), seed=4)
    kv_len = (counts - 1) * PAGE + last
    new = torch.full((batch,), 3)  # each request appends its last 3 tokens
    batch_indices = torch.repeat_interleave(torch.arange(batch), new).to(torch.int32)
    positions = torch.cat([torch.arange(n - 3, n) for n in kv_len.tolist()]).to(torch.int32)
    nnz = batch_indices.numel()
    append = torch.randn(nnz, KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    args = dict(append_key=append, append_value=append.clone(), batch_indices=batch_indices.to(dev),
                positions=positions.to(dev), paged_kv_cache=(k, v), kv_indices=indices.to(dev),
                kv_indptr=indptr.to(dev), kv_last_page_len=last.to(dev), kv_layout="HND")

    def plant():  # token 0 (request 0, its last page) is written through kv_indices[indptr[0] + col]
        col = int(positions[0]) // PAGE
        args["kv_indices"][int(indptr[0]) + col] = pages + 1
        return ("page-out-of-range", (0, col), pages + 1, pages)

    return Case("flashinfer.page.append_paged_kv_cache", lambda: flashinfer.page.append_paged_kv_cache(**args),
                plant, state=args, guarded=False)


# -- a TOML rule and a Python rule on a torch.library op with a CUDA kernel -----------------------

_LIB = None


def _paged_gather(kv_pages, block_table, seq_lens, page_size):
    """Each row's tokens through its table, live tokens only (as a paged kernel reads)."""
    batch, width = block_table.shape
    tokens = torch.arange(width * page_size, device=block_table.device)
    pages = block_table[:, tokens // page_size].long()
    live = tokens < seq_lens.unsqueeze(1)
    gathered = kv_pages[pages.where(live, 0), tokens % page_size]
    return gathered * live.unsqueeze(-1)


def _library():
    global _LIB
    if _LIB is None:
        _LIB = torch.library.Library("tsan_gpu", "DEF")
        for name in ("paged_gather", "paged_gather_py"):
            _LIB.define(f"{name}(Tensor kv_pages, Tensor block_table, Tensor seq_lens, int page_size) -> Tensor")
            for key in ("CPU", "CUDA"):
                _LIB.impl(name, _paged_gather, key)
    return _LIB


def _gather_inputs(dev, seed):
    g = torch.Generator(device=dev).manual_seed(seed)
    kv = torch.randn(500, 16, 8, generator=g, device=dev)
    table = torch.randint(0, 500, (16, 12), generator=g, device=dev, dtype=torch.int32)
    lens = torch.randint(1, 12 * 16 + 1, (16,), generator=g, device=dev, dtype=torch.int32)
    lens[2] = 100  # row 2 reads 7 pages
    return kv, table, lens


def toml_rule_op(dev="cuda") -> Case:
    _library()
    kv, table, lens = _gather_inputs(dev, 5)
    config = {"rule": [dict(target="tsan_gpu::paged_gather", table="block_table", lengths="seq_lens",
                            buffers=["kv_pages"], page_size="page_size")]}

    def plant():
        table[2, 6] = 500
        return ("page-out-of-range", (2, 6), 500, 500)

    return Case("[[rule]] tsan_gpu::paged_gather", lambda: torch.ops.tsan_gpu.paged_gather(kv, table, lens, 16),
                plant, config=config, state=dict(kv=kv, table=table, lens=lens))


def python_rule_op(dev="cuda") -> Case:
    """A Python rule written with the documented primitives (README, "Add a rule for your kernel")."""
    from tsan_paged import checks
    from tsan_paged.registry import Registry, rule

    _library()
    registry = Registry()

    @rule("tsan_gpu::paged_gather_py", reads=("kv_pages", "block_table", "seq_lens", "page_size"), registry=registry)
    def paged_gather_rule(call):
        table, lengths, page_size = call["block_table"], call["seq_lens"], call["page_size"]

        def region():  # row b reads its first ceil(seq_lens[b] / page_size) pages
            return None, checks.ceil_div(lengths.long(), page_size).clamp(max=table.shape[1])

        return (checks.check_lengths_fit(lengths, "seq_lens", checks.length_bounds(lengths), page_size,
                                         table.shape[1], "block_table")
                + checks.check_pages_in_range(table, "block_table", call["kv_pages"].shape[0], "kv_pages", region))

    kv, table, lens = _gather_inputs(dev, 6)

    def plant():
        table[2, 0] = -1
        return ("page-out-of-range", (2, 0), -1, 500)

    return Case("Python rule tsan_gpu::paged_gather_py",
                lambda: torch.ops.tsan_gpu.paged_gather_py(kv, table, lens, 16), plant, registry=registry,
                state=dict(kv=kv, table=table, lens=lens))


# -- vLLM's ops (stand-ins with vLLM's schemas and CUDA kernels in torch) ------------------------

_VLLM = None


def _vllm_ops():
    """vLLM's ``_C::paged_attention_v1`` and ``_C_cache_ops::reshape_and_cache_flash``: schemas from
    csrc/torch_bindings.cpp (as tests/vllm_ops.py defines them), CUDA kernels written here."""
    global _VLLM
    if _VLLM is not None:
        return
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import vllm_ops  # noqa: F401  (the schemas and CPU kernels)

    def paged_attention_v1(out, query, key_cache, value_cache, num_kv_heads, scale, block_tables, seq_lens,
                           block_size, max_seq_len, *unused):
        num_blocks, heads, d_x, bs, x = key_cache.shape
        keys = key_cache.permute(0, 3, 1, 2, 4).reshape(num_blocks * bs, heads, d_x * x)
        values = value_cache.permute(0, 3, 1, 2).reshape(num_blocks * bs, heads, -1)
        width = block_tables.shape[1]
        tokens = torch.arange(width * block_size, device=query.device)
        live = tokens < seq_lens.unsqueeze(1)
        slots = (block_tables[:, tokens // block_size].long() * block_size + tokens % block_size).where(live, 0)
        group = query.shape[1] // num_kv_heads
        k = keys[slots].repeat_interleave(group, dim=2)  # [B, T, Hq, D]
        vv = values[slots].repeat_interleave(group, dim=2)
        scores = torch.einsum("bhd,bthd->bht", query.float(), k.float()) * scale
        scores = scores.masked_fill(~live.unsqueeze(1), float("-inf"))
        out.copy_(torch.einsum("bht,bthd->bhd", scores.softmax(-1), vv.float()).to(out.dtype))

    def reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale):
        tokens = slot_mapping.shape[0]
        pad = slot_mapping < 0
        slots = slot_mapping.clamp(min=0).long()
        kc = key_cache.view(-1, *key_cache.shape[2:])
        vc = value_cache.view(-1, *value_cache.shape[2:])
        kc.index_copy_(0, slots, torch.where(pad[:, None, None], kc[slots], key[:tokens]))
        vc.index_copy_(0, slots, torch.where(pad[:, None, None], vc[slots], value[:tokens]))

    from vllm_ops import _C, _CACHE

    _C.impl("paged_attention_v1", paged_attention_v1, "CUDA")
    _CACHE.impl("reshape_and_cache_flash", reshape_and_cache_flash, "CUDA")
    _VLLM = True


def vllm_paged_attention(dev="cuda") -> Case:
    _vllm_ops()
    g = torch.Generator(device=dev).manual_seed(7)
    blocks, bs, heads, d, x = 300, 16, 2, 16, 8
    key_cache = torch.randn(blocks, heads, d // x, bs, x, generator=g, device=dev)
    value_cache = torch.randn(blocks, heads, d, bs, generator=g, device=dev)
    table = torch.randint(0, blocks, (6, 10), generator=g, device=dev, dtype=torch.int32)
    lens = torch.randint(1, 160, (6,), generator=g, device=dev, dtype=torch.int32)
    lens[1] = 90  # 6 blocks
    query = torch.randn(6, 4, d, generator=g, device=dev)
    out = torch.empty_like(query)
    one = torch.ones((), device=dev)

    def plant():
        table[1, 5] = blocks + 2
        return ("page-out-of-range", (1, 5), blocks + 2, blocks)

    return Case("vLLM _C::paged_attention_v1", lambda: torch.ops._C.paged_attention_v1(
        out, query, key_cache, value_cache, heads, 0.25, table, lens, bs, 160, None, "auto", one, one, 0, 0, 0, 64,
        0), plant, state=dict(table=table))


def vllm_reshape_and_cache(dev="cuda") -> Case:
    _vllm_ops()
    g = torch.Generator(device=dev).manual_seed(8)
    blocks, bs, heads, d = 200, 16, 2, 16
    key_cache = torch.zeros(blocks, bs, heads, d, device=dev)
    value_cache = torch.zeros_like(key_cache)
    slots = torch.randperm(blocks * bs, generator=g, device=dev)[:24]
    slots[20:] = -1  # CUDA-graph padding
    key = torch.randn(32, heads, d, generator=g, device=dev)  # more rows than slots: padding too
    one = torch.ones((), device=dev)

    def plant():
        slots[3] = blocks * bs
        return ("page-out-of-range", (3,), blocks * bs, blocks * bs)

    return Case("vLLM _C_cache_ops::reshape_and_cache_flash", lambda: torch.ops._C_cache_ops.reshape_and_cache_flash(
        key, key.clone(), key_cache, value_cache, slots, "auto", one, one), plant, state=dict(slots=slots))


# -- FlashAttention 2 (a stand-in module with flash-attn 2.8.3's signature) ---------------------

FLASH_ATTN = textwrap.dedent('''
    """flash_attn.flash_attn_interface for the GPU tests: flash-attn 2.8.3's signature, a CUDA
    implementation in torch of the paged path (reads each row's pages through block_table)."""
    from typing import Optional, Union

    import torch


    def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                                cache_seqlens: Optional[Union[(int, torch.Tensor)]] = None,
                                cache_batch_idx: Optional[torch.Tensor] = None,
                                cache_leftpad: Optional[torch.Tensor] = None,
                                block_table: Optional[torch.Tensor] = None, softmax_scale=None, causal=False,
                                window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None,
                                num_splits=0, return_softmax_lse=False):
        batch, seqlen_q, heads, dim = q.shape
        num_blocks, page_size, heads_k = k_cache.shape[:3]
        width = block_table.shape[1]
        tokens = torch.arange(width * page_size, device=q.device)
        live = tokens < cache_seqlens.unsqueeze(1)
        pages = block_table[:, tokens // page_size].long().where(live, 0)
        keys = k_cache[pages, tokens % page_size].repeat_interleave(heads // heads_k, dim=2)  # [B, T, H, D]
        values = v_cache[pages, tokens % page_size].repeat_interleave(heads // heads_k, dim=2)
        scores = torch.einsum("bqhd,bthd->bhqt", q.float(), keys.float()) * (softmax_scale or dim ** -0.5)
        scores = scores.masked_fill(~live[:, None, None, :], float("-inf"))
        return torch.einsum("bhqt,bthd->bqhd", scores.softmax(-1), values.float()).to(q.dtype)
''')


def flash_attn(dev="cuda") -> Case:
    if "flash_attn.flash_attn_interface" not in sys.modules:
        root = tempfile.mkdtemp(prefix="tsan_paged_fa_")
        os.makedirs(os.path.join(root, "flash_attn"))
        with open(os.path.join(root, "flash_attn", "flash_attn_interface.py"), "w") as f:
            f.write(FLASH_ATTN)
        with open(os.path.join(root, "flash_attn", "__init__.py"), "w") as f:
            f.write("from flash_attn.flash_attn_interface import flash_attn_with_kvcache\n")
        sys.path.insert(0, root)
        importlib.invalidate_caches()
    fa = importlib.import_module("flash_attn.flash_attn_interface")
    g = torch.Generator(device=dev).manual_seed(9)
    blocks = 64
    k_cache = torch.randn(blocks, 256, 2, 32, generator=g, device=dev, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(blocks, generator=g, device=dev)[:12].to(torch.int32).reshape(3, 4)
    lens = torch.tensor([700, 256, 1000], dtype=torch.int32, device=dev)
    q = torch.randn(3, 1, 4, 32, generator=g, device=dev, dtype=torch.bfloat16)

    def plant():
        table[0, 2] = blocks
        return ("page-out-of-range", (0, 2), blocks, blocks)

    return Case("flash_attn.flash_attn_with_kvcache", lambda: fa.flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=lens, block_table=table, causal=True), plant, state=dict(table=table))


def tracked_pool(k, v, role: str):
    """A KV pool shadowed by track_pages for the cache ``(k, v)`` (pages of 64 tokens), every page
    allocated: ``(tracker, allocator, PoolState)``. SGLang's allocators do not run on the GPU
    machine; the tracker's entry points they call (``on_alloc``, ``on_release``) are called on
    this stand-in for the allocator object, of which PoolState reads ``page_size``, ``size``, ``device``."""
    import weakref

    from tsan_paged import tracking

    class Pool:
        page_size = PAGE

    tracker = tracking.tracker
    pool = Pool()
    pool.size, pool.device = (k.shape[0] - 1) * PAGE, k.device
    state = tracking.PoolState(pool, role)
    tracker.by_key[state.key] = weakref.ref(state)
    for buffer in (k, v):
        tracker.by_storage[buffer.untyped_storage().data_ptr()] = weakref.ref(state)
    tracker.on_alloc(pool, state, "alloc", torch.arange(0, k.shape[0] * PAGE, PAGE, device=k.device))
    return tracker, pool, state


CASES = {f.__name__: f for f in (trtllm_decode, xqa_decode, xqa_raw, decode_wrapper, append_kv, toml_rule_op,
                                 python_rule_op, vllm_paged_attention, vllm_reshape_and_cache, flash_attn)}


# -- rules whose kernels do not run on sm90 (trtllm-gen, sm100/sm120): their checks alone --------

def unrunnable_calls(dev="cuda") -> dict:
    """``{target: (kwargs, plant)}``: calls of FlashInfer entry points whose kernels need
    trtllm-gen (sm100) or sm120, built with FlashInfer's shapes. The sanitizer's check of such a
    call (rule + device kernel) is what these exercise; the call itself is never made here."""
    pages, batch, width = 600, 4, 10
    g = torch.Generator(device=dev).manual_seed(11)
    table = torch.randint(0, pages, (batch, width), generator=g, device=dev, dtype=torch.int32)
    lens = torch.tensor([200, 640, 64, 390], dtype=torch.int32, device=dev)
    ws = workspace(dev)

    def plant_live():  # row 1 reads all 10 pages
        table[1, 9] = pages
        return ("page-out-of-range", (1, 9), pages, pages)

    k, v = (torch.zeros(pages, KV_HEADS, PAGE, 64, device=dev, dtype=torch.bfloat16) for _ in range(2))
    context = dict(query=torch.zeros(int(lens.sum()), QO_HEADS, 64, device=dev, dtype=torch.bfloat16), kv_cache=(k, v),
                   workspace_buffer=ws, block_tables=table, seq_lens=lens, max_q_len=640, max_kv_len=640,
                   bmm1_scale=1.0, bmm2_scale=1.0, batch_size=batch,
                   cum_seq_lens_q=torch.zeros(batch + 1, dtype=torch.int32, device=dev),
                   cum_seq_lens_kv=torch.zeros(batch + 1, dtype=torch.int32, device=dev))
    mla_cache = torch.zeros(pages, 1, PAGE, 576, device=dev, dtype=torch.bfloat16)
    mla = dict(query=torch.zeros(batch, 1, 16, 576, device=dev, dtype=torch.bfloat16), kv_cache=mla_cache,
               workspace_buffer=ws, qk_nope_head_dim=128, kv_lora_rank=512, qk_rope_head_dim=64, block_tables=table,
               seq_lens=lens, max_seq_len=width * PAGE)
    raw_cache = torch.zeros(pages, PAGE, 1, 576, device=dev, dtype=torch.float8_e4m3fn)
    xqa_mla = dict(q=torch.zeros(batch, 1, 16, 576, device=dev, dtype=torch.float8_e4m3fn), k_cache=raw_cache,
                   v_cache=raw_cache, page_table=table, seq_lens=lens.unsqueeze(1),
                   output=torch.zeros(batch, 1, 16, 512, device=dev, dtype=torch.bfloat16),
                   workspace_buffer=ws[8 * 1024 * 1024:], semaphores=ws[:8 * 1024 * 1024], page_size=PAGE)
    return {"flashinfer.prefill:trtllm_batch_context_with_kv_cache": (context, plant_live),
            "flashinfer.mla._core:trtllm_batch_decode_with_kv_cache_mla": (mla, plant_live),
            "flashinfer.mla._core:xqa_batch_decode_with_kv_cache_mla": (dict(mla), plant_live),
            "flashinfer.xqa:xqa_mla": (xqa_mla, plant_live)}


# -- the rules of issue 12, checked alone: SGLang's and vLLM's entry points do not install on the
# GPU machine, FlashInfer's cuDNN / Cake / MLA-wrapper paths need cuDNN or sm100 -------------------

def checked_alone(dev="cuda") -> dict:
    """``{label: (target, arguments, plant)}``: each rule's arguments bound by name as the
    library's signature binds them (every name the rule reads), built with the library's shapes.
    What is exercised is the sanitizer's check of the call (rule + device kernel), captured."""
    from types import SimpleNamespace

    g = torch.Generator(device=dev).manual_seed(12)
    i32 = dict(dtype=torch.int32, device=dev)
    cases = {}

    # SGLang triton decode / extend: CSR lists of token slots (over-allocated kv_indices)
    slots = 4096
    k_buffer = torch.zeros(slots, 2, 64, device=dev, dtype=torch.bfloat16)
    lens = torch.tensor([300, 17, 900, 64], **i32)
    indptr = torch.zeros(5, **i32)
    indptr[1:] = torch.cumsum(lens, 0)
    indices = torch.randint(1, slots, (int(lens.sum()) + 256,), generator=g, device=dev, dtype=torch.int64)

    def plant_slot():
        indices[300 + 5] = slots
        return ("page-out-of-range", (1, 5), slots, slots)

    q = torch.zeros(4, 8, 64, device=dev, dtype=torch.bfloat16)
    cases["sglang decode_attention_fwd"] = ("sglang.kernels.ops.attention.decode_attention:decode_attention_fwd",
                                            dict(q=q, k_buffer=k_buffer, v_buffer=k_buffer, kv_indptr=indptr,
                                                 kv_indices=indices), plant_slot)
    cases["sglang extend_attention_fwd"] = ("sglang.kernels.ops.attention.extend_attention:extend_attention_fwd",
                                            dict(q_extend=torch.zeros(8, 8, 64, device=dev), k_buffer=k_buffer,
                                                 v_buffer=k_buffer, qo_indptr=torch.tensor([0, 2, 4, 6, 8], **i32),
                                                 kv_indptr=indptr, kv_indices=indices, skip_prefix=False,
                                                 identity_kv_indices=False), plant_slot)

    # SGLang torch_native: each request's token slots, req_to_token[req_pool_indices[b], :seq_lens[b]]
    req_to_token = torch.randint(1, slots, (8, 1024), generator=g, **i32)
    req_pool_indices = torch.tensor([3, 1, 6, 2], device=dev, dtype=torch.int64)

    def plant_native():
        req_to_token[1, 5] = slots  # request 1 (req_to_token row 1) reads 17 slots: position 5 is read
        return ("page-out-of-range", (1, 5), slots, slots)

    cases["sglang torch_native decode"] = (
        "sglang.srt.layers.attention.torch_native_backend:TorchNativeAttnBackend._run_sdpa_forward_decode",
        dict(k_cache=k_buffer, v_cache=k_buffer, req_to_token=req_to_token, req_pool_indices=req_pool_indices,
             seq_lens=lens, encoder_lens=None, is_cross_attn=False), plant_native)

    # FlashAttention 3 / 4 through SGLang's wrappers, vLLM's FA and Triton unified attention
    pages, ps = 512, 16
    cache = torch.zeros(pages, ps, 2, 64, device=dev, dtype=torch.bfloat16)
    table = torch.randint(0, pages, (4, 64), generator=g, **i32)
    seqlens = torch.tensor([300, 17, 1000, 64], **i32)

    def plant_page():
        table[2, 62] = pages  # 1000 tokens: 63 pages, column 62 is read
        return ("page-out-of-range", (2, 62), pages, pages)

    fa = dict(q=q, k_cache=cache, v_cache=cache, k=None, cache_seqlens=seqlens, cache_batch_idx=None,
              cache_leftpad=None, page_table=table, cu_seqlens_q=torch.arange(5, **i32), cu_seqlens_k_new=None,
              max_seqlen_q=1, window_size=(-1, -1))
    cases["sglang fa3 flash_attn_with_kvcache"] = (
        "sglang.kernels.ops.attention.flash_attention:flash_attn_with_kvcache", dict(fa, ver=3), plant_page)
    cases["sglang fa4 flash_attn_with_kvcache"] = (
        "sglang.kernels.ops.attention.flash_attention_v4:flash_attn_with_kvcache", fa, plant_page)
    vllm_fa = dict(q=q, k=cache, v=cache, max_seqlen_q=1, cu_seqlens_q=torch.arange(5, **i32), seqused_k=seqlens,
                   window_size=None, block_table=table, fa_version=3)
    cases["vllm flash_attn_varlen_func"] = ("vllm.vllm_flash_attn.flash_attn_interface:flash_attn_varlen_func",
                                            vllm_fa, plant_page)
    cases["vllm unified_attention"] = ("vllm.v1.attention.ops.triton_unified_attention:unified_attention",
                                       dict(q=q, k=cache, v=cache, cu_seqlens_q=torch.arange(5, **i32),
                                            max_seqlen_q=1, seqused_k=seqlens, window_size=(-1, -1),
                                            block_table=table, causal=True, seq_threshold_3D=None,
                                            num_par_softmax_segments=None, softmax_segm_output=None,
                                            softmax_segm_max=None, softmax_segm_expsum=None, mm_prefix_range=None,
                                            rswa_prefix_lens=None, rswa_window=None, kv_quant_mode=None,
                                            chunk_lookback=-1, use_td=False), plant_page)

    # FlashMLA dense decode ([num_blocks, 64, 1, 576]; column 0 read at length 0)
    mla_pages = 300
    mla_table = torch.randint(0, mla_pages, (4, 20), generator=g, **i32)
    mla_lens = torch.tensor([64 * 20, 0, 65, 7], **i32)

    def plant_mla():
        mla_table[1, 0] = mla_pages
        return ("page-out-of-range", (1, 0), mla_pages, mla_pages)

    cases["flash_mla_with_kvcache"] = ("flash_mla.flash_mla_interface:flash_mla_with_kvcache",
                                       dict(q=torch.zeros(4, 1, 16, 576, device=dev, dtype=torch.bfloat16),
                                            k_cache=torch.zeros(mla_pages, 64, 1, 576, device=dev,
                                                                dtype=torch.bfloat16),
                                            block_table=mla_table, cache_seqlens=mla_lens), plant_mla)

    # KV writes: SGLang's pool (negative slots out of range), vLLM's concat_and_cache_mla (skipped)
    loc = torch.randint(1, 1024, (8,), generator=g, device=dev, dtype=torch.int64)

    def plant_loc():
        loc[6] = -1
        return ("page-out-of-range", (6,), -1, 1024 + 64)

    cases["sglang MHATokenToKVPool.set_kv_buffer"] = (
        "sglang.srt.mem_cache.memory_pool:MHATokenToKVPool.set_kv_buffer",
        dict(self=SimpleNamespace(size=1024, page_size=64), loc_info=loc), plant_loc)
    loc_2d = torch.randint(1, 1024, (4, 6), generator=g, device=dev, dtype=torch.int64)  # row b commits
    commit_lens = torch.tensor([4, 2, 3, 1], **i32)  # its first commit_lens[b] slots

    def plant_loc_2d():
        loc_2d[2, 2] = 1024 + 64
        return ("page-out-of-range", (2, 2), 1024 + 64, 1024 + 64)

    cases["sglang MHATokenToKVPool.set_kv_buffer_prefix_valid"] = (
        "sglang.srt.mem_cache.memory_pool:MHATokenToKVPool.set_kv_buffer_prefix_valid",
        dict(self=SimpleNamespace(size=1024, page_size=64), loc_2d=loc_2d, commit_lens=commit_lens), plant_loc_2d)
    slot_mapping = torch.randint(0, 64 * 16, (8,), generator=g, device=dev, dtype=torch.int64)
    slot_mapping[3] = -1

    def plant_mla_slot():
        slot_mapping[5] = 64 * 16
        return ("page-out-of-range", (5,), 64 * 16, 64 * 16)

    cases["vllm concat_and_cache_mla"] = (
        "_C_cache_ops::concat_and_cache_mla",
        dict(kv_c=torch.zeros(8, 512, device=dev), k_pe=torch.zeros(8, 64, device=dev),
             kv_cache=torch.zeros(64, 16, 576, device=dev), slot_mapping=slot_mapping, kv_cache_dtype="auto",
             scale=torch.ones(1, device=dev), skip_scale=False), plant_mla_slot)

    # FlashInfer: cuDNN decode (whole rows), the Cake routes, the MLA wrapper's run (fa2/fa3 CSR)
    hnd = torch.zeros(pages, 2, ps, 64, device=dev, dtype=torch.bfloat16)

    def plant_whole_row():
        table[1, 63] = pages  # cuDNN: the whole row counts as read
        return ("page-out-of-range", (1, 63), pages, pages)

    cases["flashinfer cudnn_batch_decode_with_kv_cache"] = (
        "flashinfer.cudnn.decode:cudnn_batch_decode_with_kv_cache",
        dict(q=q, k_cache=hnd, v_cache=hnd, max_sequence_kv=64 * ps, actual_seq_lens_kv=seqlens.view(-1, 1, 1, 1),
             block_tables=table), plant_whole_row)
    cake = dict(query=q, kv_cache=(hnd, hnd), block_tables=table, seq_lens=seqlens, max_seq_len=1000,
                kv_layout="HND")

    def plant_dcp():
        table[1, 60] = pages  # max_seq_len 1000 -> 8 blocks of 128 -> 64 columns of every row
        return ("page-out-of-range", (1, 60), pages, pages)

    cases["flashinfer trtllm decode, context parallel"] = (
        "flashinfer.decode:trtllm_batch_decode_with_kv_cache",
        dict(cake, causal_seqlens_kv_global=seqlens * 2, request_order=None), plant_dcp)
    order = torch.tensor([3, 1, 0, 2], **i32)

    def plant_order():
        order[0] = 4
        return ("page-out-of-range", (0,), 4, 4)

    cases["flashinfer trtllm decode, request_order"] = (
        "flashinfer.decode:trtllm_batch_decode_with_kv_cache",
        dict(cake, causal_seqlens_kv_global=None, request_order=order), plant_order)
    backend = SimpleNamespace(_kv_indptr_buf=indptr, _kv_indices_buf=indices, _page_size=1)
    cases["flashinfer BatchMLAPagedAttentionWrapper.run"] = (
        "flashinfer.mla._batch_mla._wrapper:BatchMLAPagedAttentionWrapper.run",
        dict(self=SimpleNamespace(_planned_backend=backend, _planned_backend_name="fa3"),
             ckv_cache=torch.zeros(slots, 1, 512, device=dev, dtype=torch.bfloat16), kv_cache=None, kv_len=None,
             page_table=None), plant_slot)
    return cases
