"""vLLM's dispatcher ops: the built-in rules, on real torch.library ops with vLLM's schemas.

The ops are stand-ins for vLLM's compiled extensions (``vllm_ops.py``: vLLM's schemas, CPU
kernels), so these tests run in every CI tier. vLLM's own Python (its kernels, backends,
interfaces and ``_custom_ops`` wrappers over these ops) is tested in ``test_vllm_python.py``
where vLLM is installed.
"""

import contextlib
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


def test_calls_on_meta_and_fake_tensors_are_not_checked():
    """vLLM's own cache tests run ``torch.library.opcheck`` on these ops: its fake-tensor and AOT
    passes call them with meta / fake tensors, which hold no values (and no kernel reads memory).
    They are not checked (a rule reading values there raised rule-error) nor counted."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = torch.ops._C_cache_ops.reshape_and_cache
    args = cache_inputs(False)
    with PagedSanitizer(mode="raise") as san:
        # the stand-in has no meta kernel: the dispatcher's own error, once the sanitizer let the call by
        with pytest.raises(NotImplementedError, match="Meta tensors"):
            op(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
        with FakeTensorMode() as mode, contextlib.suppress(NotImplementedError, RuntimeError):
            op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        assert san.reports == [] and not san.checked, (san.reports, san.checked)
        try:
            torch.library.opcheck(op, tuple(args))
        except Exception:  # the stand-in's own opcheck verdict is not what this tests
            pass
        op(*args)  # a real call still is
    assert san.reports == [], [str(v) for v in san.reports]
    assert san.checked[("_C_cache_ops::reshape_and_cache", "host")] >= 1
