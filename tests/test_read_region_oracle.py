"""Read-region oracles: each rule whose kernel runs on a CPU, against the kernel itself.

Property-based (hypothesis): random lengths, page sizes, sliding windows, query lengths and
kernel variants; the real kernels run under Triton's interpreter:

- SGLang 0.5.23's Triton decode kernel (``decode_attention_fwd``: its MHA and grouped variants)
  and extend kernel (``extend_attention_fwd``, with and without a sliding window), on CSR slot
  lists SGLang over-allocates (entries past ``kv_indptr[-1]`` are dead);
- vLLM 0.33.0's Triton ``unified_attention`` (windows, ``q_len > 1``, the 2D and split-KV 3D
  kernels), on ``[batch, W]`` block tables;
- SGLang's ``torch_native`` backend (``_run_sdpa_forward_decode`` / ``_extend``, in torch): what it
  gathers is seen exactly, an entry at a time, through torch's own bounds check (an out-of-range
  id there raises ``IndexError``), in place of the interpreter's load trace.

Each example asks the sanitizer which entries are live (``region_oracle.rule_live``), runs the
kernel with each entry's page poisoned with NaN and with its loads traced, and asserts:

- no false negative: an entry the rule calls dead never changes the output and is never
  dereferenced;
- exactness where the rule claims it: every entry the rule calls live is dereferenced. Not
  asserted for SGLang's extend kernel with a sliding window: it skips whole prefix tiles left
  of every query's window (``SKIP_TILE``: tiles of ``BLOCK_N_PREFIX`` keys for ``BLOCK_M``
  queries, sizes it picks per device), while ``rules/sglang.py`` calls the whole prefix list
  live: conservative there, measured here.

A NaN changes the output only where the kernel uses what it loads; a load masked afterwards (a
window's edge inside a loaded tile) still dereferences its page, which only the trace sees.

The tallies (entries probed, false negatives, how many live entries change the output or are
dereferenced, for each request's first and last live entry) print when the module is done.
``TSAN_PAGED_ORACLE_EXAMPLES`` scales the example counts (default: CI's, about two minutes on
two cores).
"""

import contextlib
import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from loguru import logger

import region_oracle as ro

SCALE = float(os.environ.get("TSAN_PAGED_ORACLE_EXAMPLES", "1"))
NAN = float("nan")


def examples(n):
    # no shrinking: each example runs interpreted kernels for seconds; a failure prints its draws
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, database=None,
                    phases=[Phase.explicit, Phase.reuse, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True, scope="module")
def quiet():
    logger.disable("tsan_paged")  # thousands of planted findings: the verdicts are what is read
    yield
    logger.enable("tsan_paged")


def _probe(tally, base, cells_of_request, rows_of, live, page_of, poison, touched, exact=True, key=""):
    """Checks one example and counts it. ``live``: the rule's verdict per entry; ``cells_of_request``:
    each request's entries in order (entries of no request are dead: over-allocation);
    ``poison(pages)``: the kernel's output with those pages NaN in K and V; ``touched``: the pages
    the baseline run dereferenced. Poisons every dead entry at once, then each request's first,
    then last, live entry (requests read disjoint pages: one run probes one entry of each)."""
    tally.examples += 1
    requested = {c for cells in cells_of_request.values() for c in cells}
    dead = [c for c in live if not live[c]]
    tally.dead += len(dead)
    loaded_dead = [c for c in dead if page_of(c) in touched]
    tally.dead_loaded += loaded_dead
    assert not loaded_dead, f"false negative: entries the rule calls dead are dereferenced: {loaded_dead}"
    if dead:
        changed = bool(ro.changed_rows(poison([page_of(c) for c in dead]), base).any())
        if changed:
            tally.dead_changed.append(dead)
        assert not changed, f"false negative: poisoning entries the rule calls dead {dead} changed the output"
    live_cells = [c for c in live if live[c]]
    assert set(live_cells) <= requested, f"the rule calls entries of no request live: {set(live_cells) - requested}"
    tally.live_total[key] += len(live_cells)
    missed = [c for c in live_cells if page_of(c) not in touched]
    tally.live_total_loaded[key] += len(live_cells) - len(missed)
    if exact:
        assert not missed, f"the rule calls entries live that the kernel never dereferences: {missed}"
    for where in ("first", "last"):
        probe = {}
        for b, cells in cells_of_request.items():
            lc = [c for c in cells if live[c]]
            if lc:
                probe[b] = lc[0] if where == "first" else lc[-1]
        if not probe:
            continue
        changed = ro.changed_rows(poison([page_of(c) for c in probe.values()]), base)
        for b, c in probe.items():
            tally.live[key + where] += 1
            tally.live_changed[key + where] += bool(changed[rows_of(b)].any())
            tally.live_loaded[key + where] += page_of(c) in touched


# -- SGLang 0.5.23: Triton decode and extend on CSR slot lists ---------------------------------
try:
    import needs_sglang  # noqa: F401
    from sglang.kernels.ops.attention import decode_attention, extend_attention

    SGLANG = None
except pytest.skip.Exception as exc:
    SGLANG = str(exc)

DIM = 16


def slot_lists(draw, lengths, page_size, spare):
    """Slots as SGLang's paged allocator hands them out (whole pages, in a random order), CSR
    lists over them, and ``spare`` over-allocated entries past ``kv_indptr[-1]`` holding other
    valid slots (SGLang leaves whatever was there: here, pages no request reads)."""
    pages_needed = sum(-(-n // page_size) for n in lengths)
    spare_pages = -(-spare // page_size)
    num_pages = pages_needed + spare_pages + 1  # page 0: SGLang's padding page
    order = draw(st.permutations(range(1, num_pages)))
    pt, slots = 0, []
    for n in lengths:
        own = order[pt:pt + -(-n // page_size)]
        pt += len(own)
        slots += [p * page_size + i for p in own for i in range(page_size)][:n]
    dead = [p * page_size + i for p in order[pt:] for i in range(page_size)][:spare]
    kv_indptr = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    kv_indptr[1:] = torch.cumsum(torch.tensor(lengths), 0)
    kv_indices = torch.tensor(slots + dead, dtype=torch.int64)
    return kv_indptr, kv_indices, num_pages * page_size


def buffers(num_slots, kv_heads, g):
    """K and V ``[num_slots, kv_heads, DIM]``: views of allocations 8 slots larger, whose extra
    slots are NaN (a slot past the buffer, read by a kernel where a rule says it is not, reads
    poison, never unmapped memory)."""
    out = []
    for _ in range(2):
        whole = torch.randn(num_slots + 8, kv_heads, DIM, generator=g)
        whole[num_slots:] = NAN
        out.append(whole[:num_slots])
    return out


def _csr_cells(kv_indptr):
    return {b: [(i,) for i in range(int(kv_indptr[b]), int(kv_indptr[b + 1]))] for b in range(len(kv_indptr) - 1)}


DECODE_TALLY, EXTEND_TALLY = ro.Tally(), ro.Tally()


@pytest.mark.skipif(SGLANG is not None, reason=SGLANG or "")
@examples(20)
@given(data=st.data())
def test_sglang_triton_decode_region(data):
    draw = data.draw
    lengths = draw(st.lists(st.integers(1, 70), min_size=1, max_size=4), label="lengths")
    page_size = draw(st.sampled_from([1, 4, 16]), label="page_size")
    kv_heads = draw(st.sampled_from([1, 2, 4]), label="kv_heads")  # 4 of 4 heads: the MHA kernel
    splits = draw(st.integers(1, 4), label="num_kv_splits")
    kv_indptr, kv_indices, num_slots = slot_lists(draw, lengths, page_size, spare=draw(st.integers(0, 4)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    k, v = buffers(num_slots, kv_heads, g)
    batch, heads = len(lengths), 4
    q = torch.randn(batch, heads, DIM, generator=g)

    def run(kk=k, vv=v):
        o = torch.empty(batch, heads, DIM)
        logits, lse = torch.empty(batch, heads, 4, DIM), torch.empty(batch, heads, 4)
        decode_attention.decode_attention_fwd(q, kk, vv, o, kv_indptr, kv_indices, logits, lse,
                                              torch.full((batch,), splits, dtype=torch.int32), 4, DIM ** -0.5, 1.0,
                                              1.0, page_size=page_size)
        return o

    live, base, touched, poison = _slot_list_oracle(run, kv_indices, num_slots, k, v)
    _probe(DECODE_TALLY, base, _csr_cells(kv_indptr), lambda b: slice(b, b + 1), live, lambda c: int(kv_indices[c]),
           poison, touched)


def _slot_list_oracle(run, kv_indices, num_slots, k, v):
    """For a kernel ``run(k, v)`` reading the CSR slot list ``kv_indices``: which entries the rule
    calls live, the kernel's output, the slots its loads touched, and a run with slots poisoned."""
    live = ro.rule_live(run, kv_indices, [(i,) for i in range(kv_indices.shape[0])], num_slots)
    with ro.trace_loads() as seen:
        base = run()
    touched = ro.pages_touched(seen, k) | ro.pages_touched(seen, v)

    def poison(slots):
        k2, v2 = k.clone(), v.clone()
        k2[slots], v2[slots] = NAN, NAN
        return run(k2, v2)

    return live, base, touched, poison


@pytest.mark.skipif(SGLANG is not None, reason=SGLANG or "")
@examples(20)
@given(data=st.data())
def test_sglang_triton_extend_region(data):
    draw = data.draw
    batch = draw(st.integers(1, 3), label="batch")
    prefix = draw(st.lists(st.integers(0, 80), min_size=batch, max_size=batch), label="prefix_lens")
    extend = draw(st.lists(st.integers(1, 9), min_size=batch, max_size=batch), label="extend_lens")
    window = draw(st.one_of(st.just(-1), st.integers(1, 60)), label="sliding_window_size")
    page_size = draw(st.sampled_from([1, 4, 16]), label="page_size")
    kv_heads = draw(st.sampled_from([2, 4]), label="kv_heads")
    kv_indptr, kv_indices, num_slots = slot_lists(draw, prefix, page_size, spare=draw(st.integers(0, 4)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    k, v = buffers(num_slots, kv_heads, g)
    qo_indptr = torch.zeros(batch + 1, dtype=torch.int32)
    qo_indptr[1:] = torch.cumsum(torch.tensor(extend), 0)
    tokens, heads = int(qo_indptr[-1]), 4
    q = torch.randn(tokens, heads, DIM, generator=g)
    k_new, v_new = torch.randn(tokens, kv_heads, DIM, generator=g), torch.randn(tokens, kv_heads, DIM, generator=g)

    def run(kk=k, vv=v):
        o = torch.empty_like(q)
        extend_attention.extend_attention_fwd(q, k_new, v_new, o, kk, vv, qo_indptr, kv_indptr, kv_indices, None,
                                              True, None, max(extend), 1.0, 1.0, sliding_window_size=window,
                                              page_size=page_size)
        return o

    live, base, touched, poison = _slot_list_oracle(run, kv_indices, num_slots, k, v)
    rows = lambda b: slice(int(qo_indptr[b]), int(qo_indptr[b + 1]))  # noqa: E731
    _probe(EXTEND_TALLY, base, _csr_cells(kv_indptr), rows, live, lambda c: int(kv_indices[c]), poison, touched,
           exact=window <= 0, key="window, " if window > 0 else "")


# -- SGLang 0.5.23: torch_native, SDPA over the token slots it gathers ------------------------
NATIVE_TALLY = ro.Tally()


def _gathers(run, table, cell, bad) -> bool:
    """Whether ``run()`` (a pure-torch kernel, no sanitizer) reads ``table[cell]``: with ``bad`` (out
    of range) there, torch's own bounds check raises when the kernel gathers it."""
    saved = table[cell].clone()
    table[cell] = bad
    try:
        run()
        return False
    except IndexError:
        return True
    finally:
        table[cell] = saved


@pytest.mark.skipif(SGLANG is not None, reason=SGLANG or "")
@examples(30)
@given(data=st.data())
def test_sglang_torch_native_region(data):
    """``TorchNativeAttnBackend._run_sdpa_forward_decode`` / ``_extend`` (SGLang's code, in torch):
    what they gather is seen exactly, through torch's bounds check, entry by entry."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    draw = data.draw
    extend = draw(st.booleans(), label="extend (else decode)")
    batch = draw(st.integers(1, 3), label="batch")
    lengths = draw(st.lists(st.integers(1, 12), min_size=batch, max_size=batch), label="seq_lens")
    encoder = draw(st.sampled_from([None, "self", "cross"]), label="encoder_lens")
    enc = draw(st.lists(st.integers(1, 5), min_size=batch, max_size=batch), label="encoder lens") if encoder else None
    window = draw(st.one_of(st.none(), st.integers(0, 6)), label="sliding_window_size") if not encoder else None
    spare_rows = draw(st.integers(0, 2), label="rows of no request")
    width = max(n + (e if encoder == "self" else 0) for n, e in zip(lengths, enc or [0] * batch))
    width = max(width, max(enc) if enc else 0) + draw(st.integers(0, 3), label="spare columns")
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    rows = batch + spare_rows
    num_slots = rows * width + 1  # every entry a distinct slot; slot 0: SGLang's padding slot
    req_to_token = (torch.randperm(num_slots - 1, generator=g) + 1).reshape(rows, width).to(torch.int32)
    req_pool_indices = torch.randperm(rows, generator=g)[:batch]
    seq_lens = torch.tensor(lengths)
    encoder_lens = torch.tensor(enc) if enc else None
    heads, kv_heads = 4, 2
    k = torch.randn(num_slots, kv_heads, DIM, generator=g)
    v = torch.randn(num_slots, kv_heads, DIM, generator=g)
    if extend:
        extend_lens = [draw(st.integers(1, n), label="extend_len") for n in lengths]
        prefix = torch.tensor([n - e for n, e in zip(lengths, extend_lens)])
        cu = [0] + torch.cumsum(torch.tensor(extend_lens), 0).tolist()
    else:
        cu = list(range(batch + 1))
    q = torch.randn(cu[-1], heads, DIM, generator=g)
    common = dict(encoder_lens=encoder_lens, scaling=DIM ** -0.5, enable_gqa=True, causal=encoder is None,
                  is_cross_attn=encoder == "cross", sliding_window_size=window)

    def run(kk=k, vv=v):
        o = torch.zeros_like(q)
        if extend:
            return TorchNativeAttnBackend._run_sdpa_forward_extend(
                TorchNativeAttnBackend, q, o, kk, vv, req_to_token, req_pool_indices, seq_lens, prefix,
                torch.tensor(extend_lens), **common)
        return TorchNativeAttnBackend._run_sdpa_forward_decode(
            TorchNativeAttnBackend, q, o, kk, vv, req_to_token, req_pool_indices, seq_lens, **common)

    cells = [(r, c) for r in range(rows) for c in range(width)]
    live = ro.rule_live(run, req_to_token, cells, num_slots)
    base = run()
    touched = {int(req_to_token[c]) for c in cells if _gathers(run, req_to_token, c, num_slots)}

    def poison(slots):
        k2, v2 = k.clone(), v.clone()
        k2[slots], v2[slots] = NAN, NAN
        return run(k2, v2)

    requests = {b: [(int(req_pool_indices[b]), c) for c in range(width)] for b in range(batch)}
    _probe(NATIVE_TALLY, base, requests, lambda b: slice(cu[b], cu[b + 1]), live, lambda c: int(req_to_token[c]),
           poison, touched, key=f"{'extend' if extend else 'decode'}{', ' + encoder if encoder else ''}, ")


# -- vLLM 0.33.0: Triton unified_attention on [batch, W] block tables -------------------------
try:
    import needs_vllm  # noqa: F401
    from vllm.v1.attention.ops import triton_unified_attention

    VLLM = None
except pytest.skip.Exception as exc:
    VLLM = str(exc)

UNIFIED_TALLY = ro.Tally()


@pytest.mark.skipif(VLLM is not None, reason=VLLM or "")
@examples(40)
@given(data=st.data())
def test_vllm_unified_attention_region(data):
    draw = data.draw
    block_size = draw(st.sampled_from([16, 32, 64]), label="block_size")
    width = draw(st.integers(1, 5), label="W")
    batch = draw(st.integers(1, 3), label="batch")
    lengths = draw(st.lists(st.integers(1, width * block_size), min_size=batch, max_size=batch), label="seqused_k")
    q_cap = draw(st.sampled_from([1, 4, 12]), label="q_len cap")  # decode, spec-decode verify, chunked prefill
    q_lens = [draw(st.integers(1, min(n, q_cap)), label="q_len") for n in lengths]
    if batch > 1 and draw(st.booleans(), label="a request without query rows this step"):
        q_lens[draw(st.integers(0, batch - 1))] = 0
    window = draw(st.one_of(st.none(), st.integers(0, 40), st.integers(0, width * block_size)), label="window_left")
    lookback = -1  # chunked local attention (Gemma3's block-local layers): chunks of (window + 1) // (lookback + 1)
    if window is not None and window >= 3:
        lookback = draw(st.sampled_from([-1, -1, 0, 1]), label="chunk_lookback")
    split_kv = draw(st.booleans(), label="split-KV scratch (3D kernel)")
    dtype = draw(st.sampled_from([torch.float32, torch.float16]), label="dtype")
    heads, kv_heads, dim = 4, 2, 16
    num_blocks = batch * width + 2
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    whole = torch.randn(num_blocks + 4, 2, block_size, kv_heads, dim, generator=g).to(dtype)
    whole[num_blocks:] = NAN  # blocks past the cache (a view): a wrongly dead entry reads poison, not unmapped memory
    kv_cache = whole[:num_blocks]
    table = (torch.randperm(num_blocks - 1, generator=g)[:batch * width] + 1).reshape(batch, width).to(torch.int32)
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    q = torch.randn(int(cu[-1]), heads, dim, generator=g).to(dtype)
    seqused_k = torch.tensor(lengths, dtype=torch.int32)
    scratch = {}
    if split_kv:  # as TritonAttentionMetadataBuilder allocates it (16 segments)
        tokens = int(cu[-1])
        scratch = dict(seq_threshold_3D=64, num_par_softmax_segments=16,
                       softmax_segm_output=torch.empty(tokens, heads, 16, dim),
                       softmax_segm_max=torch.empty(tokens, heads, 16),
                       softmax_segm_expsum=torch.empty(tokens, heads, 16))

    def run(cache=kv_cache):
        out = torch.zeros_like(q)
        triton_unified_attention.unified_attention(
            q, cache[:, 0], cache[:, 1], out, cu, max(q_lens), seqused_k, max(lengths), dim ** -0.5, True,
            (window, 0) if window is not None else (-1, -1), table, 0.0, None, None, None, chunk_lookback=lookback,
            **scratch)
        return out

    cells = [(b, c) for b in range(batch) for c in range(width)]
    live = ro.rule_live(run, table, cells, num_blocks)
    with ro.trace_loads() as seen:
        base = run()
    touched = ro.pages_touched(seen, kv_cache)

    def poison(pages):
        cache = whole.clone()
        cache[pages] = NAN
        return run(cache[:num_blocks])

    _probe(UNIFIED_TALLY, base, {b: [(b, c) for c in range(width)] for b in range(batch)},
           lambda b: slice(int(cu[b]), int(cu[b + 1])), live, lambda c: int(table[c]), poison, touched,
           key=("chunked, " if lookback >= 0 else "window, ") if window is not None else "")


@pytest.fixture(autouse=True, scope="module")
def tallies(pytestconfig):
    """Prints each kernel's tally once the module is done (in CI's output too: no ``-s`` needed)."""
    yield
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        for name, tally in (("sglang.decode_attention_fwd", DECODE_TALLY),
                            ("sglang.extend_attention_fwd", EXTEND_TALLY),
                            ("sglang.TorchNativeAttnBackend", NATIVE_TALLY), ("vllm.unified_attention", UNIFIED_TALLY)):
            if tally.examples:
                print("\nread-region oracle: " + tally.summary(name))
