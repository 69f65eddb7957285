"""The built-in rule for FlashAttention's ``flash_attn_with_kvcache``.

flash-attn cannot be installed on this CPU machine (``pip install flash-attn --no-deps`` builds
its CUDA extension from the sdist: no CUDA toolkit, no reachable prebuilt wheel). So the tests
go through a REAL module built here, ``flash_attn/flash_attn_interface.py`` written to a temp
directory and imported as the package ``flash_attn``, whose ``flash_attn_with_kvcache`` has the
exact signature of flash-attn 2.8.3 and a real CPU implementation of the paged path: it
refuses a page size that is not a multiple of 256 (``mha_fwd_kvcache``'s own check), writes
the new ``k``/``v`` tokens through ``block_table``, and gathers each row's pages
``[first, ceil(L / page_size))`` the way the kernel does (IndexError on a page past the end,
a silent wrong page for a negative one). The rule itself is the built-in one, untouched.
Valid inputs are built like flash-attn's ``tests/test_flash_attn.py``
(``_generate_block_kvcache``: ``block_table = randperm(num_blocks)`` reshaped to rows).
"""

import importlib
import math
import sys
import textwrap

import pytest
import torch

from tsan_paged import PagedSanitizer, PageTableViolation

INTERFACE = textwrap.dedent('''
    """A CPU flash_attn.flash_attn_interface for the tests: flash-attn 2.8.3's signature."""
    import math
    from typing import Optional, Union

    import torch


    def flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        k=None,
        v=None,
        rotary_cos=None,
        rotary_sin=None,
        cache_seqlens: Optional[Union[(int, torch.Tensor)]] = None,
        cache_batch_idx: Optional[torch.Tensor] = None,
        cache_leftpad: Optional[torch.Tensor] = None,
        block_table: Optional[torch.Tensor] = None,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),  # -1 means infinite context window
        softcap=0.0, # 0.0 means deactivated
        rotary_interleaved=True,
        alibi_slopes=None,
        num_splits=0,
        return_softmax_lse=False,
    ):
        assert block_table is not None, "this CPU module implements the paged path only"
        batch, seqlen_q, heads, dim = q.shape
        num_blocks, page_size, heads_k = k_cache.shape[:3]
        if page_size % 256:
            raise RuntimeError("Paged KV cache block size must be divisible by 256")
        width = block_table.shape[1]
        if cache_seqlens is None:
            cache_seqlens = torch.full((batch,), width * page_size, dtype=torch.int32)
        elif isinstance(cache_seqlens, int):
            cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32)
        scale = softmax_scale or dim ** -0.5
        out = torch.empty_like(q)
        new = k.shape[1] if k is not None else 0
        left = window_size[0] if window_size[0] < width * page_size else -1
        for b in range(batch):
            start = int(cache_seqlens[b])
            for t in range(new):  # append the new tokens through the table
                page = int(block_table[b, (start + t) // page_size])
                k_cache[page, (start + t) % page_size] = k[b, t]
                v_cache[page, (start + t) % page_size] = v[b, t]
            length = start + new
            first = max(length - seqlen_q - left, 0) // page_size if left >= 0 else 0
            pages = block_table[b, first:math.ceil(length / page_size)].long()
            keys = k_cache[pages].reshape(-1, heads_k, dim)[: length - first * page_size]
            values = v_cache[pages].reshape(-1, heads_k, dim)[: length - first * page_size]
            keys = keys.repeat_interleave(heads // heads_k, dim=1)
            values = values.repeat_interleave(heads // heads_k, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q[b], keys) * scale
            pos = torch.arange(first * page_size, length)
            row = torch.arange(seqlen_q).unsqueeze(1) + length - seqlen_q
            mask = torch.ones(seqlen_q, pos.numel(), dtype=torch.bool)
            if causal:
                mask &= pos <= row
            if left >= 0:
                mask &= pos >= row - left
            scores = scores.masked_fill(~mask, float("-inf"))
            out[b] = torch.einsum("hqk,khd->qhd", scores.softmax(-1).nan_to_num(), values)
        return out
''')


@pytest.fixture
def fa(tmp_path, monkeypatch):
    """The package ``flash_attn`` (with the re-export) from a temp directory, removed afterwards."""
    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "flash_attn_interface.py").write_text(INTERFACE)
    (package / "__init__.py").write_text("from flash_attn.flash_attn_interface import flash_attn_with_kvcache\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("flash_attn", "flash_attn.flash_attn_interface"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    module = importlib.import_module("flash_attn")
    yield module
    for name in ("flash_attn", "flash_attn.flash_attn_interface"):
        sys.modules.pop(name, None)


def kvcache_batch(batch=3, seqlen_k=600, page_size=256, seqlen_q=1, seqlen_new=0, heads=4, heads_k=2, dim=8,
                  seed=0):
    """As flash-attn's test_flash_attn_kvcache / _generate_block_kvcache build them."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = math.ceil(seqlen_k / page_size) * batch * 3
    k_cache = torch.randn(num_blocks, page_size, heads_k, dim, generator=gen)
    v_cache = torch.randn(num_blocks, page_size, heads_k, dim, generator=gen)
    block_table = torch.randperm(num_blocks, generator=gen).to(torch.int32).reshape(batch, -1)
    cache_seqlens = torch.randint(0 if seqlen_new else 1, seqlen_k - seqlen_new + 1, (batch,), generator=gen,
                                  dtype=torch.int32)
    args = dict(q=torch.randn(batch, seqlen_q, heads, dim, generator=gen), k_cache=k_cache, v_cache=v_cache,
                cache_seqlens=cache_seqlens, block_table=block_table, causal=True)
    if seqlen_new:
        args["k"] = torch.randn(batch, seqlen_new, heads_k, dim, generator=gen)
        args["v"] = torch.randn(batch, seqlen_new, heads_k, dim, generator=gen)
    return args


def summary(violations):
    return [(v.check, v.arg, v.index, v.value, v.bound) for v in violations]


@pytest.mark.parametrize("seqlen_new", [0, 3])
@pytest.mark.parametrize("seed", range(4))
def test_valid_batches_run(fa, seqlen_new, seed):
    args = kvcache_batch(seqlen_q=max(seqlen_new, 1), seqlen_new=seqlen_new, seed=seed)
    with PagedSanitizer(mode="raise") as san:
        out = fa.flash_attn_interface.flash_attn_with_kvcache(**args)
    assert out.shape == args["q"].shape and san.reports == []


def test_live_fault_at_its_index_through_both_bindings(fa):
    args = kvcache_batch(seed=1)
    args["cache_seqlens"][:] = torch.tensor([600, 300, 10], dtype=torch.int32)  # 3, 2 and 1 pages
    num_blocks = args["k_cache"].shape[0]
    args["block_table"][1, 1] = num_blocks
    for owner in (fa, fa.flash_attn_interface):  # the re-export and the defining module, looked up at call time
        with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation) as info:
            owner.flash_attn_with_kvcache(**args)
        assert summary(info.value.violations) == [("page-out-of-range", "block_table", (1, 1), num_blocks,
                                                   num_blocks)]
    with pytest.raises(IndexError):  # what the kernel would do with it (here: the CPU reference)
        fa.flash_attn_with_kvcache(**args)


def test_dead_entries_are_warnings_and_the_call_runs(fa):
    args = kvcache_batch(seed=2)
    args["cache_seqlens"][:] = torch.tensor([600, 300, 10], dtype=torch.int32)
    args["block_table"][2, 1:] = 10**6  # row 2 holds 10 tokens: one page read
    with PagedSanitizer(mode="raise") as san:
        fa.flash_attn_with_kvcache(**args)
    assert summary(san.reports) == [("dead-page-out-of-range", "block_table", (2, 1), 10**6,
                                     args["k_cache"].shape[0])]


def test_new_tokens_extend_the_read_region(fa):
    args = kvcache_batch(seqlen_q=4, seqlen_new=4, seed=3)
    args["cache_seqlens"][:] = torch.tensor([254, 512, 1], dtype=torch.int32)
    args["block_table"][0, 1] = -1  # 254 + 4 new tokens = 258: page 1 is written and read
    with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation) as info:
        fa.flash_attn_with_kvcache(**args)
    assert summary(info.value.violations) == [("page-out-of-range", "block_table", (0, 1), -1,
                                               args["k_cache"].shape[0])]


def test_window_starts_at_its_page(fa):
    args = kvcache_batch(seed=4, seqlen_k=1024)
    args["cache_seqlens"][:] = 900
    args["window_size"] = (100, 0)  # first key 900 - 1 - 100 = 799 -> page 3
    args["block_table"][0, 2] = 10**6
    args["block_table"][1, 3] = 10**6
    with PagedSanitizer(mode="log") as san:
        with pytest.raises(IndexError):
            fa.flash_attn_with_kvcache(**args)  # the live one fails in the CPU reference too
    assert sorted((v.check, v.index) for v in san.reports) == [("dead-page-out-of-range", (0, 2)),
                                                               ("page-out-of-range", (1, 3))]


def test_without_cache_seqlens_the_whole_row_is_read(fa):
    args = kvcache_batch(seed=5)
    del args["cache_seqlens"]
    args["block_table"][2, -1] = 10**6
    with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation) as info:
        fa.flash_attn_with_kvcache(**args)
    assert info.value.violations[0].index == (2, args["block_table"].shape[1] - 1)


@pytest.mark.parametrize("mutate,check,arg,value,bound", [
    (lambda a: a.update(k_cache=a["k_cache"][:, :128], v_cache=a["v_cache"][:, :128]), "shape-mismatch", "k_cache",
     128, 256),
    (lambda a: a.update(block_table=a["block_table"].long()), "bad-dtype", "block_table", "torch.int64", "int32"),
    (lambda a: a["cache_seqlens"].__setitem__(0, 10**5), "seq-len-exceeds-table", "cache_seqlens", 10**5, 2304),
    (lambda a: a["cache_seqlens"].__setitem__(1, -5), "negative-seq-len", "cache_seqlens", -5, 0),
])
def test_argument_checks(fa, mutate, check, arg, value, bound):
    args = kvcache_batch(seed=6)
    mutate(args)
    with PagedSanitizer(mode="log") as san:
        try:
            fa.flash_attn_with_kvcache(**args)
        except (RuntimeError, IndexError):
            pass  # the CPU module refuses or trips on it, as the CUDA one would
    [v] = [v for v in san.reports if v.check == check]
    assert (v.arg, v.value, v.bound) == (arg, value, bound)


@pytest.mark.parametrize("seqlen_new, guard", [(0, 0), (3, None)])
def test_appending_new_tokens_leaves_no_guard_value(fa, seqlen_new, guard):
    """New k / v are WRITTEN through the table: rewriting a bad entry to page 0 (the device's
    guard action) would overwrite page 0, so such a call has no guard (it traps or reports)."""
    from tsan_paged.access import PageTable
    from tsan_paged.registry import Call, SignatureBinder, registry
    from tsan_paged.rules.flash_attn import FLASH_ATTN_WITH_KVCACHE

    args = kvcache_batch(seqlen_q=max(seqlen_new, 1), seqlen_new=seqlen_new)
    arguments = SignatureBinder(fa.flash_attn_interface.flash_attn_with_kvcache).bind((), args)
    [rule] = registry.for_target(FLASH_ATTN_WITH_KVCACHE)
    [access] = [a for a in rule.check(Call(FLASH_ATTN_WITH_KVCACHE, arguments)) if isinstance(a, PageTable)]
    assert access.guard == guard and access.length_offset == seqlen_new
