"""vLLM 0.33.0 itself under the sanitizer: its Python entry points, its Triton kernels, its
Triton attention backend and the bookkeeping that builds its block tables, on a CPU.

Everything called here is vLLM's code, unmodified (installed by ``.ci/install full``; skipped,
saying why, where it is not installed):

- ``unified_attention`` (``vllm/v1/attention/ops/triton_unified_attention.py``), vLLM's Triton
  kernel, RUNS under Triton's interpreter: valid tables give no report and the output matches
  a reference; a planted block is caught before the kernel at ``(request, column)``;
- vLLM's Triton backend (``TritonAttentionMetadataBuilder``, ``TritonAttentionImpl``) driven
  over steps whose tables vLLM's block pool, KV-cache managers (a sliding window's freed blocks
  become its null block) and ``BlockTable`` (slot mapping by its Triton kernel) build
  (``vllm_driver.py``);
- ``vllm.vllm_flash_attn.flash_attn_interface.flash_attn_varlen_func`` and the vendored
  FlashMLA interface, whose compiled ops are stand-ins (``vllm_standins.py``: they need
  libcuda), and ``vllm._custom_ops``' cache-write wrappers over the ``_C_cache_ops`` stand-ins.

vLLM's FlashAttention and FlashMLA backend classes are not driven: vLLM binds their kernels only
on a CUDA platform (``fa_utils.py``: ``if current_platform.is_cuda(): from
vllm.vllm_flash_attn import flash_attn_varlen_func``), and a CPU is not one. Nor its FlashInfer
backend: ``FlashInferMetadataBuilder.__init__`` reads the model's registered ``Attention``
layers (which pick their backend by platform) and plans FlashInfer wrappers, whose
constructors pin host memory (no driver here).
"""

import needs_vllm  # noqa: F401  (skips this module without vLLM)

import pytest  # noqa: E402
import torch  # noqa: E402

import vllm_driver as vd  # noqa: E402
from tsan_paged import PagedSanitizer, PageTableViolation  # noqa: E402
from vllm import _custom_ops  # noqa: E402
from vllm.third_party.flashmla import flash_mla_interface  # noqa: E402
from vllm.v1.attention.ops import flashmla, triton_unified_attention  # noqa: E402
from vllm.vllm_flash_attn import flash_attn_interface  # noqa: E402

NUM_BLOCKS, BLOCK_SIZE, HEADS, KV_HEADS, DIM = 64, 16, 4, 2, 16


def paged_batch(lengths=(30, 1, 77, 0), q_lens=(1, 1, 4, 0), seed=0, spare_blocks=4):
    """As vLLM's backends call the kernels: the cache ``[num_blocks, H, block_size, 2 * D]``
    split into strided ``[blocks, block_size, H, D]`` K and V views, a block table of width
    rounded to 128 tokens, padding rows (length 0) holding the null block 0. The cache is a
    view of one ``spare_blocks`` larger, poisoned with NaN: a block past it that a kernel reads
    reads poison, never unmapped memory."""
    gen = torch.Generator().manual_seed(seed)
    whole = torch.randn(NUM_BLOCKS + spare_blocks, KV_HEADS, BLOCK_SIZE, 2 * DIM, generator=gen)
    whole[NUM_BLOCKS:] = float("nan")
    key_cache, value_cache = whole[:NUM_BLOCKS].transpose(1, 2).split(DIM, -1)
    width = 128 // BLOCK_SIZE
    table = torch.zeros(len(lengths), width, dtype=torch.int32)
    free = (torch.randperm(NUM_BLOCKS - 1, generator=gen) + 1).tolist()
    for b, n in enumerate(lengths):
        for j in range(-(-n // BLOCK_SIZE)):
            table[b, j] = free.pop()
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    q = torch.randn(int(cu[-1]), HEADS, DIM, generator=gen)
    return dict(q=q, k=key_cache, v=value_cache, cu_seqlens_q=cu, max_seqlen_q=max(q_lens),
                seqused_k=torch.tensor(lengths, dtype=torch.int32), max_seqlen_k=max(lengths), block_table=table)


def reference(batch, window_left=-1):
    out = torch.zeros_like(batch["q"])
    k, v, table, cu = batch["k"], batch["v"], batch["block_table"], batch["cu_seqlens_q"]
    for b, length in enumerate(batch["seqused_k"].tolist()):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        if rows.stop == rows.start or length == 0:
            continue
        q_len = rows.stop - rows.start
        pos = torch.arange(max(length - q_len - window_left, 0) if window_left >= 0 else 0, length)
        blocks = table[b, pos // BLOCK_SIZE].long()  # the keys some query attends to
        keys = k[blocks, pos % BLOCK_SIZE].repeat_interleave(HEADS // KV_HEADS, 1)
        values = v[blocks, pos % BLOCK_SIZE].repeat_interleave(HEADS // KV_HEADS, 1)
        qpos = torch.arange(q_len).unsqueeze(1) + length - q_len
        mask = pos <= qpos
        if window_left >= 0:
            mask &= pos >= qpos - window_left
        scores = torch.einsum("qhd,khd->hqk", batch["q"][rows], keys) * DIM ** -0.5
        out[rows] = torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), values)
    return out


def call_unified(batch, window=(-1, -1), **extra):
    out = torch.zeros_like(batch["q"])
    triton_unified_attention.unified_attention(
        batch["q"], batch["k"], batch["v"], out, batch["cu_seqlens_q"], batch["max_seqlen_q"], batch["seqused_k"],
        batch["max_seqlen_k"], DIM ** -0.5, True, window, batch["block_table"], 0.0, None, None, None, **extra)
    return out


def call_flash(batch, **extra):
    return flash_attn_interface.flash_attn_varlen_func(
        batch["q"], batch["k"], batch["v"], batch["max_seqlen_q"], batch["cu_seqlens_q"], batch["max_seqlen_k"],
        seqused_k=batch["seqused_k"], causal=True, block_table=batch["block_table"], **extra)


def split_kv_scratch(tokens):
    """What ``TritonAttentionMetadataBuilder`` passes for the split-KV (3D) kernel: 16 segments."""
    return dict(seq_threshold_3D=64, num_par_softmax_segments=16,
                softmax_segm_output=torch.empty(tokens, HEADS, 16, DIM),
                softmax_segm_max=torch.empty(tokens, HEADS, 16), softmax_segm_expsum=torch.empty(tokens, HEADS, 16))


# -- vLLM's Triton unified_attention, run by the interpreter ---------------------------------
def test_unified_attention_runs_under_the_interpreter_with_vllms_triton():
    """The kernel vLLM launches is Triton's (not vLLM's placeholder for a missing Triton)."""
    from vllm.triton_utils import HAS_TRITON

    assert HAS_TRITON
    assert type(triton_unified_attention.kernel_unified_attention).__name__ == "InterpretedFunction"


@pytest.mark.parametrize("split_kv", [False, True])
def test_unified_attention_valid_runs_live_caught_dead_warned(split_kv):
    batch = paged_batch()
    extra = split_kv_scratch(batch["q"].shape[0]) if split_kv else {}
    with PagedSanitizer(mode="raise") as san:
        out = call_unified(batch, **extra)
    assert san.reports == []
    torch.testing.assert_close(out, reference(batch), rtol=1e-4, atol=1e-4)
    batch["block_table"][2, 4] = NUM_BLOCKS  # request 2 holds 77 tokens: 5 blocks, column 4 is read
    batch["block_table"][1, 3] = NUM_BLOCKS + 1  # request 1 holds 1 token: column 3 is not
    with pytest.raises(PageTableViolation) as info:
        with PagedSanitizer(mode="raise") as san:
            call_unified(batch, **extra)
    v = info.value.violations[0]
    assert (v.op, v.check, v.arg, v.index, v.value, v.bound) == (
        "vllm.v1.attention.ops.triton_unified_attention:unified_attention", "page-out-of-range", "block_table",
        (2, 4), NUM_BLOCKS, NUM_BLOCKS)
    assert v.caller.startswith("tests/test_vllm_python.py")
    assert [(w.check, w.index) for w in san.reports if w.severity == "warning"] == [("dead-page-out-of-range", (1, 3))]


@pytest.mark.parametrize("split_kv, first_live", [(False, 2), (True, 3)])
def test_unified_attention_window_starts_at_the_kernels_tile(split_kv, first_live):
    """71 tokens, one query, a window of 21 (``window_size[0] = 20``): 50 tokens are left of it.
    The 2D kernel's tiles are 32 tokens (prefill tile), so it starts loading at token 32 (block
    2); the split-KV kernel's are 16 (decode tile, fp32), so at token 48 (block 3). A stale id
    in block 2 is then an error for one and harmless to the other, and the kernel that skips it
    runs with it in place."""
    batch = paged_batch(lengths=(71,), q_lens=(1,))
    extra = split_kv_scratch(1) if split_kv else {}
    batch["block_table"][0, :first_live] = NUM_BLOCKS + 2  # every block left of the first one loaded
    with PagedSanitizer(mode="raise") as san:
        out = call_unified(batch, window=(20, 0), **extra)
    assert [(v.check, v.index, v.count) for v in san.reports] == [("dead-page-out-of-range", (0, 0), first_live)]
    torch.testing.assert_close(out, reference(batch, window_left=20), rtol=1e-4, atol=1e-4)
    batch["block_table"][0, first_live] = NUM_BLOCKS + 2
    with pytest.raises(PageTableViolation) as info:
        with PagedSanitizer(mode="raise"):
            call_unified(batch, window=(20, 0), **extra)
    assert [(v.check, v.index) for v in info.value.violations] == [("page-out-of-range", (0, first_live))]


def test_unified_attention_rows_without_queries_read_nothing():
    """A request with no query row in the step (``q_len = 0``) gets no program: its blocks are
    not read, whatever its length; the next request's are."""
    batch = paged_batch(lengths=(40, 33), q_lens=(0, 2))
    batch["block_table"][0, 1] = NUM_BLOCKS + 3
    with PagedSanitizer(mode="raise") as san:
        out = call_unified(batch)
    assert [(v.check, v.index) for v in san.reports] == [("dead-page-out-of-range", (0, 1))]
    torch.testing.assert_close(out, reference(batch), rtol=1e-4, atol=1e-4)
    batch["block_table"][1, 2] = NUM_BLOCKS
    with pytest.raises(PageTableViolation) as info:
        with PagedSanitizer(mode="raise"):
            call_unified(batch)
    assert [(v.check, v.index) for v in info.value.violations] == [("page-out-of-range", (1, 2))]


# -- vLLM's Triton backend, driven over steps --------------------------------------------------
@pytest.mark.parametrize("sliding_window", [None, 24])
def test_triton_backend_steps_valid_with_no_reports(sliding_window):
    """Prefill, then decode steps, then a chunked prefill and a speculative verify (q_len 4),
    through vLLM's block pool, KV-cache manager, BlockTable, metadata builder and backend. With
    a window the scheduler's manager frees the blocks the window left (its null block takes
    their place there) while the worker's table keeps their ids: stale entries, in range."""
    backend = vd.TritonBackend(sliding_window=sliding_window)
    steps = [[("a", 0, 20), ("b", 0, 7)], [("a", 20, 1), ("b", 7, 1)], [("a", 21, 1), ("b", 8, 1), ("c", 0, 40)],
             [("a", 22, 4), ("b", 9, 1), ("c", 40, 1)]]
    with PagedSanitizer(mode="raise") as san:
        for i, requests in enumerate(steps):
            step = backend.step(requests, seed=i)
            backend.kv_update(step)
            out = backend.forward(step)
            torch.testing.assert_close(out, backend.reference(step, sliding_window), rtol=1e-4, atol=1e-4)
    assert san.reports == []
    assert san.checked[("vllm.v1.attention.ops.triton_unified_attention:unified_attention", "host")] == len(steps)
    assert san.checked[("vllm.v1.attention.ops.triton_reshape_and_cache_flash:triton_reshape_and_cache_flash",
                        "host")] == len(steps)
    if sliding_window:  # the window freed request c's first block; the worker's row still holds its id
        assert backend.manager.req_to_blocks["c"][0].block_id == 0  # the scheduler's null block
        assert int(step.metadata.block_table[2, 0]) != 0


def test_triton_backend_planted_block_caught_at_vllms_line():
    backend = vd.TritonBackend()
    step = backend.step([("a", 0, 20), ("b", 0, 37)])
    backend.kv_update(step)
    step = backend.step([("a", 20, 1), ("b", 37, 1)])
    backend.kv_update(step)
    step.metadata.block_table[1, 2] = backend.num_blocks  # request b holds 38 tokens: its block 2 is read
    with pytest.raises(PageTableViolation) as info:
        with PagedSanitizer(mode="raise"):
            backend.forward(step)
    v = info.value.violations[0]
    assert (v.check, v.arg, v.index, v.value, v.bound) == ("page-out-of-range", "block_table", (1, 2),
                                                           backend.num_blocks, backend.num_blocks)
    assert "vllm/v1/attention/backends/triton_attn.py" in v.caller


def test_triton_backend_planted_slot_caught_at_the_kv_write():
    backend = vd.TritonBackend()
    step = backend.step([("a", 0, 5), ("b", 0, 3)])
    step.metadata.slot_mapping[6] = backend.num_blocks * backend.block_size  # one slot past the cache
    with pytest.raises(PageTableViolation) as info:
        with PagedSanitizer(mode="raise"):
            backend.kv_update(step)
    v = info.value.violations[0]
    assert (v.op, v.check, v.arg, v.index, v.value, v.bound) == (
        "vllm.v1.attention.ops.triton_reshape_and_cache_flash:triton_reshape_and_cache_flash", "page-out-of-range",
        "slot_mapping", (6,), backend.num_blocks * backend.block_size, backend.num_blocks * backend.block_size)
    assert "vllm/v1/attention/backends/triton_attn.py" in v.caller


def test_vllm_slot_mapping_padding_is_not_a_finding():
    """vLLM's slot-mapping kernel pads the mapping past the step's tokens with -1 (PAD_SLOT_ID),
    which the write kernel skips: a mapping passed with its padding gives no report."""
    backend = vd.TritonBackend()
    step = backend.step([("a", 0, 5)])
    padded = backend.table.slot_mapping.gpu[:8]
    assert padded[5:].tolist() == [-1, -1, -1]
    key = torch.cat([step.key, torch.zeros(3, KV_HEADS, DIM)])
    with PagedSanitizer(mode="raise") as san:
        try:
            backend.impl.do_kv_cache_update(backend.layer, key, key, step.kv_cache, padded)
        except RuntimeError:
            pass  # the launch asks for a CUDA device, after the check
    assert san.reports == []


# -- vLLM's FlashAttention interface, its compiled ops stood in for ----------------------------
@pytest.mark.parametrize("version", [2, 3])
def test_flash_attn_varlen_func_valid_runs_live_caught_dead_warned(version):
    batch = paged_batch()
    with PagedSanitizer(mode="raise") as san:
        out = call_flash(batch, fa_version=version)
    assert san.reports == []
    torch.testing.assert_close(out, reference(batch), rtol=1e-4, atol=1e-4)
    batch["block_table"][2, 4] = NUM_BLOCKS
    batch["block_table"][1, 3] = 10**6
    with pytest.raises(PageTableViolation) as info:
        with PagedSanitizer(mode="raise") as san:
            call_flash(batch, fa_version=version)
    v = info.value.violations[0]
    assert (v.op, v.check, v.arg, v.index, v.value) == (
        "vllm.vllm_flash_attn.flash_attn_interface:flash_attn_varlen_func", "page-out-of-range", "block_table",
        (2, 4), NUM_BLOCKS)
    assert [(w.check, w.index) for w in san.reports if w.severity == "warning"] == [("dead-page-out-of-range", (1, 3))]


def test_flash_attn_window_start_by_version():
    """FA3's fork starts a window at its first key (exact); FA2 at a whole tile of up to 256
    tokens: blocks such a tile may cover count as read."""
    batch = paged_batch(lengths=(64,), q_lens=(1,))
    batch["block_table"][0, :2] = NUM_BLOCKS + 7  # tokens 0..31; a window of 20 attends keys 43..63
    with PagedSanitizer(mode="raise") as san:
        call_flash(batch, window_size=[20, 0], fa_version=3)
    assert [(v.check, v.index, v.count) for v in san.reports] == [("dead-page-out-of-range", (0, 0), 2)]
    with pytest.raises(PageTableViolation) as info:
        with PagedSanitizer(mode="raise"):
            call_flash(batch, window_size=[20, 0], fa_version=2)
    assert [v.index for v in info.value.violations] == [(0, 0)]


# -- vLLM's vendored FlashMLA interface --------------------------------------------------------
def test_flash_mla_dense_reads_column_0_even_at_length_0():
    gen = torch.Generator().manual_seed(1)
    k_cache = torch.randn(NUM_BLOCKS, 64, 1, 40, generator=gen)
    table = torch.tensor([[3, 9], [5, 0]], dtype=torch.int32)
    lengths = torch.tensor([70, 0], dtype=torch.int32)
    q = torch.randn(2, 1, 4, 40, generator=gen)

    def call(**extra):
        meta, _ = flash_mla_interface.get_mla_metadata()
        return flash_mla_interface.flash_mla_with_kvcache(q, k_cache, table, lengths, 32, meta, causal=True, **extra)

    with PagedSanitizer(mode="raise") as san:
        out, _ = call()
    assert san.reports == [] and out.shape == (2, 1, 4, 32)
    table[1, 0] = NUM_BLOCKS  # a padding row (length 0): FlashMLA still loads its column 0
    with pytest.raises(PageTableViolation) as info:
        with PagedSanitizer(mode="raise"):
            call()
    v = info.value.violations[0]
    assert (v.check, v.arg, v.index) == ("page-out-of-range", "block_table", (1, 0))
    with PagedSanitizer(mode="log") as san:
        with pytest.raises(Exception):  # vLLM's interface refuses the sparse call (no stand-in op)
            call(indices=torch.zeros(2, 1, 64, dtype=torch.int32))
    assert [(v.check, v.arg) for v in san.reports] == [("unsupported-form", "indices")]


def test_flash_mla_fp8_checked_before_vllm_refuses_the_cpu():
    """``vllm.v1.attention.ops.flashmla.flash_mla_with_kvcache_fp8`` raises on a non-CUDA platform
    (its extension is looked for only there): after the check."""
    k_cache = torch.zeros(NUM_BLOCKS, 64, 1, 40)
    table = torch.tensor([[3, NUM_BLOCKS]], dtype=torch.int32)
    q = torch.zeros(1, 1, 4, 40)
    args = (q, k_cache, table, torch.tensor([70], dtype=torch.int32), 32, torch.empty(0), torch.empty(0))
    with pytest.raises(PageTableViolation) as info:
        with PagedSanitizer(mode="raise"):
            flashmla.flash_mla_with_kvcache_fp8(*args)
    assert [(v.check, v.index) for v in info.value.violations] == [("page-out-of-range", (0, 1))]
    table[0, 1] = 4
    with PagedSanitizer(mode="raise") as san, pytest.raises(RuntimeError, match="FlashMLA|flashmla|_flashmla"):
        flashmla.flash_mla_with_kvcache_fp8(*args)
    assert san.reports == []


# -- vLLM's cache-write wrappers (vllm._custom_ops) over the _C_cache_ops stand-ins -------------
def test_custom_ops_cache_writes_checked():
    key = torch.randn(6, KV_HEADS, DIM)
    key_cache = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, DIM)
    value_cache = torch.zeros_like(key_cache)
    slots = torch.tensor([3, -1, 40, NUM_BLOCKS * BLOCK_SIZE - 1, -1, 7])
    one = torch.tensor(1.0)
    with PagedSanitizer(mode="raise") as san:
        _custom_ops.reshape_and_cache_flash(key, key, key_cache, value_cache, slots, "auto", one, one)
    assert san.reports == [] and torch.equal(key_cache.view(-1, KV_HEADS, DIM)[40], key[2])
    slots[5] = NUM_BLOCKS * BLOCK_SIZE
    with pytest.raises(PageTableViolation) as info:
        with PagedSanitizer(mode="raise"):
            _custom_ops.reshape_and_cache_flash(key, key, key_cache, value_cache, slots, "auto", one, one)
    v = info.value.violations[0]
    assert (v.op, v.arg, v.index, v.value) == ("_C_cache_ops::reshape_and_cache_flash", "slot_mapping", (5,),
                                               NUM_BLOCKS * BLOCK_SIZE)
    assert "vllm/_custom_ops.py" in v.caller  # the line that calls the op: vLLM's wrapper

    kv_cache = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, 24)
    mla_slots = torch.tensor([5, -1, 17, NUM_BLOCKS * BLOCK_SIZE])
    with pytest.raises(PageTableViolation) as info:
        with PagedSanitizer(mode="raise"):
            _custom_ops.concat_and_cache_mla(torch.randn(4, 16), torch.randn(4, 8), kv_cache, mla_slots, "auto", one)
    assert [(v.op, v.index) for v in info.value.violations] == [("_C_cache_ops::concat_and_cache_mla", (3,))]
