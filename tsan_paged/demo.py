"""``tsan-paged demo``: the seed's crash, caught before the kernel, on a CPU machine.

The seed (SGLang, Gemma hybrid SWA + MTP, trtllm_mha backend) crashed with an illegal
memory access because one live page-table entry equalled the KV cache's page count:
8657 of 8657 pages of 64 tokens. This builds that decode batch (the KV cache is one page
expanded to 8657, so it costs no memory), calls the real
``flashinfer.decode.trtllm_batch_decode_with_kv_cache`` under the sanitizer, and shows:

1. the bad call raises ``PageTableViolation`` naming block_tables[5, 127] = 8657 and the
   bound 8657, and FlashInfer is never called;
2. stale entries past a row's length are reported as warnings only (SGLang leaves them);
3. the fixed batch goes through to FlashInfer, whose own refusal on CPU ("device must be a
   cuda device") proves the call reached it.
"""

from __future__ import annotations

import os
import tempfile

NUM_PAGES, PAGE_SIZE, WIDTH = 8657, 64, 128  # 8192-token context, 64-token pages
BATCH, QO_HEADS, KV_HEADS, HEAD_DIM = 8, 8, 1, 256


def seed_batch():
    """A Gemma-like decode batch built the way SGLang's trtllm_mha backend builds it."""
    import torch

    gen = torch.Generator().manual_seed(0)
    seq_lens = torch.tensor([517, 4000, 1203, 64, 7777, 8150, 2, 3001], dtype=torch.int32)
    pages_needed = (seq_lens + PAGE_SIZE - 1) // PAGE_SIZE
    live = torch.arange(WIDTH) < pages_needed.unsqueeze(1)
    fresh = torch.randperm(NUM_PAGES, generator=gen)[: BATCH * WIDTH].view(BATCH, WIDTH).to(torch.int32)
    stale = torch.randint(0, NUM_PAGES + 1, (BATCH, WIDTH), generator=gen, dtype=torch.int32)
    block_tables = torch.where(live, fresh, stale)  # tails hold whatever earlier steps left
    block_tables[2, 40] = NUM_PAGES  # a stale tail entry past the end: never read by xqa
    block_tables[5, 127] = NUM_PAGES  # the seed's bug: a LIVE entry one past the end
    kv_cache = torch.zeros(1, 2, KV_HEADS, PAGE_SIZE, HEAD_DIM, dtype=torch.bfloat16).expand(NUM_PAGES, -1, -1, -1, -1)
    return dict(
        query=torch.zeros(BATCH, QO_HEADS, HEAD_DIM, dtype=torch.bfloat16),
        kv_cache=kv_cache,
        workspace_buffer=torch.zeros(1 << 20, dtype=torch.uint8),
        block_tables=block_tables,
        seq_lens=seq_lens,
        max_seq_len=WIDTH * PAGE_SIZE,
    )


def run_demo() -> int:
    os.environ.setdefault("FLASHINFER_NO_DOWNLOAD", "1")
    import flashinfer.decode

    from . import PagedSanitizer, PageTableViolation

    batch = seed_batch()
    print(f"Seed case: decode batch {BATCH} x {WIDTH} pages of {PAGE_SIZE} tokens; kv_cache {NUM_PAGES} pages; "
          f"block_tables[5, 127] = {NUM_PAGES} (row 5 holds 8150 tokens, so column 127 is read).\n")
    dump_dir = tempfile.mkdtemp(prefix="tsan_paged_demo_")
    ok = True

    print("1. The bad batch, under PagedSanitizer(mode='raise'):")
    try:
        with PagedSanitizer(mode="raise", dump_dir=dump_dir):
            flashinfer.decode.trtllm_batch_decode_with_kv_cache(**batch)
        print("   NOT CAUGHT")
        ok = False
    except PageTableViolation as exc:
        first = exc.violations[0]
        print(f"   PageTableViolation: {exc}")
        print(f"   -> check {first.check}, index {first.index}, value {first.value}, bound {first.bound}; "
              "FlashInfer was not called.")
        print(f"   -> dump: {exc.dump_path}  (tsan-paged show {exc.dump_path})")
        ok &= (first.check, first.index, first.value, first.bound) == ("page-out-of-range", (5, 127), NUM_PAGES, NUM_PAGES)

    print("\n2. The same batch with the live entry fixed (the stale tail stays):")
    batch["block_tables"][5, 127] = 42
    with PagedSanitizer(mode="raise") as sanitizer:
        try:
            flashinfer.decode.trtllm_batch_decode_with_kv_cache(**batch)
            print("   FlashInfer returned (a GPU is present)")
        except ValueError as exc:
            print(f"   FlashInfer itself answered: {type(exc).__name__}: {exc}")
            print("   -> the call passed the sanitizer and reached the real kernel entry point "
                  "(which needs a CUDA device).")
            ok &= "cuda" in str(exc)
    warnings = [v for v in sanitizer.reports if v.severity == "warning"]
    errors = [v for v in sanitizer.reports if v.severity == "error"]
    print(f"   reports: {len(errors)} error(s), {len(warnings)} warning(s): "
          + "; ".join(f"{v.check} at {v.index} = {v.value}" for v in warnings))
    ok &= not errors and any(v.index == (2, 40) for v in warnings)
    print("\ndemo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1
