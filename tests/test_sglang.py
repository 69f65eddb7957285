"""SGLang 0.5.23 for real: its pools, allocators and trtllm_mha backend, on a CPU.

What drives what (see ``sglang_driver.py``): a seeded scheduler calls SGLang's own
``ReqToTokenPool``, ``TokenToKVPoolAllocator`` / ``PagedTokenToKVPoolAllocator`` /
``SWATokenToKVPoolAllocator`` (``full_to_swa_index_mapping``), then
``TRTLLMHAAttnBackend.init_forward_metadata`` builds the tables with SGLang's Triton kernel
(``build_trtllm_mha_page_table``, run by Triton's interpreter) and
``TRTLLMHAAttnBackend.forward_decode`` / ``forward_extend`` (MTP target-verify) call the real
``flashinfer.decode.trtllm_batch_decode_with_kv_cache`` from SGLang's line
(``trtllm_mha_backend.py:1511 in run_group``). The backend object is made with ``__new__``
because its ``__init__`` needs a whole ``ModelRunner`` (a loaded model, a GPU); the driver
sets what ``__init__`` sets on an sm90 (xqa) GPU and runs the methods unmodified.

Steps per configuration: ``TSAN_PAGED_SGLANG_STEPS`` (default 300, sized for CI; each step
costs ~30 ms, mostly Triton's interpreter running SGLang's table kernel).
"""

import json
import os
import subprocess
import sys

import pytest

import needs_sglang  # noqa: E402,F401 - skips this module without SGLang

import torch  # noqa: E402

import flashinfer.decode  # noqa: E402
import sglang_driver as sd  # noqa: E402
from batches import call_kernel, errors  # noqa: E402
from tsan_paged import PagedSanitizer, PageTableViolation  # noqa: E402

STEPS = int(os.environ.get("TSAN_PAGED_SGLANG_STEPS", "300"))
SGLANG_CALL_SITE = "trtllm_mha_backend.py:1511 in run_group"
SEED_PAGES = 8657  # the seed: page index 8657 of an 8657-page SWA K cache
SEED_PAGE_SIZE = 64



@pytest.mark.parametrize("name", list(sd.CONFIGS))
def test_realistic_sequence_has_no_errors(name):
    engine, sched = sd.realistic_scheduler(name)
    with PagedSanitizer(mode="raise") as san:
        stats = sched.run(STEPS)
    sched.drain()
    assert errors(san) == []
    # Only stale entries, never read by xqa: table tails SGLang leaves as torch.empty.
    assert {(v.check, v.severity) for v in san.reports} <= {("dead-page-out-of-range", "warning")}
    assert all(v.caller.endswith(SGLANG_CALL_SITE) for v in san.reports)
    assert stats.calls == 2 * (stats.decode_steps + stats.verify_steps)  # one call per layer
    assert stats.finished > 0 and stats.extend_steps > 0
    if sd.CONFIGS[name][1]:  # MTP draft tokens
        assert stats.verify_steps > STEPS // 2 and stats.decode_steps == 0
    else:
        assert stats.decode_steps > STEPS // 2
    # Every request freed: the allocators got back every page they handed out.
    assert engine.allocator.available_size() == engine.allocator.size


def seed_engine():
    """Gemma-like hybrid SWA + MTP, the seed's SWA pool: 8656 usable pages + SGLang's padding page."""
    return sd.make_engine(page_size=SEED_PAGE_SIZE, swa=True, full_tokens=SEED_PAGE_SIZE * 9000,
                          swa_tokens=SEED_PAGE_SIZE * (SEED_PAGES - 1), draft_tokens=3)


def test_seed_pool_has_the_seeds_page_count():
    engine = seed_engine()
    assert engine.swa_pages() == SEED_PAGES
    layer = engine.layers[0]
    k, v = engine.backend._reshape_paged_kv_cache(*engine.pool.get_kv_buffer(layer.layer_id), layer, layer.head_dim)
    assert k.shape[0] == v.shape[0] == SEED_PAGES


def test_seed_live_off_by_one_caught_at_its_row_col_and_sglang_line():
    """The seed's allocator bug (an SWA slot one page past the pool) in a LIVE page: an error."""
    engine = seed_engine()
    planted = {}

    def plant(reqs, seq_lens, tokens_per_req):
        if planted or len(reqs) < 3 or tokens_per_req == 1:
            return
        row = len(reqs) // 2
        kv_len = seq_lens[row] + tokens_per_req  # cache_seqlens of a verify row
        col = (kv_len - 1) // SEED_PAGE_SIZE  # its last live page: xqa reads it
        full_slot = engine.req_to_token[reqs[row].row, col * SEED_PAGE_SIZE].long().view(1)
        # What the seed's SWA allocator handed out: token slot 8657 * 64, page 8657.
        bad = torch.tensor([SEED_PAGES * SEED_PAGE_SIZE])
        engine.allocator.set_full_to_swa_mapping(full_slot, bad)  # SGLang's own mapping writer
        planted.update(row=row, col=col)

    sched = sd.Scheduler(engine, seed=7, draft_tokens=3, max_running=6, on_call=sd.call_through)
    sched.before_forward = plant
    with PagedSanitizer(mode="raise") as san:
        with pytest.raises(PageTableViolation) as info:
            for _ in range(200):
                sched.step()
    assert planted, "no verify batch of 3+ requests in 200 steps"
    [v] = info.value.violations
    assert (v.check, v.severity, v.arg, v.index, v.value, v.bound) == (
        "page-out-of-range", "error", "block_tables", (planted["row"], planted["col"]), SEED_PAGES, SEED_PAGES)
    assert v.caller.endswith(SGLANG_CALL_SITE), v.caller
    assert any("trtllm_mha_backend.py" in f and "forward_extend" in f for f in v.stack)
    assert f"block_tables[{planted['row']}, {planted['col']}] = {SEED_PAGES}" in str(info.value)
    assert f"has {SEED_PAGES} pages (valid 0..{SEED_PAGES - 1})" in str(info.value)
    assert errors(san) == [v]  # the full-attention layer's table never saw it


def seed_era_table(engine, rows):
    """The table as the seed's trtllm_mha built it (its commit message):
    ``req_to_token[req_pool_indices, :max_seq_len_k]`` at page boundaries, translated through
    ``full_to_swa_index_mapping`` (SGLang's ``SWAKVPool.translate_loc_from_full_to_swa``) for
    SWA layers, trailing positions included."""
    ps = engine.page_size
    slots = engine.req_to_token[rows][:, ::ps].long()
    return (engine.pool.translate_loc_from_full_to_swa(slots) // ps).to(torch.int32).contiguous()


@pytest.mark.parametrize("backend", ["auto", "trtllm-gen"])  # "auto": xqa on sm90 and on a CPU tensor
def test_seed_stale_tail_dead_for_xqa_live_for_trtllm_gen(backend):
    """Trailing req_to_token entries, translated: the seed's failure mode.

    Rows hold 0 (never written: ``ReqToTokenPool`` zero-fills) past what their requests
    reached. The seed's author found ``full_to_swa_index_mapping[0]`` holding the SWA slot
    its buggy allocator bound last, one page past the pool. Planted here with SGLang's own
    ``set_full_to_swa_mapping``, every unwritten tail entry of the seed-era table becomes
    8657. xqa reads only ceil(seq_len / 64) pages: all are ``dead-page-out-of-range``
    warnings, counted in one finding, and the call goes on. trtllm-gen (sm100, where the seed
    crashed) may read whole rows: the first of them is an error.
    """
    engine = seed_engine()
    sched = sd.Scheduler(engine, seed=3, draft_tokens=3, max_running=6, on_call=sd.call_through)
    while len(sched.running) < 3:
        sched.step()
    reqs = sched.running
    rows = torch.tensor([r.row for r in reqs])
    kv_lens = torch.tensor([r.committed for r in reqs], dtype=torch.int32)  # the last 3 are the drafts
    engine.allocator.set_full_to_swa_mapping(torch.tensor([0]), torch.tensor([SEED_PAGES * SEED_PAGE_SIZE]))
    table = seed_era_table(engine, rows)
    bad = (table == SEED_PAGES).nonzero().tolist()  # row-major: the first is what a report names
    live_pages = (kv_lens.long() + SEED_PAGE_SIZE - 1) // SEED_PAGE_SIZE
    assert bad and all(c >= live_pages[r] for r, c in bad)  # only past each row's length
    layer = engine.layers[0]  # the sliding-window layer
    kv_cache = engine.backend._reshape_paged_kv_cache(*engine.pool.get_kv_buffer(layer.layer_id), layer,
                                                      layer.head_dim)
    batch = dict(query=torch.zeros(len(reqs) * 3, sd.HEADS, sd.HEAD_DIM, dtype=torch.bfloat16), kv_cache=kv_cache,
                 workspace_buffer=torch.zeros(1024, dtype=torch.uint8), block_tables=table, seq_lens=kv_lens,
                 max_seq_len=engine.max_context_len, window_left=layer.sliding_window_size, q_len_per_req=3,
                 backend=backend)
    with PagedSanitizer(mode="raise") as san:
        if backend == "auto":
            assert call_kernel(batch)  # reached FlashInfer
        else:
            with pytest.raises(PageTableViolation):
                call_kernel(batch)
    [v] = san.reports
    first = tuple(bad[0])
    if backend == "auto":
        assert (v.check, v.severity, v.index, v.value, v.bound) == (
            "dead-page-out-of-range", "warning", first, SEED_PAGES, SEED_PAGES)
        assert v.count == len(bad)
    else:
        assert (v.check, v.severity, v.index, v.value, v.bound) == (
            "page-out-of-range", "error", first, SEED_PAGES, SEED_PAGES)
    assert any("test_sglang.py" in frame for frame in v.stack)


# -- late binding -------------------------------------------------------------------------

def test_sanitizer_started_after_sglang_import_catches_its_calls():
    """trtllm_mha_backend calls ``flashinfer.decode.trtllm_batch_decode_with_kv_cache`` by
    attribute at call time: the wrapped module attribute is what it finds."""
    mod = sd.trtllm_mha_backend
    original = flashinfer.decode.trtllm_batch_decode_with_kv_cache
    with PagedSanitizer(mode="raise"):
        assert mod.flashinfer.decode.trtllm_batch_decode_with_kv_cache is not original
        assert mod.flashinfer.decode.trtllm_batch_decode_with_kv_cache.__tsan_paged_original__ is original
    assert mod.flashinfer.decode.trtllm_batch_decode_with_kv_cache is original


_BEFORE_IMPORT = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
from tsan_paged import PagedSanitizer, PageTableViolation
san = PagedSanitizer(mode="raise").__enter__()
assert "sglang" not in sys.modules and "flashinfer" not in sys.modules
import sglang_driver as sd  # imports flashinfer and sglang...trtllm_mha_backend now
engine = sd.make_engine(page_size=64, swa=True, draft_tokens=2)
sched = sd.Scheduler(engine, seed=5, draft_tokens=2, max_running=4, on_call=sd.call_through)
hit = []
def plant(reqs, seq_lens, q):
    if hit or q == 1:
        return
    col = (seq_lens[0] + q - 1) // 64
    slot = engine.req_to_token[reqs[0].row, col * 64].long().view(1)
    engine.allocator.set_full_to_swa_mapping(slot, sd.torch.tensor([engine.swa_pages() * 64]))
    hit.append(col)
sched.before_forward = plant
out = {"steps": 0}
try:
    for _ in range(60):
        sched.step()
        out["steps"] += 1
except PageTableViolation as exc:
    v = exc.violations[0]
    out.update(check=v.check, index=list(v.index), value=v.value, bound=v.bound, caller=v.caller, col=hit[0],
               pages=engine.swa_pages())
print("RESULT " + json.dumps(out))
"""


def test_sanitizer_started_before_sglang_import_catches_its_calls(tmp_path):
    """A fresh interpreter: the sanitizer first, then ``import sglang...trtllm_mha_backend``."""
    here = os.path.dirname(__file__)
    env = dict(os.environ, FLASHINFER_NO_DOWNLOAD="1", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _BEFORE_IMPORT, here], capture_output=True, text=True,
                          timeout=240, cwd=str(tmp_path), env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert (out.get("check"), out.get("index"), out.get("value"), out.get("bound")) == (
        "page-out-of-range", [0, out["col"]], out["pages"], out["pages"]), out
    assert out["caller"].endswith(SGLANG_CALL_SITE)


@pytest.mark.parametrize("name", ["page64-full-decode", "page1-full-decode", "page64-swa-mtp3"])
def test_graph_runner_hooks_replayed_steps_checked(name):
    """Decode as SGLang's CUDA-graph runner drives trtllm_mha (``sd.GraphRunner``: its graph state,
    a capture per padded batch size, then replays through ``init_forward_metadata_out_graph`` and
    the in-graph ``init_forward_metadata_in_graph``): the static graph tables, which keep earlier
    steps' entries, give no error; a live stale slot planted before a replayed step is caught."""
    kwargs, draft = sd.CONFIGS[name]
    engine = sd.make_engine(draft_tokens=draft, **kwargs)
    sched = sd.Scheduler(engine, seed=5, draft_tokens=draft, max_running=6, pad_batches=True, graphs=True,
                         on_call=sd.call_through)
    with PagedSanitizer(mode="raise") as san:
        sched.run(STEPS // 3)
    assert sched.graphs.captures >= 1 and sched.graphs.replays > 10
    assert errors(san) == []
    planted = []

    def plant(reqs, seq_lens, tokens_per_req):
        if not planted and sched.graphs.replays and len(reqs) > 1 and seq_lens[1] > 2 * engine.page_size:
            planted.append(sd.plant_seed_fault(engine, reqs, seq_lens, tokens_per_req))

    sched.before_forward = plant
    with pytest.raises(PageTableViolation) as caught:
        with PagedSanitizer(mode="raise"):
            sched.run(STEPS)
    found = caught.value.violations[0]
    row, col, value = planted[0]
    assert (found.check, found.index, found.value) == ("page-out-of-range", (row, col), value)
