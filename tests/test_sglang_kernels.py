"""SGLang 0.5.23's own paged kernels and KV writes under the sanitizer (``rules/sglang.py``).

Everything called here is SGLang's code, unmodified:

- the Triton kernels of its ``triton`` backend (``decode_attention_fwd``,
  ``extend_attention_fwd``, ``extend_attention_fwd_unified``) RUN on a CPU under Triton's
  interpreter, on CSR slot lists built by SGLang's own ``create_flashinfer_kv_indices_triton``:
  valid lists give no report and the kernel's output matches a reference; a planted slot is
  caught before the kernel at ``(request, position)``; garbage past ``kv_indptr[-1]`` (SGLang
  over-allocates ``kv_indices``) is never reported;
- its FlashAttention 3 / 4 wrappers (the ``fa3`` / ``fa4`` backends' entry,
  ``flash_attention.flash_attn_with_kvcache(..., ver=3|4)``) refuse a CPU after the check:
  their own ``NotImplementedError`` / ``ImportError`` proves the call got there;
- its KV pools' writes (``MHATokenToKVPool.set_kv_buffer``, ``MLATokenToKVPool.set_mla_kv_buffer``).

The backend-level tests drive ``TritonAttnBackend`` and ``FlashAttentionBackend`` (``fa3``)
themselves (``sglang_driver.py``): their ``init_forward_metadata`` builds the tables, their
``forward_decode`` / ``forward_extend`` call the kernel.
"""

import os

import pytest

import needs_sglang  # noqa: F401 - skips this module without SGLang

import torch  # noqa: E402

import sglang_driver as sd  # noqa: E402
from sglang.kernels.ops.attention import decode_attention, extend_attention, flash_attention  # noqa: E402
from sglang.kernels.ops.attention.kv_indices import create_flashinfer_kv_indices_triton  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool  # noqa: E402
from tsan_paged import PagedSanitizer, PageTableViolation  # noqa: E402

HEADS, KV_HEADS, DIM = 4, 2, 16
SLOTS = 96  # KV pool rows (slot 0 is SGLang's padding slot)


def slot_lists(lengths, seed=0, spare=16):
    """Requests of ``lengths`` tokens, their slots written into a ``req_to_token`` table the way
    the allocator does, and the CSR ``kv_indptr`` / ``kv_indices`` SGLang's kernel builds from
    it (``kv_indices`` over-allocated by ``spare`` entries holding garbage, as SGLang leaves them)."""
    g = torch.Generator().manual_seed(seed)
    batch, width = len(lengths), max(lengths) + 8
    req_to_token = torch.zeros(batch + 2, width, dtype=torch.int32)
    slots = torch.randperm(SLOTS - 1, generator=g)[: sum(lengths)] + 1
    rows = torch.arange(1, batch + 1)
    pt = 0
    for row, n in zip(rows.tolist(), lengths):
        req_to_token[row, :n] = slots[pt:pt + n].to(torch.int32)
        pt += n
    lens = torch.tensor(lengths, dtype=torch.int32)
    kv_indptr = torch.zeros(batch + 1, dtype=torch.int32)
    kv_indptr[1:] = torch.cumsum(lens, 0)
    kv_indices = torch.full((sum(lengths) + spare,), 10**9, dtype=torch.int64)  # never read
    create_flashinfer_kv_indices_triton[(batch,)](req_to_token, rows, lens, kv_indptr, None, kv_indices,
                                                  req_to_token.stride(0))
    return kv_indptr, kv_indices


def kv_buffers(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SLOTS, KV_HEADS, DIM, generator=g), torch.randn(SLOTS, KV_HEADS, DIM, generator=g)


def reference(q, k, v, slots, causal_from=None):
    """Attention of ``q [n, H, D]`` over the KV rows ``slots`` (causal: query i sees the first
    ``causal_from + i + 1`` of them)."""
    keys = k[slots].repeat_interleave(HEADS // KV_HEADS, dim=1)
    values = v[slots].repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = torch.einsum("nhd,thd->nht", q, keys) * DIM ** -0.5
    if causal_from is not None:
        visible = torch.arange(len(slots))[None, :] <= causal_from + torch.arange(q.shape[0])[:, None]
        scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    return torch.einsum("nht,thd->nhd", scores.softmax(-1), values)


def decode(q, k, v, kv_indptr, kv_indices):
    batch, splits = q.shape[0], 4
    o = torch.empty(batch, HEADS, DIM)
    logits, lse = torch.empty(batch, HEADS, splits, DIM), torch.empty(batch, HEADS, splits)
    num_splits = torch.full((batch,), 2, dtype=torch.int32)
    decode_attention.decode_attention_fwd(q, k, v, o, kv_indptr, kv_indices, logits, lse, num_splits, splits,
                                          DIM ** -0.5, 1.0, 1.0)
    return o


def test_triton_decode_valid_lists_run_and_match_a_reference():
    lengths = [5, 37, 1, 20]
    kv_indptr, kv_indices = slot_lists(lengths)
    k, v = kv_buffers()
    q = torch.randn(len(lengths), HEADS, DIM, generator=torch.Generator().manual_seed(2))
    with PagedSanitizer(mode="raise") as sanitizer:
        o = decode(q, k, v, kv_indptr, kv_indices)
    assert sanitizer.reports == []
    for b in range(len(lengths)):
        slots = kv_indices[kv_indptr[b]:kv_indptr[b + 1]]
        torch.testing.assert_close(o[b], reference(q[b:b + 1], k, v, slots)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("value", [SLOTS, -3, 2**40])
def test_triton_decode_planted_slot_caught_at_request_and_position(value):
    lengths = [5, 37, 1, 20]
    kv_indptr, kv_indices = slot_lists(lengths)
    k, v = kv_buffers()
    q = torch.randn(len(lengths), HEADS, DIM)
    kv_indices[int(kv_indptr[1]) + 30] = value
    with pytest.raises(PageTableViolation) as caught:
        with PagedSanitizer(mode="raise"):
            decode(q, k, v, kv_indptr, kv_indices)
    found = caught.value.violations[0]
    assert (found.check, found.arg, found.index, found.value, found.bound) == (
        "page-out-of-range", "kv_indices", (1, 30), value, SLOTS)
    assert "slot 30 of the row" in found.message and "96 slots" in found.message


def test_triton_decode_grouped_and_normal_variants_are_checked_directly():
    """The backend keeps ``torch.compiler.disable(decode_attention_fwd)`` from its ``__init__``;
    the variants it calls through module globals are targets too."""
    kv_indptr, kv_indices = slot_lists([4, 9])
    kv_indices[2] = SLOTS + 1
    k, v = kv_buffers()
    q = torch.randn(2, HEADS, DIM)
    logits, lse = torch.empty(2, HEADS, 2, DIM), torch.empty(2, HEADS, 2)
    with pytest.raises(PageTableViolation) as caught:
        with PagedSanitizer(mode="raise"):
            decode_attention.decode_attention_fwd_grouped(q, k, v, torch.empty(2, HEADS, DIM), kv_indptr, kv_indices,
                                                          logits, lse, torch.ones(2, dtype=torch.int32), 2,
                                                          DIM ** -0.5, 1.0)
    assert caught.value.violations[0].index == (0, 2)


def extend_inputs(prefix, extend, seed=3):
    kv_indptr, kv_indices = slot_lists(prefix, seed=seed)
    g = torch.Generator().manual_seed(seed)
    qo_indptr = torch.zeros(len(extend) + 1, dtype=torch.int64)
    qo_indptr[1:] = torch.cumsum(torch.tensor(extend), 0)
    tokens = int(qo_indptr[-1])
    q = torch.randn(tokens, HEADS, DIM, generator=g)
    k_new, v_new = torch.randn(tokens, KV_HEADS, DIM, generator=g), torch.randn(tokens, KV_HEADS, DIM, generator=g)
    return q, k_new, v_new, qo_indptr, kv_indptr, kv_indices


def run_extend(q, k_new, v_new, qo_indptr, kv_indptr, kv_indices, k, v):
    o = torch.empty_like(q)
    extend_attention.extend_attention_fwd(q, k_new, v_new, o, k, v, qo_indptr, kv_indptr, kv_indices, None, True,
                                          None, int((qo_indptr[1:] - qo_indptr[:-1]).max()), 1.0, 1.0)
    return o


def test_triton_extend_valid_prefix_lists_run_and_match_a_reference():
    prefix, extend = [7, 0, 19], [3, 5, 2]
    q, k_new, v_new, qo_indptr, kv_indptr, kv_indices = extend_inputs(prefix, extend)
    k, v = kv_buffers()
    with PagedSanitizer(mode="raise") as sanitizer:
        o = run_extend(q, k_new, v_new, qo_indptr, kv_indptr, kv_indices, k, v)
    assert sanitizer.reports == []
    for b, (p, n) in enumerate(zip(prefix, extend)):
        rows = slice(int(qo_indptr[b]), int(qo_indptr[b + 1]))
        keys = torch.cat([k[kv_indices[kv_indptr[b]:kv_indptr[b + 1]]], k_new[rows]])
        values = torch.cat([v[kv_indices[kv_indptr[b]:kv_indptr[b + 1]]], v_new[rows]])
        expected = reference(q[rows], keys, values, torch.arange(p + n), causal_from=p)
        torch.testing.assert_close(o[rows], expected, rtol=1e-3, atol=1e-3)


def test_triton_extend_planted_prefix_slot_caught():
    q, k_new, v_new, qo_indptr, kv_indptr, kv_indices = extend_inputs([7, 0, 19], [3, 5, 2])
    kv_indices[int(kv_indptr[2]) + 11] = SLOTS + 5
    k, v = kv_buffers()
    with pytest.raises(PageTableViolation) as caught:
        with PagedSanitizer(mode="raise"):
            run_extend(q, k_new, v_new, qo_indptr, kv_indptr, kv_indices, k, v)
    found = caught.value.violations[0]
    assert (found.check, found.index, found.value) == ("page-out-of-range", (2, 11), SLOTS + 5)


def test_triton_extend_unified_lists_both_ways():
    """``extend_attention_fwd_unified``: prefix and new tokens' slots in one list per request."""
    kv_indptr, kv_indices = slot_lists([9, 14])  # prefix + extend, as build_unified_kv_indices lays them out
    qo_indptr = torch.tensor([0, 2, 5], dtype=torch.int64)
    prefix_lens = torch.tensor([7, 11], dtype=torch.int32)
    k, v = kv_buffers()
    q = torch.randn(5, HEADS, DIM)

    def call():
        extend_attention.extend_attention_fwd_unified(q, torch.empty_like(q), k, v, 1.0, 1.0, qo_indptr, kv_indptr,
                                                      kv_indices, prefix_lens, 3)

    with PagedSanitizer(mode="raise") as sanitizer:
        call()
    assert sanitizer.reports == []
    kv_indices[int(kv_indptr[1]) + 13] = -1
    with pytest.raises(PageTableViolation) as caught:
        with PagedSanitizer(mode="raise"):
            call()
    assert caught.value.violations[0].index == (1, 13)


# -- FlashAttention 3 / 4 through SGLang's wrappers -----------------------------------------
def fa_inputs(page_size, lengths=(5, 40, 17, 300), seed=4):
    """A page table built the way the fa3 backend builds it (``flashattention_backend.py``:
    ``req_to_token[req_pool_indices, :max_seq_len_k]``, then ``[:, ::page_size] // page_size``
    for page_size > 1), from SGLang's allocator-style token slots."""
    g = torch.Generator().manual_seed(seed)
    pages = sum(-(-n // page_size) for n in lengths) + 8
    max_len = max(lengths)
    req_to_token = torch.zeros(len(lengths), max_len + page_size, dtype=torch.int32)
    free = (torch.randperm(pages - 1, generator=g) + 1).tolist()
    for b, n in enumerate(lengths):
        for j in range(-(-n // page_size)):
            page = free.pop()
            req_to_token[b, j * page_size:(j + 1) * page_size] = torch.arange(page * page_size, (page + 1) * page_size)
    page_table = req_to_token[:, :max_len]
    if page_size > 1:
        page_table = page_table[:, ::page_size] // page_size
    cache = torch.randn(pages, page_size, KV_HEADS, DIM, generator=g)
    return dict(q=torch.randn(len(lengths), HEADS, DIM, generator=g), k_cache=cache, v_cache=cache.clone(),
                page_table=page_table.contiguous(), cache_seqlens=torch.tensor(lengths, dtype=torch.int32),
                cu_seqlens_q=torch.arange(len(lengths) + 1, dtype=torch.int32), max_seqlen_q=1)


REFUSAL = {3: (NotImplementedError, "flash_attention_v3.py"), 4: (ImportError, "flash_attention_v4.py")}


def reaches_sglang_fa(ver, **kwargs):
    """Call SGLang's FA entry; True when the wrapper of version ``ver`` itself refused the CPU."""
    error, where = REFUSAL[ver]
    with pytest.raises(error) as refused:
        flash_attention.flash_attn_with_kvcache(ver=ver, **kwargs)
    tb = refused.value.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename.endswith(where)


@pytest.mark.parametrize("ver", [3, 4])
@pytest.mark.parametrize("page_size", [1, 16])
def test_fa_valid_tables_pass_and_reach_the_wrapper(ver, page_size):
    batch = fa_inputs(page_size)
    with PagedSanitizer(mode="raise") as sanitizer:
        assert reaches_sglang_fa(ver, **batch)
    assert sanitizer.reports == []


@pytest.mark.parametrize("ver", [3, 4])
def test_fa_live_entry_caught_dead_entry_warned(ver):
    batch = fa_inputs(16)
    pages = batch["k_cache"].shape[0]
    batch["page_table"][3, 18] = pages  # request 3 holds 300 tokens: 19 pages, column 18 is read
    batch["page_table"][0, 5] = 10**6  # request 0 holds 5 tokens: column 5 is never read
    with pytest.raises(PageTableViolation) as caught:
        with PagedSanitizer(mode="raise") as sanitizer:
            flash_attention.flash_attn_with_kvcache(ver=ver, **batch)
    found = caught.value.violations[0]
    assert (found.check, found.arg, found.index, found.value, found.bound) == (
        "page-out-of-range", "page_table", (3, 18), pages, pages)
    dead = [v for v in sanitizer.reports if v.check == "dead-page-out-of-range"]
    assert [(v.index, v.severity) for v in dead] == [((0, 5), "warning")]


def test_fa_window_skips_pages_only_below_the_largest_tile():
    """A local window: pages wholly below ``S - 223`` tokens are dead for every tile FA3 may
    use; those up to the window start may be loaded (a tile-rounded start) and are live."""
    batch = fa_inputs(16, lengths=(600,), seed=5)
    batch["q"] = batch["q"][:1]
    pages = batch["k_cache"].shape[0]
    window = 100  # S = 600 - 1 - 100 = 499 tokens skipped; 499 - 223 = 276 -> pages below 17 are dead
    batch["page_table"][0, 16] = pages
    batch["page_table"][0, 17] = pages + 1
    with pytest.raises(PageTableViolation) as caught:
        with PagedSanitizer(mode="raise") as sanitizer:
            flash_attention.flash_attn_with_kvcache(ver=3, window_size=(window, 0), **batch)
    assert [(v.check, v.index) for v in caught.value.violations] == [("page-out-of-range", (0, 17))]
    assert [(v.check, v.index) for v in sanitizer.reports if v.severity == "warning"] == [
        ("dead-page-out-of-range", (0, 16))]


def test_fa_cache_batch_idx_form_is_reported_not_guessed():
    batch = fa_inputs(16)
    with PagedSanitizer(mode="log") as sanitizer:
        reaches_sglang_fa(3, cache_batch_idx=torch.arange(4, dtype=torch.int32), **batch)
    assert [(v.check, v.arg, v.severity) for v in sanitizer.reports] == [
        ("unsupported-form", "cache_batch_idx", "warning")]


# -- KV pool writes --------------------------------------------------------------------------
def mha_pool(page_size):
    return MHATokenToKVPool(64, page_size, torch.bfloat16, KV_HEADS, DIM, layer_num=1, device="cpu",
                            enable_memory_saver=False)


class Layer:  # what set_kv_buffer reads of a RadixAttention
    layer_id = 0


@pytest.mark.parametrize("page_size", [1, 16])
def test_pool_write_valid_slots_written_planted_slot_caught(page_size):
    pool = mha_pool(page_size)
    rows = pool.size + pool.page_size  # the buffers' rows: the pool reserves a padding page
    loc = torch.tensor([1, 5, rows - 1, 0], dtype=torch.int64)
    k = torch.randn(4, KV_HEADS, DIM).to(torch.bfloat16)
    with PagedSanitizer(mode="raise") as sanitizer:
        pool.set_kv_buffer(Layer(), loc, k, k.clone())
    assert sanitizer.reports == []
    assert torch.equal(pool.get_key_buffer(0)[rows - 1], k[2])
    for bad in (rows, -1):
        loc[1] = bad
        with pytest.raises(PageTableViolation) as caught:
            with PagedSanitizer(mode="raise"):
                pool.set_kv_buffer(Layer(), loc, k, k.clone())
        found = caught.value.violations[0]
        assert (found.check, found.arg, found.index, found.value, found.bound) == (
            "page-out-of-range", "loc", (1,), bad, rows)


@pytest.mark.parametrize("interpret", [False, True], ids=["torch", "device kernel (interpreted)"])
def test_pool_prefix_valid_write_checks_each_rows_committed_slots(interpret):
    """``MHATokenToKVPool.set_kv_buffer_prefix_valid`` (DFlash's draft-KV commit): row b writes
    ``loc_2d[b, :commit_lens[b]]``. Past a row's commit length the slots are not written: stale
    values there are dead warnings, never errors; a committed slot past the pool is an error at
    (row, column); a commit length past the row is too. Through SGLang's own method (on a CPU it
    writes with set_kv_buffer, which is not checked a second time)."""
    pool = mha_pool(1)
    rows = pool.size + pool.page_size
    loc_2d = torch.tensor([[3, 4, 5, rows + 7], [10, 11, -1, -1]], dtype=torch.int32)  # stale tails
    commit_lens = torch.tensor([3, 2], dtype=torch.int32)
    k = torch.randn(8, KV_HEADS, DIM).to(torch.bfloat16)
    target = "sglang.srt.mem_cache.memory_pool:MHATokenToKVPool.set_kv_buffer_prefix_valid"
    san = PagedSanitizer(mode="raise")
    san.options.device_interpret = interpret
    with san:
        pool.set_kv_buffer_prefix_valid(Layer(), loc_2d, commit_lens, k, k.clone())
    [stale] = san.reports  # one finding per check: the first entry, and how many
    assert (stale.check, stale.index, stale.count) == ("dead-page-out-of-range", (0, 3), 3)
    assert torch.equal(pool.get_key_buffer(0)[11], k[5]) and dict(san.checked) == {(target, "host"): 1}
    loc_2d[1, 1] = rows
    with pytest.raises(PageTableViolation) as caught, san:
        pool.set_kv_buffer_prefix_valid(Layer(), loc_2d, commit_lens, k, k.clone())
    found = caught.value.violations[0]
    assert (found.op, found.check, found.arg, found.index, found.value, found.bound) == (
        target, "page-out-of-range", "loc_2d", (1, 1), rows, rows)
    assert f"has {rows} slots" in found.message
    loc_2d[1, 1] = 11
    commit_lens[0] = 5  # more than the row holds: its stale slot is committed too
    with pytest.raises(PageTableViolation) as caught, san:
        pool.set_kv_buffer_prefix_valid(Layer(), loc_2d, commit_lens, k, k.clone())
    assert sorted((v.check, v.arg, v.index) for v in caught.value.violations if v.severity == "error") == [
        ("page-out-of-range", "loc_2d", (0, 3)), ("seq-len-exceeds-table", "commit_lens", (0,))]


def native_decode_inputs(lengths=(7, 30, 12), seed=3):
    """What SGLang's torch_native decode reads: req_to_token rows (token slots), the batch's rows of
    it, lengths, and per-token K / V."""
    g = torch.Generator().manual_seed(seed)
    req_to_token = torch.zeros(6, 40, dtype=torch.int32)
    slots = torch.randperm(SLOTS - 1, generator=g)[: sum(lengths)] + 1
    rows, start = [4, 1, 2], 0
    for row, n in zip(rows, lengths):
        req_to_token[row, :n] = slots[start:start + n].to(torch.int32)
        req_to_token[row, n:] = 10**6  # past a row's length: never read (SGLang leaves stale values there)
        start += n
    k, v = kv_buffers(seed)
    q = torch.randn(len(lengths), HEADS, DIM, generator=g)
    return q, k, v, req_to_token, torch.tensor(rows), torch.tensor(lengths)


def native_decode(q, k, v, req_to_token, req_pool_indices, seq_lens):
    """SGLang's own torch_native decode (the method, called as its backend's forward_decode does)."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    o = torch.empty_like(q)
    return TorchNativeAttnBackend._run_sdpa_forward_decode(None, q, o, k, v, req_to_token, req_pool_indices, seq_lens,
                                                            scaling=DIM ** -0.5, enable_gqa=True)


def test_torch_native_decode_valid_rows_pass_and_match_a_reference():
    q, k, v, req_to_token, rows, lengths = native_decode_inputs()
    with PagedSanitizer(mode="raise") as san:
        out = native_decode(q, k, v, req_to_token, rows, lengths)
    # only the stale values past each row's length, never read: a warning, the call goes on
    assert [(v.check, v.index) for v in san.reports] == [("dead-page-out-of-range", (0, 7))]
    for b, (row, n) in enumerate(zip(rows.tolist(), lengths.tolist())):
        slots = req_to_token[row, :n].long()
        torch.testing.assert_close(out[b], reference(q[b:b + 1], k, v, slots)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("interpret", [False, True], ids=["torch", "device kernel (interpreted)"])
def test_torch_native_decode_planted_slot_caught_at_request_and_position(interpret):
    q, k, v, req_to_token, rows, lengths = native_decode_inputs()
    req_to_token[2, 9] = SLOTS  # request 2 (req_to_token row 2, 12 tokens) reads position 9
    san = PagedSanitizer(mode="raise")
    san.options.device_interpret = interpret
    with san, pytest.raises(PageTableViolation) as caught:
        native_decode(q, k, v, req_to_token, rows, lengths)
    found = caught.value.violations[0]
    assert (found.op, found.check, found.arg, found.index, found.value, found.bound) == (
        "sglang.srt.layers.attention.torch_native_backend:TorchNativeAttnBackend._run_sdpa_forward_decode",
        "page-out-of-range", "req_to_token[req_pool_indices]", (2, 9), SLOTS, SLOTS)
    assert found.caller.startswith("tests/test_sglang_kernels.py:")  # the caller of the private helper
    assert f"k_cache has {SLOTS} slots (valid 0..{SLOTS - 1})" in found.message, found.message
    req_to_token[2, 9] = 1
    rows[0] = 6  # past req_to_token's 6 rows
    with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation) as caught:
        native_decode(q, k, v, req_to_token, rows, lengths)
    assert [(v.arg, v.index, v.value) for v in caught.value.violations] == [("req_pool_indices", (0, 0), 6, )]
    assert "req_pool_indices[0, 0] = 6, req_to_token has 6 rows (valid 0..5)" in caught.value.violations[0].message


def test_mla_pool_write_checked():
    from sglang.srt.runtime_context import get_parallel

    pool = MLATokenToKVPool(64, page_size=1, dtype=torch.bfloat16, kv_lora_rank=32, qk_rope_head_dim=16,
                            layer_num=1, device="cpu", enable_memory_saver=False)
    nope, rope = torch.randn(2, 1, 32).to(torch.bfloat16), torch.randn(2, 1, 16).to(torch.bfloat16)
    with get_parallel().override(attn_dcp_size=1, attn_dcp_rank=0):  # a server without decode context parallel
        with PagedSanitizer(mode="raise") as sanitizer:
            pool.set_mla_kv_buffer(Layer(), torch.tensor([3, 4]), nope, rope)
        assert sanitizer.reports == []
        with pytest.raises(PageTableViolation) as caught:
            with PagedSanitizer(mode="raise"):
                pool.set_mla_kv_buffer(Layer(), torch.tensor([3, 65]), nope, rope)
    assert caught.value.violations[0].index == (1,)


# -- the triton backend itself ---------------------------------------------------------------
STEPS = int(os.environ.get("TSAN_PAGED_SGLANG_TRITON_STEPS", "25"))
TRITON_CONFIGS = {"page1-full": dict(page_size=1), "page64-full": dict(page_size=64),
                  "page64-swa": dict(page_size=64, swa=True)}


def triton_scheduler(name, **kwargs):
    engine = sd.make_engine(attention="triton", **TRITON_CONFIGS[name])
    return sd.Scheduler(engine, seed=7, max_running=4, prompt=(1, 300), output=(1, 40), chunk=128,
                        pad_batches=True, **kwargs)


@pytest.mark.parametrize("name", list(TRITON_CONFIGS))
def test_triton_backend_realistic_sequence_has_no_reports(name):
    scheduler = triton_scheduler(name)
    with PagedSanitizer(mode="raise") as sanitizer:
        stats = scheduler.run(STEPS)
    assert stats.decode_steps > 0 and stats.calls > 0
    assert sanitizer.reports == []


def first_error(scheduler, plant, steps=300):
    """Run ``scheduler`` under ``raise`` with ``plant`` called before each forward's tables are
    built; the first finding the sanitizer raised."""
    scheduler.before_forward = plant
    with pytest.raises(PageTableViolation) as caught:
        with PagedSanitizer(mode="raise"):
            for _ in range(steps):
                scheduler.step()
    return caught.value.violations[0]


def test_triton_backend_live_fault_caught_at_sglang_call():
    """A stale slot in ``req_to_token`` inside a request's length (what the seed's bad table
    held): SGLang's own metadata code copies it into ``kv_indices``, the decode call is stopped."""
    scheduler = triton_scheduler("page64-full")
    engine = scheduler.e
    planted = []

    def plant(reqs, seq_lens, tokens_per_req):  # before a decode step's tables are built
        if not planted and len(reqs) > 1 and seq_lens[1] > 10:
            engine.req_to_token[reqs[1].row, 3] = engine.pool.size + engine.page_size  # one past the pool
            planted.append((1, 3))

    found = first_error(scheduler, plant)
    assert (found.check, found.arg) == ("page-out-of-range", "kv_indices")
    assert found.index == planted[0]
    assert "triton_backend.py" in found.caller


# -- the fa3 backend itself (SGLang's default on Hopper) ------------------------------------
FA3_CONFIGS = {"page1-full": (dict(page_size=1), 0), "page64-full": (dict(page_size=64), 0),
               "page1-swa": (dict(page_size=1, swa=True), 0), "page64-swa-mtp3": (dict(page_size=64, swa=True), 3)}


def fa3_scheduler(name):
    kwargs, draft = FA3_CONFIGS[name]
    engine = sd.make_engine(attention="fa3", draft_tokens=draft, **kwargs)
    return sd.Scheduler(engine, seed=11, max_running=4, prompt=(1, 300), output=(1, 40), chunk=128,
                        draft_tokens=draft, pad_batches=True, on_call=sd.reaches_fa3)


@pytest.mark.parametrize("name", list(FA3_CONFIGS))
def test_fa3_backend_realistic_sequence_has_no_reports(name):
    """``FlashAttentionBackend.init_forward_metadata`` builds ``page_table`` /
    ``cache_seqlens`` (SWA tables through ``full_to_swa_index_mapping``, MTP target-verify),
    ``forward_decode`` / ``forward_extend`` call SGLang's FA3 wrapper: every call is checked,
    none is reported, each reaches the wrapper."""
    scheduler = fa3_scheduler(name)
    with PagedSanitizer(mode="raise") as sanitizer:
        stats = scheduler.run(STEPS)
    assert stats.calls > 0 and (stats.decode_steps or stats.verify_steps)
    assert sanitizer.reports == []


@pytest.mark.parametrize("name", ["page1-full", "page64-full"])
def test_fa3_backend_live_fault_caught_at_sglang_call(name):
    """A stale slot in ``req_to_token`` at the first token of a live page: the backend's
    ``page_table`` (``req_to_token[:, ::page_size] // page_size``) carries it to the kernel call."""
    scheduler = fa3_scheduler(name)
    engine = scheduler.e
    planted = []

    def plant(reqs, seq_lens, tokens_per_req):
        if not planted and len(reqs) > 1 and seq_lens[1] > 2 * engine.page_size:
            bad = engine.pool.size + 5 * engine.page_size  # a page past the pool (page 1: a slot past it)
            engine.req_to_token[reqs[1].row, engine.page_size] = bad
            planted.append((1, 1 if engine.page_size > 1 else engine.page_size, bad // engine.page_size))

    found = first_error(scheduler, plant)
    row, col, value = planted[0]
    assert (found.check, found.arg, found.index, found.value) == ("page-out-of-range", "page_table", (row, col),
                                                                  value)
    assert "flashattention_backend.py" in found.caller and "forward_decode" in found.caller


def test_pool_write_checked_once_per_step_not_per_layer():
    """Every layer writes through the step's one ``loc``: the first layer's write is checked, the
    others' are not; a loc changed in place (a graph's static buffer) is checked again."""
    from tsan_paged.registry import Call, registry

    pool = mha_pool(1)
    target = "sglang.srt.mem_cache.memory_pool:MHATokenToKVPool.set_kv_buffer"
    [rule] = registry.for_target(target)
    loc = torch.tensor([1, 2, 3])
    checked = [len(rule.check(Call(target, {"self": pool, "loc_info": loc}))) for _layer in range(4)]
    assert checked == [1, 0, 0, 0]
    loc[0] = 5  # the next step's slots, written into the same buffer
    assert len(rule.check(Call(target, {"self": pool, "loc_info": loc}))) == 1


# -- track_pages through the triton and fa3 backends --------------------------------------------
TRACKED_BACKENDS = [("triton", "page1-full"), ("triton", "page64-swa"), ("fa3", "page64-full"),
                    ("fa3", "page64-swa-mtp3")]


def tracked_scheduler(attention, name):
    return triton_scheduler(name) if attention == "triton" else fa3_scheduler(name)


@pytest.mark.parametrize("attention,name", TRACKED_BACKENDS)
def test_tracked_backend_realistic_sequence_has_no_page_not_allocated(attention, name):
    """track_pages reaches the Triton backend's CSR slot lists (a derived list) and the fa3
    backend's page tables, graph-padding rows included: 0 reports on a realistic sequence."""
    scheduler = tracked_scheduler(attention, name)
    with PagedSanitizer(mode="raise", track_pages=True) as sanitizer:
        stats = scheduler.run(STEPS)
        scheduler.drain()
    assert stats.calls > 0 and stats.finished > 0
    assert sanitizer.reports == []


@pytest.mark.parametrize("attention,name,device_path", [c + (False,) for c in TRACKED_BACKENDS]
                         + [("triton", "page64-full", True), ("fa3", "page1-full", True)])
def test_tracked_backend_use_after_free_caught_at_the_entry(attention, name, device_path):
    """A request freed with SGLang's own free while its batch still reads it: ``page-not-allocated``
    at the entry ``sd.plant_use_after_free`` names (a slot list names the token slot), with the
    free's stack. ``device_path``: the derived table / list checked by the device kernel (under
    Triton's interpreter), as on a GPU."""
    scheduler = tracked_scheduler(attention, name)
    engine = scheduler.e
    planted = []

    def plant(reqs, seq_lens, tokens_per_req):
        if not planted and len(reqs) > 1 and seq_lens[1] > 2 * engine.page_size:
            planted.append(sd.plant_use_after_free(engine, reqs, seq_lens, tokens_per_req))

    scheduler.before_forward = plant
    with pytest.raises(PageTableViolation) as caught:
        with PagedSanitizer(mode="raise", track_pages=True) as sanitizer:
            sanitizer.options.device_interpret = device_path
            for _ in range(300):
                scheduler.step()
    found = caught.value.violations[0]
    row, col, page = planted[0]
    if attention == "triton":  # kv_indices lists token slots: a window layer's list starts at the window
        expected = ("kv_indices", (row, 0), 0) if engine.swa else ("kv_indices", (row, col), page * engine.page_size)
    else:
        expected = ("page_table", (row, col), page)
    assert (found.check, found.arg, found.index, found.value) == ("page-not-allocated",) + expected
    if engine.swa:  # the free cleared the slots' full->SWA mapping: the window layer reads page 0
        assert "page 0 is SGLang's padding page" in str(caught.value)
    else:
        assert "is FREE" in str(caught.value) and "in plant" in str(caught.value)  # with the free's stack


def test_fa_ragged_batch_tracks_each_rows_own_window():
    """track_pages through SGLang's FA3 wrapper on a mixed batch (a decode row and a 100-token
    extend row: ragged ``cu_seqlens_q``) with a window: row 0's window starts at its own query,
    not the batch's largest, so the pages an SWA-style eviction freed before it are not reported;
    a freed page inside it is, at its column. Pages from SGLang's real paged allocator."""
    engine = sd.make_engine(page_size=16, swa=False)
    alloc, ps = engine.allocator, 16
    k = engine.pool.get_key_buffer(0).view(-1, ps, sd.KV_HEADS, sd.HEAD_DIM)
    v = engine.pool.get_value_buffer(0).view(-1, ps, sd.KV_HEADS, sd.HEAD_DIM)
    with PagedSanitizer(mode="raise", track_pages=True) as sanitizer:
        rows = [alloc.alloc(13 * ps), alloc.alloc(7 * ps)]  # 200 and 100 tokens
        table = torch.zeros(2, 13, dtype=torch.int32)
        for r, slots in enumerate(rows):
            pages = slots[::ps] // ps
            table[r, :pages.numel()] = pages.to(torch.int32)
        call = dict(q=torch.randn(101, sd.HEADS, sd.HEAD_DIM).to(torch.bfloat16), k_cache=k, v_cache=v,
                    page_table=table, cache_seqlens=torch.tensor([200, 100], dtype=torch.int32),
                    cu_seqlens_q=torch.tensor([0, 1, 101], dtype=torch.int32), max_seqlen_q=100,
                    window_size=(31, 0))  # row 0 attends tokens 168..199: columns 10..12
        alloc.free(rows[0][:10 * ps].to(torch.int32))  # columns 0..9 evicted (int32, as req_to_token is)
        assert reaches_sglang_fa(3, **call)
        assert sanitizer.reports == []
        alloc.free(rows[0][10 * ps:11 * ps])
        with pytest.raises(PageTableViolation) as caught:
            flash_attention.flash_attn_with_kvcache(ver=3, **call)
    found = caught.value.violations[0]
    assert (found.check, found.index, found.value) == ("page-not-allocated", (0, 10), int(rows[0][10 * ps]) // ps)
