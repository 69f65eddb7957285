"""vLLM's dispatcher ops: the built-in rules, on real torch.library ops with vLLM's schemas."""

import random

import pytest
import torch

import vllm_ops  # noqa: F401  (registers _C and _C_cache_ops ops with CPU kernels)
from tsan_paged import PagedSanitizer, PageTableViolation

NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_SIZE, X = 64, 16, 2, 16, 8


def attention_inputs(num_seqs=5, max_seq_len=100, seed=0):
    """Built like vLLM's tests/kernels/attention/test_attention.py: random lengths and blocks."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    seq_lens = torch.tensor([rng.randint(1, max_seq_len) for _ in range(num_seqs)], dtype=torch.int32)
    max_blocks = (max_seq_len + BLOCK_SIZE - 1) // BLOCK_SIZE
    block_tables = torch.tensor([[rng.randint(0, NUM_BLOCKS - 1) for _ in range(max_blocks)] for _ in range(num_seqs)],
                                dtype=torch.int32)
    key_cache = torch.randn(NUM_BLOCKS, HEADS, HEAD_SIZE // X, BLOCK_SIZE, X)
    value_cache = torch.randn(NUM_BLOCKS, HEADS, HEAD_SIZE, BLOCK_SIZE)
    query = torch.randn(num_seqs, HEADS * 2, HEAD_SIZE)
    return dict(out=torch.empty_like(query), query=query, key_cache=key_cache, value_cache=value_cache,
                num_kv_heads=HEADS, scale=HEAD_SIZE ** -0.5, block_tables=block_tables, seq_lens=seq_lens,
                block_size=BLOCK_SIZE, max_seq_len=max_seq_len, alibi_slopes=None, kv_cache_dtype="auto",
                k_scale=torch.tensor(1.0), v_scale=torch.tensor(1.0), tp_rank=0, blocksparse_local_blocks=0,
                blocksparse_vert_stride=0, blocksparse_block_size=64, blocksparse_head_sliding_step=0)


def v1(a):
    torch.ops._C.paged_attention_v1(*a.values())


def test_valid_attention_runs_unchanged_with_no_reports():
    a = attention_inputs()
    reference = attention_inputs()
    v1(reference)
    with PagedSanitizer(mode="raise") as san:
        v1(a)
        torch.ops._C.paged_attention_v2(a["out"], torch.empty(1), torch.empty(1), torch.empty(1),
                                        *list(a.values())[1:])
    assert san.reports == []
    assert torch.allclose(a["out"], reference["out"])


def test_live_block_fault_caught_before_the_kernel():
    a = attention_inputs()
    row = 2
    col = (int(a["seq_lens"][row]) - 1) // BLOCK_SIZE
    a["block_tables"][row, col] = NUM_BLOCKS
    with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation) as info:
        v1(a)
    v = info.value.violations[0]
    assert (v.op, v.check, v.arg, v.index, v.value, v.bound) == (
        "_C::paged_attention_v1", "page-out-of-range", "block_tables", (row, col), NUM_BLOCKS, NUM_BLOCKS)
    assert v.caller.startswith("tests/test_vllm.py")


def test_dead_block_is_a_warning_and_lengths_are_checked():
    a = attention_inputs()
    a["seq_lens"][0] = 1  # row 0 reads one block
    a["block_tables"][0, 3] = -7
    with PagedSanitizer(mode="raise") as san:
        v1(a)
    assert [(v.check, v.index) for v in san.reports] == [("dead-page-out-of-range", (0, 3))]
    a["seq_lens"][4] = a["max_seq_len"] + 1
    with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation) as info:
        v1(a)
    assert ("seq-len-exceeds-max", (4,)) in [(v.check, v.index) for v in info.value.violations]


def cache_inputs(flash, num_tokens=20, padded_rows=4, seed=0):
    """Built like vLLM's tests/kernels/test_cache.py: distinct random slots."""
    rng = random.Random(seed)
    slot_mapping = torch.tensor(rng.sample(range(NUM_BLOCKS * BLOCK_SIZE), num_tokens), dtype=torch.long)
    key = torch.randn(num_tokens + padded_rows, HEADS, HEAD_SIZE)  # CUDA-graph padding rows
    value = torch.randn(num_tokens + padded_rows, HEADS, HEAD_SIZE)
    if flash:
        key_cache = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_SIZE)
        value_cache = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_SIZE)
    else:
        key_cache = torch.zeros(NUM_BLOCKS, HEADS, HEAD_SIZE // X, BLOCK_SIZE, X)
        value_cache = torch.zeros(NUM_BLOCKS, HEADS, HEAD_SIZE, BLOCK_SIZE)
    return [key, value, key_cache, value_cache, slot_mapping, "auto", torch.tensor(1.0), torch.tensor(1.0)]


@pytest.mark.parametrize("flash", [False, True])
def test_cache_writes(flash):
    op = torch.ops._C_cache_ops.reshape_and_cache_flash if flash else torch.ops._C_cache_ops.reshape_and_cache
    args = cache_inputs(flash)
    args[4][[1, 7]] = -1  # padding slots: skipped by the kernel, not findings
    with PagedSanitizer(mode="raise") as san:
        op(*args)
    assert san.reports == []
    assert args[2].abs().sum() > 0  # the real kernel wrote

    args = cache_inputs(flash)
    args[4][3] = NUM_BLOCKS * BLOCK_SIZE  # one slot past the end: would corrupt memory silently
    with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation) as info:
        op(*args)
    v = info.value.violations[0]
    assert (v.check, v.arg, v.index, v.value, v.bound) == (
        "page-out-of-range", "slot_mapping", (3,), NUM_BLOCKS * BLOCK_SIZE, NUM_BLOCKS * BLOCK_SIZE)


def test_concat_and_cache_mla_writes_checked():
    """vLLM's MLA cache write (``_C_cache_ops::concat_and_cache_mla``): negative slots are
    padding, a slot past the cache is caught at its token."""
    kv_cache = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, 24)
    slots = torch.tensor([5, -1, NUM_BLOCKS * BLOCK_SIZE - 1, 17])
    kv_c, k_pe = torch.randn(4, 16), torch.randn(4, 8)
    with PagedSanitizer(mode="raise") as san:
        torch.ops._C_cache_ops.concat_and_cache_mla(kv_c, k_pe, kv_cache, slots, "auto", torch.tensor(1.0))
    assert san.reports == [] and torch.equal(kv_cache.view(-1, 24)[17], torch.cat([kv_c[3], k_pe[3]]))
    slots[0] = NUM_BLOCKS * BLOCK_SIZE
    with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation) as info:
        torch.ops._C_cache_ops.concat_and_cache_mla(kv_c, k_pe, kv_cache, slots, "auto", torch.tensor(1.0))
    v = info.value.violations[0]
    assert (v.check, v.arg, v.index, v.value) == ("page-out-of-range", "slot_mapping", (0,), NUM_BLOCKS * BLOCK_SIZE)


# -- vLLM's Python entry points (stand-ins with vLLM 0.33.0's paths and signatures: vllm_python.py) --
@pytest.fixture
def vllm(tmp_path):
    import vllm_python

    yield vllm_python.install(tmp_path)
    vllm_python.uninstall(tmp_path)


def flash_batch(lengths=(30, 1, 77, 0), q_lens=(1, 1, 4, 0), seed=0):
    """As vLLM's FlashAttention backend calls it: the cache split into strided [blocks, bs, H, D]
    views, a block table of width rounded to 128 tokens, padding rows (length 0) holding block 0."""
    gen = torch.Generator().manual_seed(seed)
    width = 128 // BLOCK_SIZE
    kv_cache = torch.randn(NUM_BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_SIZE, generator=gen)
    key_cache, value_cache = kv_cache.transpose(1, 2).split(HEAD_SIZE, -1)
    table = torch.zeros(len(lengths), width, dtype=torch.int32)
    free = (torch.randperm(NUM_BLOCKS - 1, generator=gen) + 1).tolist()
    for b, n in enumerate(lengths):
        for j in range(-(-n // BLOCK_SIZE)):
            table[b, j] = free.pop()
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    q = torch.randn(int(cu[-1]), 2 * HEADS, HEAD_SIZE, generator=gen)
    return dict(q=q, k=key_cache, v=value_cache, cu_seqlens_q=cu, max_seqlen_q=max(q_lens),
                seqused_k=torch.tensor(lengths, dtype=torch.int32), max_seqlen_k=max(lengths), block_table=table)


def call_flash(vllm, batch, **extra):
    fa = vllm[0]
    return fa.flash_attn_varlen_func(batch["q"], batch["k"], batch["v"], batch["max_seqlen_q"], batch["cu_seqlens_q"],
                                     batch["max_seqlen_k"], seqused_k=batch["seqused_k"], causal=True,
                                     block_table=batch["block_table"], **extra)


def call_unified(vllm, batch, window=(-1, -1)):
    out = torch.empty_like(batch["q"])
    vllm[1].unified_attention(batch["q"], batch["k"], batch["v"], out, batch["cu_seqlens_q"], batch["max_seqlen_q"],
                              batch["seqused_k"], batch["max_seqlen_k"], HEAD_SIZE ** -0.5, True, window,
                              batch["block_table"], 0.0, None, None, None)
    return out


@pytest.mark.parametrize("call", [call_flash, call_unified])
def test_vllm_attention_valid_runs_live_caught_dead_warned(vllm, call):
    batch = flash_batch()
    with PagedSanitizer(mode="raise") as san:
        out = call(vllm, batch)
    assert san.reports == [] and out.abs().sum() > 0
    batch["block_table"][2, 4] = NUM_BLOCKS  # request 2 holds 77 tokens: 5 blocks, column 4 is read
    batch["block_table"][1, 3] = 10**6  # request 1 holds 1 token: column 3 is not
    with pytest.raises(PageTableViolation) as info:
        with PagedSanitizer(mode="raise") as san:
            call(vllm, batch)
    v = info.value.violations[0]
    assert (v.check, v.arg, v.index, v.value, v.bound) == ("page-out-of-range", "block_table", (2, 4), NUM_BLOCKS,
                                                           NUM_BLOCKS)
    assert [(w.check, w.index) for w in san.reports if w.severity == "warning"] == [
        ("dead-page-out-of-range", (1, 3))]


def test_vllm_flash_window_start_by_version(vllm):
    """FA3's fork starts a window at its first key (exact); FA2 at a whole tile of up to 256
    tokens: pages such a tile may cover count as read."""
    batch = flash_batch(lengths=(64,), q_lens=(1,))
    batch["block_table"][0, :2] = NUM_BLOCKS + 7  # tokens 0..31; a window of 20 attends keys 43..63
    with PagedSanitizer(mode="raise") as san:
        call_flash(vllm, batch, window_size=(20, 0), fa_version=3)
    assert [(v.check, v.index, v.count) for v in san.reports] == [("dead-page-out-of-range", (0, 0), 2)]
    with pytest.raises(PageTableViolation) as info:
        with PagedSanitizer(mode="raise"):
            call_flash(vllm, batch, window_size=(20, 0), fa_version=2)
    assert [v.index for v in info.value.violations] == [(0, 0)]


def test_vllm_flash_mla_dense_reads_column_0_even_at_length_0(vllm):
    flash_mla = vllm[2]
    gen = torch.Generator().manual_seed(1)
    k_cache = torch.randn(NUM_BLOCKS, 64, 1, 40, generator=gen)
    table = torch.tensor([[3, 9], [5, 0]], dtype=torch.int32)
    lengths = torch.tensor([70, 0], dtype=torch.int32)
    q = torch.randn(2, 1, 4, 40, generator=gen)

    def call():
        return flash_mla.flash_mla_with_kvcache(q, k_cache, table, lengths, 32, None, causal=True)

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
        with pytest.raises(AssertionError):  # the stand-in's dense-only path: the call got there
            flash_mla.flash_mla_with_kvcache(q, k_cache, None, lengths, 32, None, indices=torch.zeros(2, 1, 8))
    assert [(v.check, v.arg) for v in san.reports] == [("unsupported-form", "indices")]
