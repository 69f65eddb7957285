"""Drive SGLang 0.5.23's real KV pools, allocators and attention backends on a CPU: ``trtllm_mha``
(the default here), ``triton`` (``triton_backend_for``: its Triton kernels run under the
interpreter) and ``fa3`` (``fa3_backend_for``: its calls reach SGLang's FA3 wrapper). With
``TSAN_PAGED_SGLANG_DEVICE=cuda`` the same on a GPU, with its real kernels
(``benchmarks/gpu_sglang.py``).

Nothing here re-implements SGLang: it plays the scheduler's part (which requests arrive,
extend, decode, verify MTP drafts, finish) and calls SGLang's own objects to do the work:

- pools: ``ReqToTokenPool``, ``MHATokenToKVPool``, ``SWAKVPool`` (``sglang.srt.mem_cache``);
- allocators: ``TokenToKVPoolAllocator`` (page 1), ``PagedTokenToKVPoolAllocator``,
  ``SWATokenToKVPoolAllocator`` (owns ``full_to_swa_index_mapping``), called as the
  scheduler calls them (``alloc``/``alloc_extend``/``alloc_decode``, ``free``,
  ``free_swa_segment`` for tokens that left the window, ``free_full``); ``last_loc`` with
  ``sglang.srt.mem_cache.allocation.get_last_loc_torch``;
- ``KVIndexTranslator`` (what ``init_forward_metadata`` reads tables through);
- the tables: ``TRTLLMHAAttnBackend.init_forward_metadata`` itself, which fills
  ``page_table`` / ``swa_page_table`` with SGLang's Triton kernel
  ``create_trtllm_mha_kv_indices_triton`` (``build_trtllm_mha_page_table``), run by
  Triton's interpreter on a CPU (``TRITON_INTERPRET=1``, set before SGLang is imported);
- the kernel call: ``TRTLLMHAAttnBackend.forward_decode`` (decode) and ``forward_extend``
  (MTP target-verify, ``q_len_per_req`` = draft tokens), which call
  ``flashinfer.decode.trtllm_batch_decode_with_kv_cache`` from SGLang's own line.

Why the backend object is made with ``__new__`` and not its ``__init__``: the constructor
needs a whole ``ModelRunner`` (model config, a loaded model to scan its layers, server
args, CUDA platform probing, FlashInfer workspace and wrappers that need a GPU). The
driver sets the attributes ``init_forward_metadata`` / ``forward_decode`` /
``forward_extend`` read (``backend_for``) to what ``__init__`` would set for an sm90 (xqa)
GPU with a bf16 KV cache, and then runs those methods unmodified.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLASHINFER_NO_DOWNLOAD", "1")
DEVICE = os.environ.get("TSAN_PAGED_SGLANG_DEVICE", "cpu")  # "cuda": the same driver on a GPU (gpu_sglang.py)
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # SGLang's page-table kernel, on a CPU

import importlib  # noqa: E402
import random  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402

import flashinfer.decode  # noqa: E402
from batches import reaches_flashinfer  # noqa: E402
import sglang.srt.layers.attention.trtllm_mha_backend as trtllm_mha_backend  # noqa: E402
from sglang.srt.layers.attention.trtllm_mha_backend import TRTLLMHAAttnBackend  # noqa: E402
from sglang.srt.layers.radix_attention import RadixAttention  # noqa: E402
from sglang.srt.mem_cache.allocation import get_last_loc_torch  # noqa: E402
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.kv_index_translator import KVIndexTranslator  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode  # noqa: E402

# trtllm_mha_backend.py line 68: ``if is_flashinfer_available(): import flashinfer``, false
# without CUDA, so on a CPU the module has no ``flashinfer`` global and its calls
# (``flashinfer.decode.trtllm_batch_decode_with_kv_cache(...)``, looked up at call time)
# would raise NameError. Bind the global exactly as that import does on a GPU machine.
if not hasattr(trtllm_mha_backend, "flashinfer"):
    trtllm_mha_backend.flashinfer = flashinfer

HEADS, KV_HEADS, HEAD_DIM = (2, 1, 8) if DEVICE == "cpu" else (4, 1, 128)  # xqa: head_dim in [16, 512]
DTYPE = torch.bfloat16


@dataclass
class Engine:
    """One SGLang KV setup: pools, allocator, backend and the model's attention layers."""

    page_size: int
    swa: bool
    pool: object
    allocator: object
    req_to_token_pool: ReqToTokenPool
    backend: TRTLLMHAAttnBackend
    layers: list
    window: int = 0  # tokens a sliding-window layer attends to (window_left + 1)
    max_context_len: int = 0

    @property
    def req_to_token(self):
        return self.req_to_token_pool.req_to_token

    def swa_pages(self):
        """Pages of the SWA K buffer as the kernel sees them (the backend's view)."""
        return self.pool.swa_kv_pool.get_key_buffer(0).shape[0] // self.page_size


def make_engine(page_size=64, swa=False, full_tokens=64 * 160, swa_tokens=64 * 48, max_context_len=4096,
                max_reqs=48, window=256, draft_tokens=0, attention="trtllm_mha") -> Engine:
    """SGLang's pools and allocator as ``ModelRunner`` builds them, plus the backend."""
    device = DEVICE
    req_to_token_pool = ReqToTokenPool(size=max_reqs, max_context_len=max_context_len, device=device,
                                       enable_memory_saver=False)
    if swa:  # Gemma-like: layer 0 sliding-window, layer 1 full attention
        pool = SWAKVPool(size=full_tokens, size_swa=swa_tokens, page_size=page_size, dtype=DTYPE,
                         head_num=KV_HEADS, head_dim=HEAD_DIM, swa_attention_layer_ids=[0],
                         full_attention_layer_ids=[1], device=device, enable_memory_saver=False)
        allocator = SWATokenToKVPoolAllocator(full_tokens, swa_tokens, page_size, DTYPE, device, pool,
                                              need_sort=False)
    else:
        pool = MHATokenToKVPool(full_tokens, page_size, DTYPE, KV_HEADS, HEAD_DIM, layer_num=2, device=device,
                                enable_memory_saver=False)
        cls = TokenToKVPoolAllocator if page_size == 1 else PagedTokenToKVPoolAllocator
        args = (full_tokens, DTYPE, device, pool, False) if page_size == 1 else \
            (full_tokens, page_size, DTYPE, device, pool, False)
        allocator = cls(*args)
    layers = [RadixAttention(HEADS, HEAD_DIM, HEAD_DIM ** -0.5, KV_HEADS, layer_id=0,
                             sliding_window_size=(window - 1) if swa else -1),
              RadixAttention(HEADS, HEAD_DIM, HEAD_DIM ** -0.5, KV_HEADS, layer_id=1)]
    make_backend = {"triton": triton_backend_for, "fa3": fa3_backend_for}.get(attention, backend_for)
    backend = make_backend(req_to_token_pool, pool, allocator, page_size, max_context_len, draft_tokens,
                           window=(window - 1) if swa else None)
    return Engine(page_size, swa, pool, allocator, req_to_token_pool, backend, layers,
                  window if swa else 0, max_context_len)


def backend_for(req_to_token_pool, pool, allocator, page_size, max_context_len, draft_tokens, window=None):
    """A ``TRTLLMHAAttnBackend`` with what its ``__init__`` sets on an sm90 (xqa) GPU, bf16 KV."""
    b = TRTLLMHAAttnBackend.__new__(TRTLLMHAAttnBackend)
    b.device = DEVICE
    b.page_size = page_size
    b.max_context_len = max_context_len
    b.max_num_pages = (max_context_len + page_size - 1) // page_size  # as __init__ computes it
    b.req_to_token = req_to_token_pool.req_to_token
    b.token_to_kv_pool = pool
    # What FlashInferAttnBackend.__init__ builds: the runner's translator (a static pool:
    # not translating, reads go through req_to_token) and the SWA pool it resolves.
    b.kv_index_translator = KVIndexTranslator(req_to_token=req_to_token_pool.req_to_token,
                                              token_to_kv_pool_allocator=allocator, token_to_kv_pool=pool,
                                              page_size=page_size, device=DEVICE)
    b._swa_kv_pool = pool if isinstance(pool, SWAKVPool) else None
    b.use_sliding_window_kv_pool = b._swa_kv_pool is not None
    b._swa_full_to_swa_mapping = pool.full_to_swa_index_mapping if b._swa_kv_pool is not None else None
    b.data_type = DTYPE
    b.q_data_type = DTYPE
    b.is_xqa_impl = True  # sm90
    b.use_fmha_v2 = False  # only used by prefill (EXTEND), which does not call the decode kernel
    b.decode_uses_native_fp4 = b.prefill_uses_native_fp4 = False
    b.is_nvfp4_kvcache = b.uses_trtllm_gen_native_fp4 = False
    b.expand_encoder_only_verify = False
    b.speculative_step_id = 0
    b.speculative_num_draft_tokens = draft_tokens or None
    b.topk = 1 if draft_tokens else 0
    b.decode_seq_len_splits = 1
    b.workspace_buffer = torch.zeros(1024 if DEVICE == "cpu" else 128 << 20, dtype=torch.uint8, device=DEVICE)
    b._multi_ctas_kv_counter_buffer = None
    b._xqa_spec_dec_mask = None
    if draft_tokens:  # as __init__ builds it for xqa speculative decoding (the kernel requires it on a GPU)
        max_bs = req_to_token_pool.size + 1
        words_per_row = (draft_tokens + 31) // 32 * 2
        row = torch.arange(draft_tokens, dtype=torch.int32)[:, None]
        word = torch.arange(words_per_row, dtype=torch.int32)[None, :]
        mask = ((1 << (row + 1 - 16 * word).clamp(0, 16)) - 1).to(torch.uint16)
        b._xqa_spec_dec_mask = mask.unsqueeze(0).expand(max_bs, -1, -1).contiguous().to(DEVICE)
    b.forward_metadata = None
    return b


def triton_backend_for(req_to_token_pool, pool, allocator, page_size, max_context_len, draft_tokens, window=None):
    """A ``TritonAttnBackend`` with what its ``__init__`` (``triton_backend.py``) sets for an
    NVIDIA GPU, MHA, no DCP, no deterministic mode, default server arguments
    (``triton_attention_num_kv_splits`` 8); its kernels run under Triton's interpreter."""
    from sglang.kernels.ops.attention import decode_attention, extend_attention
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    max_bs = req_to_token_pool.size
    b = TritonAttnBackend.__new__(TritonAttnBackend)
    b.decode_attention_fwd = torch.compiler.disable(decode_attention.decode_attention_fwd)
    b.extend_attention_fwd = torch.compiler.disable(extend_attention.extend_attention_fwd)
    b.extend_attention_fwd_unified = torch.compiler.disable(extend_attention.extend_attention_fwd_unified)
    b.build_unified_kv_indices = extend_attention.build_unified_kv_indices
    b.align_window_kv_to_tiles = extend_attention.align_window_kv_to_tiles
    b.enable_lean_attention = False
    b._lean_decode_seqlen_gate = decode_attention.lean_decode_seqlen_gate
    b._lean_capture_policy = decode_attention.lean_capture_policy
    b._dense_one_shot_kv_indptr = None
    b.skip_prefill = False
    b.sliding_window_size = window
    b.req_to_token_pool = req_to_token_pool
    b.token_to_kv_pool = pool
    b.req_to_token = req_to_token_pool.req_to_token
    b.token_to_kv_pool_allocator = allocator
    b.use_sliding_window_kv_pool = isinstance(pool, SWAKVPool)
    b.page_size = page_size
    b.kv_index_translator = KVIndexTranslator(req_to_token=req_to_token_pool.req_to_token,
                                              token_to_kv_pool_allocator=allocator, token_to_kv_pool=pool,
                                              page_size=page_size, device=DEVICE)
    b.num_draft_tokens = draft_tokens or None
    b.dllm_block_size = None
    b.target_verify_num_tokens_per_req = draft_tokens or 1
    b.speculative_num_steps = draft_tokens - 1 if draft_tokens else 0
    b.topk = 1 if draft_tokens else 0
    b.use_verify_splitkv = b.use_mla = b.use_verify_shared_kv = b.is_hip_dspark_draft = False
    b.dcp_size, b.dcp_rank = 1, 0
    b.num_head, b.num_kv_head = HEADS, KV_HEADS
    b.use_dense_fp8_chunked_prefill = False
    b.prepare_chunked_prefill_qkv = b.pack_prefix_chunk_kv = None
    b.v_head_dim, b.swa_v_head_dim = HEAD_DIM, None
    b.max_context_len = max_context_len
    b.device = DEVICE
    b.device_core_count = 132  # an H100's SM count: get_num_kv_splits' split heuristic
    b.lean_total_programs, b.lean_block_m = 1, decode_attention._LEAN_BLOCK_M
    b.static_kv_splits = False
    b.max_kv_splits = 8
    b.use_pdl = False
    b.allow_bidirectional_attention_in_extend = False
    b.enable_deterministic = False
    b.split_tile_size = None
    b.kv_indptr = torch.zeros((max_bs + 1,), dtype=torch.int32, device=DEVICE)
    b.window_kv_indptr = torch.zeros((max_bs + 1,), dtype=torch.int32, device=DEVICE) if window else None
    b.qo_indptr = torch.zeros((max_bs + 1,), dtype=torch.int64, device=DEVICE)
    b.mask_indptr = torch.zeros((max_bs + 1,), dtype=torch.int64, device=DEVICE)
    b.forward_metadata = None
    b._verify_mask = None
    b.is_draft_runner = False
    b.extend_attention_block_m = extend_attention._get_block_sizes_for_extend_attention(HEAD_DIM, HEAD_DIM)[3]
    b.dllm_attention = None
    return b


def flashattention_backend_module():
    """``sglang.srt.layers.attention.flashattention_backend``, importable on a CPU.

    The module does ``from sgl_kernel import merge_state_v2`` at its top (only cascade attention
    calls it), and sgl-kernel does not import without an NVIDIA driver (``libcuda.so.1``). For
    the import alone, a module ``sgl_kernel`` whose ``merge_state_v2`` raises is put in
    ``sys.modules`` and removed right after. The kernel the backend calls is not that: it is
    ``sglang.kernels.ops.attention.flash_attention.flash_attn_with_kvcache`` (SGLang's real
    wrapper), which refuses a CPU with its own ``NotImplementedError`` after the sanitizer's check.
    """
    import sys
    import types

    name = "sglang.srt.layers.attention.flashattention_backend"
    if name in sys.modules:
        return sys.modules[name]
    try:
        import sgl_kernel  # noqa: F401
        return importlib.import_module(name)
    except ImportError:
        pass

    def merge_state_v2(*args, **kwargs):
        raise NotImplementedError("sgl-kernel is not installed on this machine (cascade attention)")

    shim = types.ModuleType("sgl_kernel")
    shim.merge_state_v2 = merge_state_v2
    sys.modules["sgl_kernel"] = shim
    try:
        return importlib.import_module(name)
    finally:
        del sys.modules["sgl_kernel"]


def fa3_backend_for(req_to_token_pool, pool, allocator, page_size, max_context_len, draft_tokens, window=None):
    """A ``FlashAttentionBackend`` (``fa3``) with what its ``__init__``
    (``flashattention_backend.py``) sets on an H100/H200 for an MHA model: FA3, bf16 KV, no
    context parallel, no local attention, default server arguments (``num_splits`` 0, the
    scheduler-metadata precompute left to FA3)."""
    from sglang.kernels.ops.attention.flash_attention import flash_attn_varlen_func, flash_attn_with_kvcache

    module = flashattention_backend_module()
    b = module.FlashAttentionBackend.__new__(module.FlashAttentionBackend)
    b.is_encoder_decoder = False
    b.forward_metadata = b.forward_metadata_spec_decode_expand = None
    b.max_context_len = max_context_len
    b.device = DEVICE
    b.decode_cuda_graph_metadata, b.target_verify_metadata = {}, {}
    b.req_to_token_pool, b.token_to_kv_pool = req_to_token_pool, pool
    b.req_to_token = req_to_token_pool.req_to_token
    b.kv_cache_dtype, b.kv_cache_dtype_str, b.kv_cache_is_mxfp8 = DTYPE, "auto", False
    b.page_size = page_size
    b.max_num_pages = (max_context_len + page_size - 1) // page_size
    b.needs_cpu_seq_lens = False
    b.use_mla = False
    b.kv_index_translator = KVIndexTranslator(req_to_token=req_to_token_pool.req_to_token,
                                              token_to_kv_pool_allocator=allocator, token_to_kv_pool=pool,
                                              page_size=page_size, device=DEVICE)
    b.skip_prefill = False
    b.attn_cp_size = 1
    b._verify_mask = None
    b.is_draft_runner = False
    b.use_sliding_window_kv_pool = isinstance(pool, SWAKVPool) and pool.swa_layer_nums > 0
    b._kv_shard_pool = None
    b.topk = 1 if draft_tokens else 0
    b.speculative_num_steps = draft_tokens - 1 if draft_tokens else 0
    b.speculative_num_draft_tokens = draft_tokens or None
    b.speculative_step_id = 0
    b.local_attn_builder, b.has_local_attention, b.attention_chunk_size = None, False, None
    b.sliding_window_size = window
    b.has_swa = window is not None and window > -1
    b.is_prefill_aware_swa = False
    b.fa_impl_ver = 3
    b._get_scheduler_metadata = b._get_fa_runtime_policy = None
    b.flash_attn_varlen_func, b.flash_attn_with_kvcache = flash_attn_varlen_func, flash_attn_with_kvcache
    b.head_dim, b.num_attention_heads, b.num_kv_heads = HEAD_DIM, HEADS, KV_HEADS
    b.has_softcap = False
    b.num_splits = b.decode_num_splits = 0
    b._decode_uses_static_max_seqlen_k = False
    b.full_cg_prefill_metadata = None
    b.fa_skip_kv_cache = False
    b._disable_scheduler_metadata_precompute = True
    return b


def reaches_fa3(fn) -> bool:
    """Run one SGLang forward of the ``fa3`` backend; True when its kernel call reached SGLang's
    FA3 wrapper, which refuses a CPU (``flash_attention_v3.py``: "only supported on sm90")."""
    try:
        fn()
    except NotImplementedError as exc:
        tb = exc.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        assert tb.tb_frame.f_code.co_filename.endswith("flash_attention_v3.py"), exc
    return True


@dataclass
class Request:
    row: int  # req_pool_idx
    prompt: int  # tokens to prefill
    output: int  # tokens to generate
    committed: int = 0  # kv_committed_len: tokens whose KV is valid
    allocated: int = 0  # kv_allocated_len: slots written in req_to_token (MTP over-allocates)
    swa_evicted: int = 0  # tokens below this left the window and were freed in the SWA pool
    generated: int = 0


@dataclass
class Stats:
    steps: int = 0
    calls: int = 0  # kernel calls that reached FlashInfer
    decode_steps: int = 0
    verify_steps: int = 0
    extend_steps: int = 0
    finished: int = 0
    build_ns: list = field(default_factory=list)  # init_forward_metadata per step


class Scheduler:
    """A seeded stream of requests through SGLang's allocators, tables and kernel calls.

    Each step either admits (prefills, in chunks) waiting requests, or runs one decode step
    (``draft_tokens == 0``) or one MTP target-verify step (``q_len_per_req = draft_tokens``,
    then 1..draft_tokens accepted, the rest left allocated as SGLang's spec v2 does) for
    every running request, then frees finished requests and the SWA tokens that left the
    window. ``on_call(fn)`` runs each SGLang forward (which calls FlashInfer).
    """

    def __init__(self, engine: Engine, seed=0, draft_tokens=0, max_running=12, prompt=(1, 900),
                 output=(1, 300), chunk=512, on_call=None, pad_batches=False, graphs=False):
        self.e = engine
        self.pad_batches = pad_batches  # pad decode/verify batches as SGLang's CUDA-graph runner does
        self.rng = random.Random(seed)
        self.draft = draft_tokens
        self.max_running = max_running
        self.prompt, self.output, self.chunk = prompt, output, chunk
        self.running: list = []
        self.prefilling: list = []
        self.stats = Stats()
        self.on_call = on_call or (lambda fn: fn())
        self.before_forward = None  # (reqs, seq_lens, tokens_per_req): after allocation, before the tables
        self.graphs = GraphRunner(engine, _padded(max_running), max(draft_tokens, 1), self.on_call) if graphs else None
        self.q = torch.zeros(_padded(max_running) * max(draft_tokens, 1), HEADS * HEAD_DIM, dtype=DTYPE, device=DEVICE)

    # -- allocation, as ScheduleBatch.prepare_for_extend / _decode call SGLang ----------
    def _alloc(self, reqs, prefix, seq):
        """Slots for positions [prefix, seq) of each request, written into req_to_token."""
        e, a = self.e, self.e.allocator
        rows = torch.tensor([r.row for r in reqs], dtype=torch.int64, device=DEVICE)
        prefix_t = torch.tensor(prefix, dtype=torch.int64, device=DEVICE)
        seq_t = torch.tensor(seq, dtype=torch.int64, device=DEVICE)
        n = int((seq_t - prefix_t).sum())
        if e.page_size == 1:
            out = a.alloc(n)
        else:
            last_loc = get_last_loc_torch(e.req_to_token, rows, prefix_t)
            prefix_cpu, seq_cpu = prefix_t.cpu(), seq_t.cpu()
            if all(s - p == 1 for p, s in zip(prefix, seq)):
                out = a.alloc_decode(seq_t, seq_cpu, last_loc)
            else:
                out = a.alloc_extend(prefix_t, prefix_cpu, seq_t, seq_cpu, last_loc, n)
        if out is None:
            return False
        pt = 0
        for r, p, s in zip(reqs, prefix, seq):
            e.req_to_token_pool.write((r.row, slice(p, s)), out[pt:pt + s - p].to(torch.int32))
            pt += s - p
            r.allocated = s
        return True

    def _free(self, r: Request):
        """release_kv_cache without a radix tree: every slot the request holds."""
        e, a = self.e, self.e.allocator
        slots = e.req_to_token[r.row, :r.allocated].to(torch.int64)
        if e.swa:
            a.free_full(slots[:r.swa_evicted])  # their SWA peers are already free
            a.free(slots[r.swa_evicted:])
        else:
            a.free(slots)
        e.req_to_token_pool.free_slots.append(r.row)  # ReqToTokenPool.free, without a Req
        self.stats.finished += 1

    def _evict_swa(self, r: Request):
        """free_swa_out_of_window_slots' rule: keep ceil(max(window, page)) behind the tail."""
        e = self.e
        keep = -(-max(e.window, e.page_size) // e.page_size) * e.page_size
        new = max(r.committed - keep, 0) // e.page_size * e.page_size
        if new > r.swa_evicted:
            slots = e.req_to_token[r.row, r.swa_evicted:new].to(torch.int64)
            e.allocator.free_swa_segment(slots, start_pos=r.swa_evicted)
            r.swa_evicted = new

    # -- forward batches and the backend ------------------------------------------------
    def _forward(self, mode, reqs, seq_lens, out_cache_loc, tokens_per_req=1):
        e, b = self.e, self.e.backend
        rows = torch.tensor([r.row for r in reqs], dtype=torch.int64, device=DEVICE)
        seq = torch.tensor(seq_lens, dtype=torch.int64, device=DEVICE)
        bs = len(reqs)
        if self.pad_batches:
            # What ForwardBatch's padding (forward_batch_info.py, _pad_tensor_to_size) and the graph
            # runner's buffer registry (cuda_graph_buffer_registry.py) do for a captured batch size:
            # padded rows get req_pool_indices 0 (ReqToTokenPool's reserved padding row), the backend's
            # seq-len fill value, and out_cache_loc 0 (the page-0 sink).
            bs = _padded(len(reqs))
            fill = b.get_cuda_graph_seq_len_fill_value()
            rows = torch.cat([rows, rows.new_zeros(bs - len(reqs))])
            seq = torch.cat([seq, seq.new_full((bs - len(reqs),), fill)])
            out_cache_loc = torch.cat([out_cache_loc, out_cache_loc.new_zeros((bs - len(reqs)) * tokens_per_req)])
        n = bs * tokens_per_req
        fb = ForwardBatch(forward_mode=mode, batch_size=bs, input_ids=torch.zeros(n, dtype=torch.int64, device=DEVICE),
                          req_pool_indices=rows, seq_lens=seq, out_cache_loc=out_cache_loc,
                          seq_lens_sum=int(seq.sum()))
        fb.seq_lens_cpu = seq.cpu()
        if self.before_forward is not None:
            self.before_forward(reqs, seq_lens, tokens_per_req)
        fb.kv_loc_plan = b.kv_index_translator.plan(req_pool_indices=rows, seq_lens=seq, seq_lens_cpu=fb.seq_lens_cpu,
                                                    write_virtual=out_cache_loc)
        q = self.q[:n]
        if self.graphs is not None and (mode.is_decode() or mode.is_target_verify()):
            self.graphs.step(fb, q, tokens_per_req)
            self.stats.calls += len(e.layers)
            return fb
        start = _now()
        b.init_forward_metadata(fb)
        self.stats.build_ns.append(_now() - start)
        for layer in e.layers:
            if mode.is_decode():
                self.on_call(lambda: b.forward_decode(q, None, None, layer, fb, save_kv_cache=False))
            else:
                self.on_call(lambda: b.forward_extend(q, None, None, layer, fb, save_kv_cache=False))
            self.stats.calls += 1
        return fb

    def step(self):
        """One scheduler iteration."""
        s, e = self.stats, self.e
        s.steps += 1
        free_rows = len(e.req_to_token_pool.free_slots)
        admit = len(self.running) + len(self.prefilling) < self.max_running and free_rows and \
            (not self.running or self.rng.random() < 0.25)
        if admit:
            for _ in range(self.rng.randint(1, 3)):
                if len(self.running) + len(self.prefilling) >= self.max_running:
                    break
                rows = e.req_to_token_pool.alloc_rows(1)
                if rows is None:
                    break
                self.prefilling.append(Request(rows[0], self.rng.randint(*self.prompt),
                                               self.rng.randint(*self.output)))
        if self.prefilling:  # one chunk of prefill (EXTEND: no decode-kernel call)
            reqs = list(self.prefilling)
            prefix = [r.committed for r in reqs]
            seq = [min(r.prompt, r.committed + self.chunk) for r in reqs]
            if self._alloc(reqs, prefix, seq):
                for r, n in zip(reqs, seq):
                    r.committed = n
                    if n == r.prompt:
                        self.prefilling.remove(r)
                        self.running.append(r)
                s.extend_steps += 1
                return
        if not self.running:
            return
        reqs = list(self.running)
        if self.draft:  # MTP verify: draft_tokens query rows per request
            d = self.draft
            need = [r for r in reqs if r.allocated < r.committed + d]
            if need and not self._alloc(need, [r.allocated for r in need], [r.committed + d for r in need]):
                return self._preempt()
            loc = torch.cat([e.req_to_token[r.row, r.committed:r.committed + d] for r in reqs]).to(torch.int64)
            self._forward(ForwardMode.TARGET_VERIFY, reqs, [r.committed for r in reqs], loc, tokens_per_req=d)
            s.verify_steps += 1
            for r in reqs:
                accepted = self.rng.randint(1, d)
                r.committed += accepted
                r.generated += accepted
        else:
            if not self._alloc(reqs, [r.committed for r in reqs], [r.committed + 1 for r in reqs]):
                return self._preempt()
            loc = torch.cat([e.req_to_token[r.row, r.committed:r.committed + 1] for r in reqs]).to(torch.int64)
            for r in reqs:
                r.committed += 1
                r.generated += 1
            self._forward(ForwardMode.DECODE, reqs, [r.committed for r in reqs], loc)
            s.decode_steps += 1
        for r in list(self.running):
            if r.generated >= r.output or r.committed + max(self.draft, 1) >= e.max_context_len:
                self.running.remove(r)
                self._free(r)
            elif e.swa:
                self._evict_swa(r)

    def _preempt(self):
        """Out of KV: retract the newest request (SGLang retracts and requeues it)."""
        r = self.running.pop()
        self._free(r)

    def run(self, steps):
        for _ in range(steps):
            self.step()
        return self.stats

    def drain(self):
        for r in self.running + self.prefilling:
            self._free(r)
        self.running, self.prefilling = [], []


class GraphRunner:
    """Decode and MTP-verify steps as SGLang's CUDA-graph runner drives a backend (``trtllm_mha``):
    its graph state made once (``init_cuda_graph_state``), per forward mode and padded batch size
    a capture (``init_forward_metadata_out_graph(in_capture=True)``, then
    ``init_forward_metadata_in_graph`` and the layers' forward inside the graph), and per later
    step the replay (``init_forward_metadata_out_graph``, then the graph: ``_in_graph`` and the
    kernels). The tables are the backend's static graph buffers, which keep earlier steps'
    entries. On a GPU the in-graph part is captured in a ``torch.cuda.CUDAGraph`` and replayed;
    on a CPU it is run as it would be replayed."""

    def __init__(self, engine: "Engine", max_bs: int, tokens_per_req: int, on_call):
        self.e, self.max_bs, self.on_call = engine, max_bs, on_call
        self.max_tokens = max_bs * tokens_per_req
        self.captured: dict = {}  # (mode, bs) -> CUDAGraph (GPU) or True (CPU)
        self.static: dict = {}  # (mode, bs) -> the captured ForwardBatch, whose tensors later steps refill
        self.ready = False
        self.captures = self.replays = 0

    def _in_graph(self, fb, q):
        """What the graph holds. On a CPU each layer's kernel call goes through ``on_call`` (there
        FlashInfer refuses the CPU tensors once the sanitizer lets a call through)."""
        b = self.e.backend
        b.init_forward_metadata_in_graph(fb)
        forward = b.forward_decode if fb.forward_mode.is_decode() else b.forward_extend
        for layer in self.e.layers:
            if DEVICE == "cpu":
                self.on_call(lambda: forward(q, None, None, layer, fb, save_kv_cache=False))
            else:
                forward(q, None, None, layer, fb, save_kv_cache=False)

    def step(self, fb, q, tokens_per_req=1):
        b, key = self.e.backend, (fb.forward_mode, fb.batch_size)
        if not self.ready:
            b.init_cuda_graph_state(self.max_bs, self.max_tokens)
            self.ready = True
        fb.positions = torch.zeros(fb.batch_size * tokens_per_req, dtype=torch.int64, device=DEVICE)
        if key not in self.captured:
            b.init_forward_metadata_out_graph(fb, in_capture=True)
            if DEVICE == "cpu":
                self.captured[key] = True
                self._in_graph(fb, q)
            else:
                self._in_graph(fb, q)  # warm-up: kernels compiled, sanitizer rings made
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._in_graph(fb, q)
                self.captured[key] = graph
            self.captures += 1
            self.static[key] = fb  # the captured graph reads this batch's tensors: later steps copy into them
            return
        static = self.static[key]
        b.init_forward_metadata_out_graph(fb, in_capture=False)
        for name in ("req_pool_indices", "seq_lens", "out_cache_loc", "positions"):
            getattr(static, name).copy_(getattr(fb, name))
        static.seq_lens_cpu, static.seq_lens_sum, static.kv_loc_plan = fb.seq_lens_cpu, fb.seq_lens_sum, fb.kv_loc_plan
        if DEVICE == "cpu":
            self._in_graph(static, q)
        else:
            self.captured[key].replay()
        self.replays += 1


def plant_seed_fault(engine: Engine, reqs, seq_lens, tokens_per_req, i=1):
    """The seed's fault in request ``reqs[i]``'s last live page, which the kernel reads: one page
    past the end of the pool that page's layer reads. Without SWA the request's token slot there
    becomes the first slot past the full pool; with SWA, SGLang's own full->SWA mapping writer maps
    it one page past the SWA pool (the seed's case: an SWA table entry equal to the page count),
    so the full-attention table stays valid and no SGLang kernel indexes out of bounds building
    the tables. Call it from ``Scheduler.before_forward``. Returns the table entry the sanitizer
    must report: (row, column, value)."""
    ps = engine.page_size
    kv_len = seq_lens[i] + (tokens_per_req if tokens_per_req > 1 else 0)  # a verify row reads its drafts too
    col = (kv_len - 1) // ps
    row = reqs[i].row
    if engine.swa:
        slot = engine.req_to_token[row, col * ps].long().view(1)
        value = engine.swa_pages()
        engine.allocator.set_full_to_swa_mapping(slot, torch.tensor([value * ps], device=DEVICE))
    else:
        value = engine.pool.get_key_buffer(0).shape[0] // ps
        engine.req_to_token[row, col * ps] = value * ps
    return i, col, value


def plant_use_after_free(engine: Engine, reqs, seq_lens, tokens_per_req, i=1):
    """Request ``reqs[i]`` freed with SGLang's own ``free`` while the batch about to run (already
    allocated, its tables not built yet) still holds it: under ``track_pages`` the sanitizer
    must report it as ``page-not-allocated``. Call it from ``Scheduler.before_forward``.
    Returns the entry reported first, (row, column, value): without SWA the row's first page;
    with SWA the sliding-window layer's (it runs first), whose table the free turned to page 0
    (SGLang clears a freed slot's full->SWA mapping) from the window's first page on."""
    slots = engine.req_to_token[reqs[i].row, :reqs[i].allocated].to(torch.int64)
    engine.allocator.free(slots)
    if not engine.swa:
        return i, 0, int(slots[0]) // engine.page_size
    q_len = tokens_per_req
    kv_len = seq_lens[i] + (tokens_per_req if tokens_per_req > 1 else 0)
    return i, max(kv_len - q_len - (engine.window - 1), 0) // engine.page_size, 0


def _padded(bs: int) -> int:
    """The captured batch size a batch of ``bs`` is padded to (powers of two, as SGLang's default
    capture sizes are up to 8)."""
    return 1 << max(bs - 1, 0).bit_length()


def _now():
    import time

    return time.perf_counter_ns()


def call_through(fn):
    """Run one SGLang forward; True when its kernel call reached FlashInfer."""
    return reaches_flashinfer(fn)


CONFIGS = {  # name: (make_engine kwargs, MTP draft tokens)
    "page64-swa-mtp3": (dict(page_size=64, swa=True), 3),
    "page1-full-decode": (dict(page_size=1, swa=False), 0),
    "page64-full-decode": (dict(page_size=64, swa=False), 0),
    "page1-swa-mtp2": (dict(page_size=1, swa=True), 2),
}


def realistic_scheduler(name: str):
    """The seeded realistic sequence of configuration ``name`` (the same every run)."""
    import zlib

    kwargs, draft = CONFIGS[name]
    engine = make_engine(draft_tokens=draft, **kwargs)
    return engine, Scheduler(engine, seed=zlib.crc32(name.encode()) % 1000, draft_tokens=draft, max_running=6,
                             on_call=call_through)
