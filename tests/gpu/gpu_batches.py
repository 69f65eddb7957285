"""CUDA decode batches for the real FlashInfer kernel (xqa on sm90), shared by tests/gpu and benchmarks."""

import math
import os

os.environ.setdefault("FLASHINFER_NO_DOWNLOAD", "1")

import torch

KERNEL = "flashinfer.decode:trtllm_batch_decode_with_kv_cache"
PAGE_SIZE = 64
KV_HEADS, QO_HEADS, HEAD_DIM = 8, 32, 128


def cuda_ready() -> str:
    """'' when the real kernel can run here, else why not (the skip reason)."""
    if not torch.cuda.is_available():
        return "no CUDA device: GPU tests run on the lent H200 (benchmarks/gpu_run.sh)"
    if torch.cuda.get_device_capability()[0] != 9:
        return f"needs sm90 (xqa backend); this GPU is sm{''.join(map(str, torch.cuda.get_device_capability()))}"
    try:
        import flashinfer.decode  # noqa: F401
    except Exception as exc:  # pragma: no cover
        return f"flashinfer not importable: {exc}"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover
        return f"triton not importable: {exc}"
    return ""


def make_kv(num_pages, v_pages=None, seed=0, page_size=PAGE_SIZE):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (num_pages, KV_HEADS, page_size, HEAD_DIM)
    k = torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16)
    vshape = (v_pages or num_pages, KV_HEADS, page_size, HEAD_DIM)
    v = torch.randn(vshape, generator=g, device="cuda", dtype=torch.bfloat16)
    return k, v


def make_batch(batch, ctx, kv, width=None, seed=0, window_left=-1, lengths=None, page_size=PAGE_SIZE,
               min_frac=0.5):
    """Keyword arguments of trtllm_batch_decode_with_kv_cache; every entry (tails too) a valid page."""
    k, v = kv
    usable = min(k.shape[0], v.shape[0])
    width = width or math.ceil(ctx / page_size) + 2
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    if lengths is None:
        lengths = torch.randint(max(1, int(ctx * min_frac)), ctx + 1, (batch,), generator=g, device="cuda")
    seq_lens = torch.as_tensor(lengths, device="cuda").to(torch.int32)
    table = torch.randint(0, usable, (batch, width), generator=g, device="cuda", dtype=torch.int32)
    query = torch.randn(batch, QO_HEADS, HEAD_DIM, generator=g, device="cuda", dtype=torch.bfloat16)
    return dict(query=query, kv_cache=(k, v), workspace_buffer=workspace(), block_tables=table,
                seq_lens=seq_lens, max_seq_len=width * page_size, bmm1_scale=1 / math.sqrt(HEAD_DIM),
                bmm2_scale=1.0, window_left=window_left, kv_layout="HND")


_WS = {}


def workspace():
    if "ws" not in _WS:
        _WS["ws"] = torch.zeros(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    return _WS["ws"]


def decode(**kwargs):
    import flashinfer.decode

    return flashinfer.decode.trtllm_batch_decode_with_kv_cache(**kwargs)


# The four planted faults of issue 7, on a table whose row r reads >= r+4 pages.
def plant(batch, fault):
    """Plant ``fault`` in ``batch`` (in place); returns (check, index, value, bound) expected first."""
    table, lens = batch["block_tables"], batch["seq_lens"]
    k, v = batch["kv_cache"]
    width = table.shape[1]
    if fault == "seed":  # the seed's one-past-the-end, on the row's last read column
        r = 5
        lens[r] = (width - 2) * PAGE_SIZE
        table[r, width - 3] = k.shape[0]
        return ("page-out-of-range", (r, width - 3), k.shape[0], k.shape[0])
    if fault == "minus1":
        table[2, 3] = -1
        return ("page-out-of-range", (2, 3), -1, k.shape[0])
    if fault == "far":  # kills the context without a check (illegal address)
        table[4, 1] = k.shape[0] + 10**6
        return ("page-out-of-range", (4, 1), k.shape[0] + 10**6, k.shape[0])
    if fault == "v_side":  # a valid K page past V's end (V has fewer pages)
        table[1, 2] = v.shape[0] + 7
        return ("page-out-of-range", (1, 2), v.shape[0] + 7, v.shape[0])
    if fault == "seq_len":  # a length past the table's capacity
        lens[3] = width * PAGE_SIZE + 10  # max_seq_len is the table's capacity: exceeds both
        return ("seq-len-exceeds-max", (3,), width * PAGE_SIZE + 10, width * PAGE_SIZE)
    raise ValueError(fault)
