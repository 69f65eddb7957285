"""Child of test_gpu_plans_and_writes.py: a log-mode append past the cache, in a CUDA graph (issue 20).

One graph: ``append_paged_kv_cache`` into a paged cache, then an xqa decode (its own cache). The
cache and the sanitizer's device ring are one allocation, the ring right after the cache, so a
page id equal to the page count (the seed's fault) writes the appended tokens onto the ring, as
the issue saw by chance. Request 0 appends positions 131..133 (offsets 3..5 of its third page):
head 0 of those tokens covers bytes 768..1535 past the cache, device slot 1 of the ring.

Before issue 20 the append's own record was that slot (the first deferred entry): its finding
was garbled into ``seq-len-exceeds-table`` / ``page-out-of-range`` garbage. Now its record is a
host slot, out of the write's reach, and the decode's record (device slot 1 now) is the one
garbled: reported as ``device-records-corrupted``. Prints APPEND-CHILD-OK when both hold.
"""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

import flashinfer.decode  # noqa: E402
import flashinfer.page  # noqa: E402

from tsan_paged import PagedSanitizer, device  # noqa: E402
from tsan_paged import kernels as K  # noqa: E402

PAGE, KV_HEADS, QO_HEADS, HEAD_DIM = 64, 8, 32, 128
pages, batch = 2000, 6
dev = torch.device("cuda", 0)
torch.manual_seed(0)

# The cache [pages, 2, H, ps, D] (HND: K then V per page) and, right after it, the device ring.
page_elems = 2 * KV_HEADS * PAGE * HEAD_DIM
ring_slots = 4096
raw = torch.zeros(pages * page_elems + ring_slots * K.SLOT_WORDS * 4, dtype=torch.bfloat16, device=dev)
kv = raw[:pages * page_elems].view(pages, 2, KV_HEADS, PAGE, HEAD_DIM)
kv.normal_()
ring = device.Ring(dev, slots=ring_slots)
ring.words = raw[pages * page_elems:].view(torch.int64).view(ring_slots, K.SLOT_WORDS)
ring.base = ring.words.data_ptr()
device._rings[dev.index] = ring
assert ring.base == kv.data_ptr() + kv.numel() * kv.element_size()

# The page list: request 0 holds 3 pages, 6 tokens in the last one; the others random.
g = torch.Generator().manual_seed(4)
counts = torch.randint(2, 6, (batch,), generator=g)
last = torch.randint(1, PAGE + 1, (batch,), generator=g, dtype=torch.int32)
counts[0], last[0] = 3, 6
indptr = torch.zeros(batch + 1, dtype=torch.int32)
indptr[1:] = torch.cumsum(counts, 0)
indices = torch.randperm(pages, generator=g)[:int(indptr[-1])].to(torch.int32)
kv_len = (counts - 1) * PAGE + last
batch_indices = torch.repeat_interleave(torch.arange(batch), 3).to(torch.int32)  # each appends its last 3 tokens
positions = torch.cat([torch.arange(n - 3, n) for n in kv_len.tolist()]).to(torch.int32)
assert positions[:3].tolist() == [131, 132, 133]
append = torch.randn(batch_indices.numel(), KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
append_args = dict(append_key=append, append_value=append.clone(), batch_indices=batch_indices.to(dev),
                   positions=positions.to(dev), paged_kv_cache=kv, kv_indices=indices.to(dev),
                   kv_indptr=indptr.to(dev), kv_last_page_len=last.to(dev), kv_layout="HND")

# The decode after it: its own cache and table (a read the sanitizer can guard: a device record).
dk, dv = (torch.randn(500, KV_HEADS, PAGE, HEAD_DIM, device=dev, dtype=torch.bfloat16) for _ in range(2))
width = 8
table = torch.randint(0, 500, (4, width), device=dev, dtype=torch.int32)
query = torch.randn(4, QO_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
decode_args = dict(query=query, kv_cache=(dk, dv), workspace_buffer=torch.zeros(128 << 20, dtype=torch.uint8, device=dev),
                   block_tables=table, seq_lens=torch.tensor([500, 300, 64, 1], dtype=torch.int32, device=dev),
                   max_seq_len=width * PAGE, bmm1_scale=1 / math.sqrt(HEAD_DIM), kv_layout="HND",
                   out=torch.empty_like(query))


def step():
    flashinfer.page.append_paged_kv_cache(**append_args)
    flashinfer.decode.trtllm_batch_decode_with_kv_cache(**decode_args)


with PagedSanitizer(mode="raise"):  # warm-up: JIT builds, check kernels compiled (the sync path: slot 0 only)
    step()
    torch.cuda.synchronize()
assert not ring.entries

with PagedSanitizer(mode="log") as san:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    san.flush()
    assert san.reports == [], san.reports
    [append_entry] = [e for e in ring.entries.values() if e.op.endswith("append_paged_kv_cache")]
    [decode_entry] = [e for e in ring.entries.values() if e.op.endswith("trtllm_batch_decode_with_kv_cache")]
    assert append_entry.host and not decode_entry.host and decode_entry.slot == 1, ring.entries
    print("VALID-REPLAYS-OK", flush=True)

    append_args["kv_indices"][int(indptr[0]) + 2] = pages  # request 0's third page: the page count
    graph.replay()
    torch.cuda.synchronize()
    san.flush()

for v in san.reports:
    print("REPORT", v.check, v.op, v.index, v.value, v.bound, v.count, flush=True)
errors = [v for v in san.reports if v.severity == "error"]
append_found = [(v.check, v.index, v.value, v.bound, v.count) for v in errors if v.op.endswith("append_paged_kv_cache")]
assert append_found == [("page-out-of-range", (0, 2), pages, pages, 3)], append_found
decode_found = [v.check for v in errors if v.op.endswith("trtllm_batch_decode_with_kv_cache")]
assert decode_found == ["device-records-corrupted"], decode_found  # the write did land on the ring
print("APPEND-CHILD-OK", flush=True)
