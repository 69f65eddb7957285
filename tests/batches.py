"""Builders shared by the tests: decode batches made the way SGLang's trtllm_mha backend makes them.

Tables are int32 ``[batch, width]`` with rows filled for ``ceil(seq_len / page_size)`` pages
and stale tails (whatever an earlier step left), wider than any row needs.
"""

import os

os.environ.setdefault("FLASHINFER_NO_DOWNLOAD", "1")

import torch

import flashinfer.decode  # noqa: E402  (the real entry point every test goes through)

KERNEL = "flashinfer.decode:trtllm_batch_decode_with_kv_cache"


def make_batch(batch=4, width=16, page_size=16, num_pages=200, v_pages=None, layout="HND", kv_form="tuple",
               shared=True, q_len=1, lengths=None, stale="in-range", seed=0, kv_heads=2, qo_heads=4, head_dim=8):
    """Keyword arguments for ``trtllm_batch_decode_with_kv_cache``; every live entry valid.

    kv_form: "tuple" (k, v), "single2" [P, 2, ...] or "single1" [P, 1, ...].
    stale: what table tails hold: "in-range" pages, or "garbage" (anything, out of range too).
    """
    gen = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = torch.randint(1, width * page_size + 1, (batch,), generator=gen)
    seq_lens = torch.as_tensor(lengths, dtype=torch.int32)
    batch = seq_lens.shape[0]
    v_pages = num_pages if v_pages is None else v_pages
    usable = min(num_pages, v_pages)

    def table_2d():
        live = torch.arange(width) < ((seq_lens + page_size - 1) // page_size).unsqueeze(1)
        pages = torch.randint(0, usable, (batch, width), generator=gen, dtype=torch.int32)
        if stale == "garbage":
            tail = torch.randint(-5, 2**31 - 1, (batch, width), generator=gen, dtype=torch.int64).to(torch.int32)
        else:
            tail = torch.randint(0, usable, (batch, width), generator=gen, dtype=torch.int32)
        return torch.where(live, pages, tail).contiguous()

    block_tables = table_2d() if shared else torch.stack([table_2d(), table_2d()], dim=1).contiguous()
    page = (kv_heads, page_size, head_dim) if layout == "HND" else (page_size, kv_heads, head_dim)
    if kv_form == "tuple":
        kv_cache = (torch.zeros(1, *page, dtype=torch.bfloat16).expand(num_pages, *page),
                    torch.zeros(1, *page, dtype=torch.bfloat16).expand(v_pages, *page))
    else:
        assert v_pages == num_pages
        two = 2 if kv_form == "single2" else 1
        kv_cache = torch.zeros(1, two, *page, dtype=torch.bfloat16).expand(num_pages, two, *page)
    return dict(
        query=torch.zeros(batch * q_len, qo_heads, head_dim, dtype=torch.bfloat16),
        kv_cache=kv_cache,
        workspace_buffer=torch.zeros(1024, dtype=torch.uint8),
        block_tables=block_tables,
        seq_lens=seq_lens,
        max_seq_len=width * page_size,
        kv_layout=layout,
        q_len_per_req=q_len,
        uses_shared_paged_kv_idx=shared,
    )


def reaches_flashinfer(fn) -> bool:
    """Run ``fn``; True when the kernel call in it reached FlashInfer itself.

    FlashInfer cannot run on a CPU: when the sanitizer lets a call through, FlashInfer's own
    code refuses the CPU tensors (``ValueError: device must be a cuda device``). That error,
    raised from a frame inside the flashinfer package, proves the call got there.
    """
    try:
        fn()
    except (ValueError, RuntimeError) as exc:
        if type(exc).__name__ == "PageTableViolation":
            raise
        tb = exc.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        assert f"{os.sep}flashinfer{os.sep}" in tb.tb_frame.f_code.co_filename, exc
    return True  # raised inside FlashInfer, or a GPU machine ran it


def call_kernel(batch, kernel=None):
    """Call the real FlashInfer entry point; True when the call reached FlashInfer itself."""
    kernel = kernel or flashinfer.decode.trtllm_batch_decode_with_kv_cache
    return reaches_flashinfer(lambda: kernel(**batch))


def errors(sanitizer):
    return [v for v in sanitizer.reports if v.severity == "error"]


def by_check(sanitizer, check):
    return [v for v in sanitizer.reports if v.check == check]
