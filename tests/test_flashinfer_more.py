"""Built-in rules for more FlashInfer 0.7.2 entry points, through the REAL FlashInfer functions.

FlashInfer cannot run on a CPU: when the sanitizer lets a call through, FlashInfer's own code
refuses it (``device must be a cuda device``, ``Found no NVIDIA driver``, the JIT's
``FlashInfer requires GPUs with sm75 or higher``, a missing trtllm-gen cubin). ``reached``
asserts the exception passed through a frame of the flashinfer package: the call got there.

The paged wrappers: their constructors allocate pinned host memory, which needs an NVIDIA
driver. The tests build each wrapper with its REAL ``__init__`` while ``torch.empty`` drops
``pin_memory=True`` (plain host memory instead; nothing else changes), then call the REAL
``plan`` (``backend="fa2"``: it stores its CSR arguments, then fails in the JIT on CPU) and
the REAL ``run`` (it fails inside FlashInfer for want of the plan's kernel). Both methods are
caught by the sanitizer as class attributes; the findings come at plan or at run.

Not exercised on CPU: the kernels themselves, and FlashInfer's internal nesting
(``trtllm_batch_decode_with_kv_cache`` -> ``xqa_batch_decode_with_kv_cache`` -> ``xqa``,
which a CPU call never reaches), so the rule-side suppression of nested checks is untested here.
"""

import os

os.environ.setdefault("FLASHINFER_NO_DOWNLOAD", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import flashinfer  # noqa: E402
import flashinfer.decode  # noqa: E402
import flashinfer.mla  # noqa: E402
import flashinfer.page  # noqa: E402
import flashinfer.prefill  # noqa: E402
import sys  # noqa: E402

from tsan_paged import PagedSanitizer, PageTableViolation  # noqa: E402

fi_xqa = sys.modules["flashinfer.xqa"]  # `flashinfer.xqa` is the function re-exported over the module


def reached(fn, *args, **kwargs):
    """Call the real entry point; True when FlashInfer's own code raised (or it ran)."""
    try:
        fn(*args, **kwargs)
    except PageTableViolation:
        raise
    except Exception as exc:  # noqa: BLE001 - FlashInfer's own refusal on a CPU machine
        tb, frames = exc.__traceback__, []
        while tb is not None:
            frames.append(tb.tb_frame.f_code.co_filename)
            tb = tb.tb_next
        assert any(f"{os.sep}flashinfer{os.sep}" in f for f in frames[1:]), (exc, frames)
    return True


def errors(san):
    return [v for v in san.reports if v.severity == "error"]


def found(san):
    return [(v.check, v.arg, v.index, v.value, v.bound) for v in san.reports]


def dense_batch(batch=4, width=8, page_size=16, num_pages=64, lengths=None, seed=0, garbage=True):
    """``[B, W]`` int32 table filled for ``ceil(len / ps)`` columns, stale tails (garbage or not)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths if lengths is not None else
                           torch.randint(1, width * page_size + 1, (batch,), generator=gen).tolist(), dtype=torch.int32)
    live = torch.arange(width) < ((lengths + page_size - 1) // page_size).unsqueeze(1)
    pages = torch.randint(0, num_pages, (len(lengths), width), generator=gen, dtype=torch.int32)
    tail = torch.randint(num_pages, 2**31 - 1, (len(lengths), width), generator=gen, dtype=torch.int32) if garbage \
        else torch.randint(0, num_pages, (len(lengths), width), generator=gen, dtype=torch.int32)
    return torch.where(live, pages, tail).contiguous(), lengths


def kv_pages(num_pages, page_size, layout="HND", heads=2, dim=64, dtype=torch.bfloat16):
    page = (heads, page_size, dim) if layout == "HND" else (page_size, heads, dim)
    return torch.zeros(1, *page, dtype=dtype).expand(num_pages, *page)


# -- trtllm_batch_context_with_kv_cache ---------------------------------------------------
def context_args(layout="HND", shared=True, num_pages=64, lengths=(20, 33, 128, 5), width=8, ps=16):
    table, seq_lens = dense_batch(lengths=list(lengths), width=width, page_size=ps, num_pages=num_pages, garbage=False)
    if not shared:
        table = torch.stack([table, table.flip(1)], dim=1).contiguous()
    q_lens = torch.tensor([3, 1, 4, 2], dtype=torch.int32)
    cu = lambda t: torch.cat([torch.zeros(1, dtype=torch.int32), t.cumsum(0).int()])  # noqa: E731
    return dict(query=torch.zeros(int(q_lens.sum()), 4, 64, dtype=torch.bfloat16),
                kv_cache=(kv_pages(num_pages, ps, layout), kv_pages(num_pages, ps, layout)),
                workspace_buffer=torch.zeros(1024, dtype=torch.uint8), block_tables=table, seq_lens=seq_lens,
                max_q_len=4, max_kv_len=width * ps, bmm1_scale=1.0, bmm2_scale=1.0, batch_size=4,
                cum_seq_lens_q=cu(q_lens), cum_seq_lens_kv=cu(seq_lens), kv_layout=layout,
                uses_shared_paged_kv_idx=shared)


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("shared", [True, False])
def test_context_valid_and_whole_row_fault(layout, shared):
    args = context_args(layout, shared)
    with PagedSanitizer(mode="raise") as san:
        assert reached(flashinfer.prefill.trtllm_batch_context_with_kv_cache, **args)
    assert san.reports == []
    # trtllm-gen reads the whole row: an entry past row 0's length (20 tokens = 2 pages) is live
    index = (0, 6) if shared else (0, 1, 6)
    args["block_tables"][index] = 64
    with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation) as info:
        flashinfer.prefill.trtllm_batch_context_with_kv_cache(**args)
    assert [(v.check, v.arg, v.index, v.value, v.bound) for v in info.value.violations] == [
        ("page-out-of-range", "block_tables", index, 64, 64)]


def test_context_lengths_and_batch():
    args = context_args()
    args["seq_lens"][2] = 129
    with PagedSanitizer(mode="log") as san:
        reached(flashinfer.prefill.trtllm_batch_context_with_kv_cache, **args)
    assert {(v.check, v.arg, v.index, v.value, v.bound) for v in san.reports} == {
        ("seq-len-exceeds-max", "seq_lens", (2,), 129, 128), ("seq-len-exceeds-table", "seq_lens", (2,), 129, 128)}
    args = context_args()
    args["batch_size"] = 3
    with PagedSanitizer(mode="log") as san:
        reached(flashinfer.prefill.trtllm_batch_context_with_kv_cache, **args)
    assert {(v.check, v.arg) for v in san.reports} >= {("shape-mismatch", "block_tables"),
                                                       ("shape-mismatch", "cum_seq_lens_q")}


# -- xqa ------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_xqa_batch_decode_valid_live_and_dead(layout):
    table, lens = dense_batch(lengths=[20, 1, 128, 47])
    args = dict(query=torch.zeros(4, 4, 64, dtype=torch.bfloat16),
                kv_cache=(kv_pages(64, 16, layout), kv_pages(64, 16, layout)),
                workspace_buffer=torch.zeros(1024, dtype=torch.uint8), block_tables=table, seq_lens=lens,
                max_seq_len=128, kv_layout=layout)
    with PagedSanitizer(mode="raise") as san:
        assert reached(flashinfer.decode.xqa_batch_decode_with_kv_cache, **args)
    assert errors(san) == [] and {v.check for v in san.reports} == {"dead-page-out-of-range"}
    table[3, 2] = -1  # 47 tokens = 3 pages: column 2 is read
    with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation) as info:
        flashinfer.decode.xqa_batch_decode_with_kv_cache(**args)
    assert [(v.check, v.arg, v.index, v.value, v.bound) for v in info.value.violations] == [
        ("page-out-of-range", "block_tables", (3, 2), -1, 64)]


def test_xqa_window_skips_tiles_of_the_generic_kernel():
    # bf16 KV runs mha.cu (256-token tiles; the 64-token mha_sm90.cu runs only for fp8 KV on sm90).
    # seq 600, window_left 99 (win 100), q_len 1: S = 500 skipped tokens -> 256 in whole tiles
    # -> first page read 256 / 16 = 16 (with 64-token tiles it would be 448 / 16 = 28).
    table, lens = dense_batch(batch=2, lengths=[600, 600], width=40, num_pages=100, garbage=False)
    table[0, 15] = 10**6  # before the first loaded tile: dead
    table[1, 20] = 10**6  # loaded (masked) by the generic kernel: live
    args = dict(query=torch.zeros(2, 4, 64, dtype=torch.bfloat16), kv_cache=(kv_pages(100, 16, "NHD"),) * 2,
                workspace_buffer=torch.zeros(1024, dtype=torch.uint8), block_tables=table, seq_lens=lens,
                max_seq_len=640, window_left=99)
    with PagedSanitizer(mode="log") as san:
        reached(flashinfer.decode.xqa_batch_decode_with_kv_cache, **args)
    assert sorted((v.check, v.index) for v in san.reports) == [("dead-page-out-of-range", (0, 15)),
                                                               ("page-out-of-range", (1, 20))]


def test_xqa_raw_entry_point():
    table, lens = dense_batch(lengths=[20, 1, 128, 47])
    k = torch.zeros(64, 16, 2, 64, dtype=torch.bfloat16)
    q = torch.zeros(4, 1, 4, 64, dtype=torch.bfloat16)
    call = lambda **kw: fi_xqa.xqa(**{**dict(q=q, k_cache=k, v_cache=k[:40], page_table=table,  # noqa: E731
                                              seq_lens=lens.to(torch.uint32).unsqueeze(1), output=q,
                                              workspace_buffer=torch.zeros(64, dtype=torch.uint8),
                                              semaphores=torch.zeros(64, dtype=torch.uint8), num_kv_heads=2,
                                              page_size=16), **kw})
    table[table >= 40] = 3  # every entry valid for V (40 pages)
    with PagedSanitizer(mode="raise") as san:
        assert reached(call)
    assert san.reports == []
    table[2, 7] = 50  # valid for K (64), past V (40): V is the buffer it overruns
    with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation) as info:
        call()
    v = info.value.violations[0]
    assert (v.check, v.arg, v.index, v.value, v.bound) == ("page-out-of-range", "page_table", (2, 7), 50, 40)
    assert "v_cache has 40 pages" in v.message
    with PagedSanitizer(mode="log") as san:
        reached(call, page_size=32)
    assert [(v.check, v.arg, v.value, v.bound) for v in san.reports] == [("shape-mismatch", "page_size", 32, 16)]


# -- MLA --------------------------------------------------------------------------------------
def mla_args(backend="auto", num_pages=50, four_d=False):
    table, lens = dense_batch(lengths=[20, 1, 128, 47], num_pages=num_pages, page_size=32, width=4, garbage=True)
    kv = torch.zeros(1, 32, 576, dtype=torch.bfloat16).expand(num_pages, 32, 576)
    return dict(query=torch.zeros(4, 1, 128, 576, dtype=torch.bfloat16), kv_cache=kv.unsqueeze(1) if four_d else kv,
                workspace_buffer=torch.zeros(1024, dtype=torch.uint8), qk_nope_head_dim=128, kv_lora_rank=512,
                qk_rope_head_dim=64, block_tables=table, seq_lens=lens, max_seq_len=128, backend=backend)


@pytest.mark.parametrize("four_d", [False, True])
def test_mla_decode_xqa_region_on_cpu(four_d):
    args = mla_args(four_d=four_d)
    with PagedSanitizer(mode="raise") as san:
        assert reached(flashinfer.mla.trtllm_batch_decode_with_kv_cache_mla, **args)
    assert errors(san) == []  # garbage tails past each row's length: dead for xqa
    args["block_tables"][1, 0] = 50
    with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation) as info:
        flashinfer.mla.trtllm_batch_decode_with_kv_cache_mla(**args)
    assert found_of(info) == [("page-out-of-range", "block_tables", (1, 0), 50, 50)]


def found_of(info):
    return [(v.check, v.arg, v.index, v.value, v.bound) for v in info.value.violations]


def test_mla_decode_trtllm_gen_reads_whole_rows():
    args = mla_args(backend="trtllm-gen")
    args["block_tables"][args["block_tables"] >= 50] = 0
    with PagedSanitizer(mode="raise") as san:
        assert reached(flashinfer.mla.trtllm_batch_decode_with_kv_cache_mla, **args)
    assert san.reports == []
    args["block_tables"][1, 3] = 77  # row 1 has 1 token: dead for xqa, read by trtllm-gen
    with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation) as info:
        flashinfer.mla.trtllm_batch_decode_with_kv_cache_mla(**args)
    assert found_of(info) == [("page-out-of-range", "block_tables", (1, 3), 77, 50)]


def test_xqa_mla_entry_points():
    args = mla_args()
    del args["backend"]
    args["block_tables"][3, 1] = -2
    with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation) as info:
        flashinfer.mla.xqa_batch_decode_with_kv_cache_mla(**args)
    assert found_of(info) == [("page-out-of-range", "block_tables", (3, 1), -2, 50)]
    kv = args["kv_cache"].unsqueeze(2)  # [P, ps, 1, D] as xqa_batch_decode_with_kv_cache_mla passes it
    raw = dict(q=args["query"], k_cache=kv, v_cache=kv, page_table=args["block_tables"],
               seq_lens=args["seq_lens"].unsqueeze(1), output=args["query"],
               workspace_buffer=torch.zeros(64, dtype=torch.uint8), semaphores=torch.zeros(64, dtype=torch.uint8),
               page_size=32)
    with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation) as info:
        fi_xqa.xqa_mla(**raw)
    assert found_of(info) == [("page-out-of-range", "page_table", (3, 1), -2, 50)]
    args["block_tables"][3, 1] = 0
    with PagedSanitizer(mode="raise") as san:
        assert reached(fi_xqa.xqa_mla, **raw)
        assert reached(flashinfer.mla.xqa_batch_decode_with_kv_cache_mla, **args)
    assert errors(san) == []


# -- the paged wrappers -------------------------------------------------------------------
def make_wrapper(cls, monkeypatch, layout="NHD"):
    """The REAL constructor, with pinned host memory replaced by plain host memory."""
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kwargs):
        return real_empty(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch, "empty", empty)
        return cls(torch.zeros(1 << 20, dtype=torch.uint8), layout, backend="fa2")


def csr(pages_per_row, num_pages, page_size=16, last=None, seed=0):
    """indptr, indices, last_page_len as FlashInfer's docs build them (an empty row: 0 pages, last 0)."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.tensor(pages_per_row, dtype=torch.int32)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int32), counts.cumsum(0).int()])
    indices = torch.randperm(num_pages, generator=gen)[: int(counts.sum())].int()
    if last is None:
        last = [0 if n == 0 else 1 + (7 * i) % page_size for i, n in enumerate(pages_per_row)]
    return indptr, indices, torch.tensor(last, dtype=torch.int32)


WRAPPERS = [
    (flashinfer.BatchDecodeWithPagedKVCacheWrapper, lambda q: (), "run"),
    (flashinfer.BatchPrefillWithPagedKVCacheWrapper, lambda q: (q,), "run"),
]


@pytest.mark.parametrize("cls,leading,_", WRAPPERS)
def test_wrapper_valid_plan_and_run_with_an_empty_row(cls, leading, _, monkeypatch):
    indptr, indices, last = csr([3, 0, 2, 5], num_pages=40)  # row 1 is empty (last_page_len 0)
    qo_indptr = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32)
    kv = torch.zeros(1, 2, 16, 2, 64, dtype=torch.float16).expand(40, 2, 16, 2, 64)
    with PagedSanitizer(mode="raise") as san:
        wrapper = make_wrapper(cls, monkeypatch)
        assert reached(wrapper.plan, *leading(qo_indptr), indptr, indices, last, 4, 2, 64, 16)
        assert reached(wrapper.run, torch.zeros(4, 4, 64, dtype=torch.float16), kv)
        assert reached(wrapper.plan, *leading(qo_indptr), indptr, indices, last, 4, 2, 64, 16)
    assert san.reports == []


@pytest.mark.parametrize("cls,leading,_", WRAPPERS)
def test_wrapper_fault_found_at_run_then_at_plan(cls, leading, _, monkeypatch):
    indptr, indices, last = csr([3, 0, 2, 5], num_pages=40)
    indices[4] = 40  # row 2, its second page: one past the end of a 40-page cache
    qo_indptr = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32)
    kv = torch.zeros(1, 2, 16, 2, 64, dtype=torch.float16).expand(40, 2, 16, 2, 64)
    names = ("indices",) if cls is flashinfer.BatchDecodeWithPagedKVCacheWrapper else ("paged_kv_indices",)
    expected = [("page-out-of-range", names[0], (2, 1), 40, 40)]
    with PagedSanitizer(mode="log") as san:
        wrapper = make_wrapper(cls, monkeypatch)
        reached(wrapper.plan, *leading(qo_indptr), indptr, indices, last, 4, 2, 64, 16)
        assert san.reports == []  # the page count is not known at the first plan()
        reached(wrapper.run, torch.zeros(4, 4, 64, dtype=torch.float16), kv)
        assert found(san) == expected  # found at run()
        assert "BatchDecode" in san.reports[0].op or "BatchPrefill" in san.reports[0].op
        assert san.reports[0].op.endswith(".run")
        reached(wrapper.run, torch.zeros(4, 4, 64, dtype=torch.float16), kv)
    with PagedSanitizer(mode="raise"):
        with pytest.raises(PageTableViolation) as info:  # re-plan: checked against the cache of the last run
            wrapper.plan(*leading(qo_indptr), indptr, indices, last, 4, 2, 64, 16)
    assert found_of(info) == expected and info.value.violations[0].op.endswith(".plan")


@pytest.mark.parametrize("cls,leading,_", WRAPPERS)
def test_wrapper_aliases_begin_forward_and_run_return_lse_are_checked(cls, leading, _, monkeypatch):
    """FlashInfer's own aliases: ``begin_forward = plan`` (what SGLang's FlashInfer backend calls)
    and ``run_return_lse = functools.partialmethod(run, return_lse=True)``. Valid: zero reports
    and both reach FlashInfer; the same fault as above is found through each; restored exactly."""
    aliases = (cls.__dict__["begin_forward"], cls.__dict__["run_return_lse"])
    qo_indptr = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32)
    kv = torch.zeros(1, 2, 16, 2, 64, dtype=torch.float16).expand(40, 2, 16, 2, 64)
    q = torch.zeros(4, 4, 64, dtype=torch.float16)
    indptr, indices, last = csr([3, 0, 2, 5], num_pages=40)
    with PagedSanitizer(mode="raise") as san:
        wrapper = make_wrapper(cls, monkeypatch)
        assert reached(wrapper.begin_forward, *leading(qo_indptr), indptr, indices, last, 4, 2, 64, 16)
        assert reached(wrapper.run_return_lse, q, kv)
    assert san.reports == []

    indices[4] = 40  # row 2, its second page: one past the end of a 40-page cache
    name = "indices" if cls is flashinfer.BatchDecodeWithPagedKVCacheWrapper else "paged_kv_indices"
    expected = [("page-out-of-range", name, (2, 1), 40, 40)]
    with PagedSanitizer(mode="raise"):
        wrapper = make_wrapper(cls, monkeypatch)
        reached(wrapper.begin_forward, *leading(qo_indptr), indptr, indices, last, 4, 2, 64, 16)
        with pytest.raises(PageTableViolation) as at_run:
            wrapper.run_return_lse(q, kv)
        with pytest.raises(PageTableViolation) as at_plan:  # the page count is known from the run now
            wrapper.begin_forward(*leading(qo_indptr), indptr, indices, last, 4, 2, 64, 16)
    assert found_of(at_run) == expected and at_run.value.violations[0].op.endswith(".run")
    assert found_of(at_plan) == expected and at_plan.value.violations[0].op.endswith(".plan")
    assert (cls.__dict__["begin_forward"], cls.__dict__["run_return_lse"]) == aliases
    assert cls.__dict__["begin_forward"] is cls.__dict__["plan"]


@pytest.mark.parametrize("cls,leading,_", WRAPPERS)
def test_wrapper_plan_structure_and_page_size(cls, leading, _, monkeypatch):
    indptr, indices, last = csr([3, 1], num_pages=40, last=[17, 4])
    qo_indptr = torch.tensor([0, 1, 2], dtype=torch.int32)
    with PagedSanitizer(mode="log") as san:
        wrapper = make_wrapper(cls, monkeypatch, layout="HND")
        reached(wrapper.plan, *leading(qo_indptr), indptr, indices, last, 4, 2, 64, 16)
        assert [(v.check, v.index, v.value, v.bound) for v in san.reports] == [("seq-len-exceeds-table", (0,), 17, 16)]
        kv = (torch.zeros(40, 2, 32, 64, dtype=torch.float16),) * 2  # HND pages of 32 tokens
        reached(wrapper.run, torch.zeros(2, 4, 64, dtype=torch.float16), kv)
    assert [(v.check, v.arg, v.value, v.bound) for v in san.reports[1:]] == [("shape-mismatch", "paged_kv_cache", 32, 16)]


def test_cuda_graph_wrapper_planned_as_flashinfers_own_test_plans_it(monkeypatch):
    """``CUDAGraphBatchDecodeWithPagedKVCacheWrapper`` (its plan and run are the decode wrapper's,
    inherited) in the sequence of FlashInfer's
    ``test_cuda_graph_batch_decode_with_paged_kv_cache``: a warm-up plan of one page per request,
    then re-plans of i pages per request into the same user buffers. Valid: no report under
    raise. A page planted into a re-plan after the run told the page count: raised at plan().
    (On a GPU that test's warm-up plan takes a CUDA indptr and indices with a CPU last_page_len,
    which plan() copies: tests/gpu/test_gpu_plans_and_writes.py; a CPU has one device.)"""
    batch, kv_len, ps = 12, 54, 16
    per_seq = (kv_len + ps - 1) // ps
    total = per_seq * batch
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kwargs):
        return real_empty(*args, **kwargs)

    kv = torch.zeros(1, 2, ps, 4, 128, dtype=torch.float16).expand(total, 2, ps, 4, 128)
    q = torch.zeros(batch, 4, 128, dtype=torch.float16)

    def plan(wrapper, pages_per_seq, last):
        return reached(wrapper.plan, torch.arange(batch + 1, dtype=torch.int32) * pages_per_seq,
                       torch.arange(pages_per_seq * batch, dtype=torch.int32),
                       torch.full((batch,), last, dtype=torch.int32), 4, 4, 128, ps, data_type=torch.float16,
                       q_data_type=torch.float16)

    with PagedSanitizer(mode="raise") as san:
        with monkeypatch.context() as m:
            m.setattr(torch, "empty", empty)
            wrapper = flashinfer.decode.CUDAGraphBatchDecodeWithPagedKVCacheWrapper(
                torch.zeros(1 << 20, dtype=torch.uint8), torch.empty(batch + 1, dtype=torch.int32),
                torch.empty(total, dtype=torch.int32), torch.empty(batch, dtype=torch.int32), "NHD")
        assert wrapper.is_cuda_graph_enabled
        assert plan(wrapper, 1, ps) and reached(wrapper.run, q, kv)
        for i in range(1, min(4, per_seq)):
            assert plan(wrapper, i, ps) and reached(wrapper.run, q, kv)
        assert plan(wrapper, per_seq, (kv_len - 1) % ps + 1) and reached(wrapper.run, q, kv)
    assert san.reports == []

    indices = torch.arange(total, dtype=torch.int32)
    indices[5 * per_seq + 2] = total  # request 5, its third page: one past the end of the cache
    with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation) as info:
        wrapper.plan(torch.arange(batch + 1, dtype=torch.int32) * per_seq, indices,
                     torch.full((batch,), (kv_len - 1) % ps + 1, dtype=torch.int32), 4, 4, 128, ps)
    assert found_of(info) == [("page-out-of-range", "indices", (5, 2), total, total)]


# -- append_paged_kv_cache (a write) -------------------------------------------------------
def append_args(num_pages=40, ps=16, layout="NHD"):
    """The docstring's example: append lengths [45, 8, 25, 22] into pages [3, 1, 2, 2] of 16."""
    append_len = torch.tensor([45, 8, 25, 22], dtype=torch.int32)
    indptr, indices, last = csr([3, 1, 2, 2], num_pages=num_pages, last=[13, 8, 9, 6])
    seq = (indptr[1:] - indptr[:-1] - 1) * ps + last  # flashinfer.get_seq_lens
    # get_batch_indices_positions (a Triton kernel): token j of request b goes to position seq[b] - len[b] + j
    batch_indices = torch.repeat_interleave(torch.arange(4, dtype=torch.int32), append_len)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), append_len.cumsum(0)[:-1]])
    positions = (torch.arange(int(append_len.sum())) - starts[batch_indices.long()]
                 + (seq - append_len)[batch_indices.long()]).int()
    page = (ps, 2, 64) if layout == "NHD" else (2, ps, 64)
    return dict(append_key=torch.zeros(100, 2, 64, dtype=torch.float16),
                append_value=torch.zeros(100, 2, 64, dtype=torch.float16), batch_indices=batch_indices,
                positions=positions, paged_kv_cache=torch.zeros(1, 2, *page, dtype=torch.float16).expand(num_pages, 2, *page),
                kv_indices=indices, kv_indptr=indptr, kv_last_page_len=last, kv_layout=layout)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_append_valid_and_a_written_bad_page(layout):
    args = append_args(layout=layout)
    with PagedSanitizer(mode="raise") as san:
        assert reached(flashinfer.page.append_paged_kv_cache, **args)
    assert san.reports == []
    args["kv_indices"][6] = 40  # row 3's first page: its tokens 0..9 of 22 are written there
    with PagedSanitizer(mode="raise"), pytest.raises(PageTableViolation) as info:
        flashinfer.page.append_paged_kv_cache(**args)
    assert found_of(info) == [("page-out-of-range", "kv_indices", (3, 0), 40, 40)]
    assert info.value.violations[0].count == 16  # tokens 0..15 of row 3 land in that page


def test_append_only_written_pages_count():
    args = append_args()
    # request 1 appends 8 tokens at positions 0..7 of its one page; make request 0 append only into
    # its last page, so its first page (a bad entry) is not written by this call
    keep = (args["batch_indices"] != 0) | (args["positions"] >= 32)
    for name in ("batch_indices", "positions"):
        args[name] = args[name][keep].contiguous()
    n = int(keep.sum())
    args["append_key"], args["append_value"] = args["append_key"][:n], args["append_value"][:n]
    args["kv_indices"][0] = 10**6
    with PagedSanitizer(mode="raise") as san:
        assert reached(flashinfer.page.append_paged_kv_cache, **args)
    assert san.reports == []


def test_append_positions_and_batch_indices():
    args = append_args()
    args["positions"][60] = 9 + 16  # token 60 is request 2's (tokens 53..77), which holds 25: 25 is not allocated
    args["batch_indices"][99] = -1  # get_batch_indices_positions' fill value, read as a request by the kernel
    with PagedSanitizer(mode="log") as san:
        reached(flashinfer.page.append_paged_kv_cache, **args)
    assert sorted(found(san)) == [("seq-len-exceeds-table", "positions", (60,), 25, 25),
                                  ("shape-mismatch", "batch_indices", (99,), -1, 4)]


def test_nested_xqa_call_is_not_reported_twice(monkeypatch):
    """xqa_batch_decode_with_kv_cache calls xqa itself: one report, from the outer entry point.

    On a CPU the outer function stops at get_device_sm_count; those two device queries are
    replaced by constants so that FlashInfer's own code goes on to call the (wrapped) xqa,
    which then stops at its compute-capability query.
    """
    monkeypatch.setattr(flashinfer.decode, "get_device_sm_count", lambda device: 132)
    monkeypatch.setattr(flashinfer.decode, "device_support_pdl", lambda device: False)
    table, lens = dense_batch(lengths=[20, 1, 128, 47], garbage=False)
    table[2, 5] = 64
    args = dict(query=torch.zeros(4, 4, 64, dtype=torch.bfloat16), kv_cache=(kv_pages(64, 16, "NHD"),) * 2,
                workspace_buffer=torch.zeros(1 << 24, dtype=torch.uint8), block_tables=table, seq_lens=lens,
                max_seq_len=128)
    calls = []
    with PagedSanitizer(mode="log") as san:
        monkeypatch.setattr(sys.modules["flashinfer.xqa"], "get_compute_capability",
                            lambda device: calls.append(device) or (_ for _ in ()).throw(RuntimeError("no GPU")))
        reached(flashinfer.decode.xqa_batch_decode_with_kv_cache, **args)
    assert calls, "xqa was not reached"
    assert [(v.op, v.index) for v in san.reports] == [(
        "flashinfer.decode:xqa_batch_decode_with_kv_cache", (2, 5))]
    with PagedSanitizer(mode="log") as san:  # called by the program, xqa is checked
        reached(fi_xqa.xqa, q=args["query"].unsqueeze(1), k_cache=args["kv_cache"][0], v_cache=args["kv_cache"][1],
                page_table=table, seq_lens=lens.unsqueeze(1), output=args["query"].unsqueeze(1),
                workspace_buffer=args["workspace_buffer"], semaphores=args["workspace_buffer"], num_kv_heads=2,
                page_size=16)
    assert [(v.op, v.index) for v in san.reports] == [("flashinfer.xqa:xqa", (2, 5))]


# -- trtllm_batch_decode_with_kv_cache: the Cake routes (decode context parallel, request_order) --
def cake_args(width=16, ps=16, num_pages=64, max_seq_len=200, lengths=(120, 7, 200, 64), seed=3):
    table, lens = dense_batch(batch=len(lengths), width=width, page_size=ps, num_pages=num_pages,
                              lengths=list(lengths), seed=seed, garbage=False)
    cache = kv_pages(num_pages, ps)
    return dict(query=torch.zeros(len(lengths), 8, 64, dtype=torch.bfloat16), kv_cache=(cache, cache),
                workspace_buffer=torch.zeros(1024, dtype=torch.uint8), block_tables=table, seq_lens=lens,
                max_seq_len=max_seq_len, backend="cake")


def dcp(args):
    return dict(args, causal_seqlens_kv_global=args["seq_lens"] * 2, cp_world=2, cp_rank=1)


def test_dcp_reads_the_first_block_pairs_of_every_row():
    """max_seq_len 200 -> 2 blocks of 128 tokens (a pair) -> 16 page ids per row at page 16,
    whatever the row's own length; columns past them are never read."""
    args = dcp(cake_args())
    with PagedSanitizer(mode="raise") as san:
        assert reached(flashinfer.decode.trtllm_batch_decode_with_kv_cache, **args)
    assert san.reports == []
    args["block_tables"][1, 15] = 64  # row 1 holds 7 tokens, but column 15 is read
    with pytest.raises(PageTableViolation) as caught:
        with PagedSanitizer(mode="raise"):
            flashinfer.decode.trtllm_batch_decode_with_kv_cache(**args)
    v = caught.value.violations[0]
    assert (v.check, v.index, v.value, v.bound) == ("page-out-of-range", (1, 15), 64, 64)


def test_dcp_table_narrower_than_the_blocks_read_is_a_shape_finding():
    args = dcp(cake_args(width=12))  # the kernels read 16 entries of each row
    with PagedSanitizer(mode="log") as san:
        reached(flashinfer.decode.trtllm_batch_decode_with_kv_cache, **args)
    assert [(c, a, val, b) for c, a, _, val, b in found(san)] == [("shape-mismatch", "block_tables", 12, 16)]


def test_request_order_entries_must_name_a_row():
    args = dict(cake_args(), request_order=torch.tensor([2, 0, 3, 1], dtype=torch.int32))
    with PagedSanitizer(mode="raise") as san:
        assert reached(flashinfer.decode.trtllm_batch_decode_with_kv_cache, **args)
    assert san.reports == []
    args["request_order"][2] = 4
    with pytest.raises(PageTableViolation) as caught:
        with PagedSanitizer(mode="raise"):
            flashinfer.decode.trtllm_batch_decode_with_kv_cache(**args)
    v = caught.value.violations[0]
    assert (v.check, v.arg, v.index, v.value, v.bound) == ("page-out-of-range", "request_order", (2,), 4, 4)


def test_request_order_rows_read_their_length():
    args = dict(cake_args(), request_order=torch.tensor([0, 1, 2, 3], dtype=torch.int32))
    args["block_tables"][0, 7] = 99  # row 0: 120 tokens = 8 pages at 16: column 7 is read
    args["block_tables"][1, 3] = 99  # row 1: 7 tokens = 1 page: column 3 is not
    with pytest.raises(PageTableViolation) as caught:
        with PagedSanitizer(mode="raise") as san:
            flashinfer.decode.trtllm_batch_decode_with_kv_cache(**args)
    assert [v.index for v in caught.value.violations] == [(0, 7)]
    assert [(v.check, v.index) for v in san.reports if v.severity == "warning"] == [
        ("dead-page-out-of-range", (1, 3))]


# -- cudnn_batch_decode_with_kv_cache -------------------------------------------------------
def cudnn_args(width=8, ps=16, num_pages=64, lengths=(20, 100, 3)):
    table, lens = dense_batch(batch=len(lengths), width=width, page_size=ps, num_pages=num_pages,
                              lengths=list(lengths), garbage=False)
    cache = kv_pages(num_pages, ps)
    return dict(q=torch.zeros(len(lengths), 4, 64, dtype=torch.bfloat16), k_cache=cache, v_cache=cache, scale=0.1,
                workspace_buffer=torch.zeros(1024, dtype=torch.uint8), max_sequence_kv=width * ps,
                actual_seq_lens_kv=lens.view(-1, 1, 1, 1), block_tables=table)


def test_cudnn_decode_whole_rows_and_lengths():
    args = cudnn_args()
    with PagedSanitizer(mode="raise") as san:
        assert reached(flashinfer.cudnn_batch_decode_with_kv_cache, **args)
    assert san.reports == []
    args["block_tables"][2, 6] = -1  # past row 2's 3 tokens: cuDNN's region is not known, the row counts
    args["actual_seq_lens_kv"][1] = 200
    with PagedSanitizer(mode="log") as san:
        reached(flashinfer.cudnn_batch_decode_with_kv_cache, **args)
    assert {(c, i) for c, _, i, _, _ in found(san)} == {
        ("page-out-of-range", (2, 6)), ("seq-len-exceeds-max", (1,)), ("seq-len-exceeds-table", (1,))}


def test_cudnn_decode_row_width_must_match_the_fallback_stride():
    args = cudnn_args()
    args["max_sequence_kv"] = 6 * 16
    with PagedSanitizer(mode="log") as san:
        reached(flashinfer.cudnn_batch_decode_with_kv_cache, **args)
    assert ("bad-layout", "block_tables", None, 8, 6) in found(san)


# -- BatchMLAPagedAttentionWrapper.plan (run needs a GPU: plan refuses a CPU after the check) --
def test_mla_wrapper_plan_checks_the_csr_list_then_reaches_flashinfer():
    wrapper = flashinfer.mla.BatchMLAPagedAttentionWrapper(torch.empty(1 << 20, dtype=torch.uint8), backend="fa2")
    kv_len = torch.tensor([3, 5], dtype=torch.int32)
    indptr, indices = torch.tensor([0, 3, 8], dtype=torch.int32), torch.arange(10, dtype=torch.int32)

    def plan(indptr):
        wrapper.plan(torch.arange(3, dtype=torch.int32), indptr, indices, kv_len, 16, 512, 64, 1, False, 0.1,
                     torch.bfloat16, torch.bfloat16)

    with PagedSanitizer(mode="raise") as san:
        assert reached(plan, indptr)
    assert san.reports == []
    with pytest.raises(PageTableViolation) as caught:
        with PagedSanitizer(mode="raise"):
            plan(torch.tensor([0, 3, 11], dtype=torch.int32))  # past the 10 entries of kv_indices
    v = caught.value.violations[0]
    assert (v.check, v.arg) == ("shape-mismatch", "kv_indptr")


def test_request_order_with_separate_k_and_v_tables():
    """``uses_shared_paged_kv_idx=False``: the request-ordered route takes ``[B, 2, W]``."""
    args = dict(cake_args(), request_order=torch.tensor([1, 0, 3, 2], dtype=torch.int32),
                uses_shared_paged_kv_idx=False)
    args["block_tables"] = torch.stack([args["block_tables"], args["block_tables"]], dim=1).contiguous()
    with PagedSanitizer(mode="raise") as san:
        assert reached(flashinfer.decode.trtllm_batch_decode_with_kv_cache, **args)
    assert san.reports == []
    args["block_tables"][0, 1, 7] = 64  # row 0's V ids, column 7 of its 8 pages
    with pytest.raises(PageTableViolation) as caught:
        with PagedSanitizer(mode="raise"):
            flashinfer.decode.trtllm_batch_decode_with_kv_cache(**args)
    assert caught.value.violations[0].index == (0, 1, 7)


def test_dcp_of_an_empty_rank_still_reads_one_block_pair():
    """The DCP kernels walk at least one pair of 128-token blocks (max_seq_len 0 included)."""
    args = dcp(cake_args(max_seq_len=0))
    args["block_tables"][2, 15] = 99
    with pytest.raises(PageTableViolation) as caught:
        with PagedSanitizer(mode="raise"):
            flashinfer.decode.trtllm_batch_decode_with_kv_cache(**args)
    assert caught.value.violations[0].index == (2, 15)


def test_cudnn_row_width_is_only_the_fallback_kernels_concern(monkeypatch):
    import flashinfer.cudnn.decode as cudnn_decode

    args = cudnn_args()
    args["max_sequence_kv"] = 6 * 16
    monkeypatch.setattr(cudnn_decode, "CUDNN_AVAILABLE", True)  # the cuDNN graph reshapes to the real width
    with PagedSanitizer(mode="log") as san:
        reached(flashinfer.cudnn_batch_decode_with_kv_cache, **args)
    assert "bad-layout" not in [c for c, *_ in found(san)]
