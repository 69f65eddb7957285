"""Issue 20 on the GPU: plan() metadata on the host, and a write the checks could not stop.

- FlashInfer's own ``test_cuda_graph_batch_decode_with_paged_kv_cache``
  (tests/attention/test_batch_decode_kernels.py) plans its CUDA-graph decode wrapper with a CUDA
  ``indptr`` and ``indices`` and a CPU ``last_page_len``: plan() copies them. Under ``raise`` the
  sanitizer reported ``bad-device`` there; now 0 findings through the warm-up, the capture and
  the re-plans with host tensors, and a page planted into the buffer run() reads is caught at
  run(), eagerly and at the replay.
- ``append_paged_kv_cache`` captured under ``log`` with the seed's fault planted after capture
  (a page id equal to the page count): the write lands past the cache, where this test puts the
  sanitizer's device ring, and overwrites what is there. The append's own finding lives in host
  memory out of the write's reach and is reported exactly; the device records the write
  garbled are reported as ``device-records-corrupted``, never decoded as findings. In a child
  process (append_child.py): the wild write is real.

Skips without a CUDA sm90 GPU; run on the lent H200 (benchmarks/gpu_run.sh, TESTS=plans_and_writes).
"""

import os
import subprocess
import sys

import pytest
import torch

from gpu_batches import cuda_ready

REASON = cuda_ready()
pytestmark = pytest.mark.skipif(bool(REASON), reason=REASON or "ok")

if not REASON:
    from tsan_paged import PagedSanitizer, PageTableViolation

KV_HEADS, QO_HEADS, HEAD_DIM = 4, 4, 128  # FlashInfer's test: num_kv_heads 4, num_qo_heads 4, head_dim 128
CHILD = os.path.join(os.path.dirname(__file__), "append_child.py")


def found(violations):
    return [(v.check, v.index, v.value, v.bound) for v in violations]


def test_cuda_graph_decode_wrapper_planned_with_host_metadata_as_flashinfer_tests_it():
    """FlashInfer's test, its shapes (batch 12, kv_len 54, page 16, NHD), bf16 (the dtype the other
    GPU tests already compiled), under raise."""
    import flashinfer.decode

    batch, kv_len, ps = 12, 54, 16
    per_seq = (kv_len + ps - 1) // ps
    total = per_seq * batch
    dev = "cuda:0"
    q = torch.randn(batch, QO_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(total, 2, ps, KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    # the warm-up plan's metadata, exactly as FlashInfer's test makes it: last_page_len on the host
    indptr_warmup = torch.arange(0, batch + 1, device=dev, dtype=torch.int32)
    indices_warmup = torch.arange(0, batch, device=dev, dtype=torch.int32)
    last_warmup = torch.full((batch,), ps, dtype=torch.int32)
    assert indptr_warmup.is_cuda and indices_warmup.is_cuda and not last_warmup.is_cuda
    indptr_buf = torch.empty(batch + 1, device=dev, dtype=torch.int32)
    indices_buf = torch.empty(total, device=dev, dtype=torch.int32)
    last_buf = torch.empty(batch, device=dev, dtype=torch.int32)
    workspace = torch.empty(128 * 1024 * 1024, dtype=torch.int8, device=dev)

    def plan(indptr, indices, last):
        wrapper.plan(indptr, indices, last, QO_HEADS, KV_HEADS, HEAD_DIM, ps, data_type=torch.bfloat16,
                     q_data_type=torch.bfloat16)

    with PagedSanitizer(mode="raise") as san:
        wrapper = flashinfer.decode.CUDAGraphBatchDecodeWithPagedKVCacheWrapper(
            workspace, indptr_buf, indices_buf, last_buf, "NHD")
        plan(indptr_warmup, indices_warmup, last_warmup)  # was: bad-device, "reads tensors on cpu, cuda:0"
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                wrapper.run(q, kv)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = wrapper.run(q, kv)
        for i in range(1, min(4, per_seq)):  # re-plans with host tensors, replays
            plan(torch.arange(0, batch + 1).int() * i, torch.arange(0, i * batch).int(),
                 torch.full((batch,), ps, dtype=torch.int32))
            graph.replay()
        last = torch.full((batch,), (kv_len - 1) % ps + 1, dtype=torch.int32)
        plan(torch.arange(0, batch + 1).int() * per_seq, torch.arange(0, total).int(), last)
        graph.replay()
        torch.cuda.synchronize()
        san.flush()
        assert san.reports == [], found(san.reports)
        assert torch.isfinite(out).all()

        # a page planted into the buffer run() reads (request 5, its third page): one past the end
        position = 5 * per_seq + 2
        indices_buf[position] = total
        expected = ("page-out-of-range", (5, 2), total, total)
        with pytest.raises(PageTableViolation) as eager:  # eagerly: before the kernel
            wrapper.run(q, kv)
        assert found(eager.value.violations) == [expected]
        graph.replay()  # captured: guarded on the device (raise mode's device action), raised at flush
        torch.cuda.synchronize()
        with pytest.raises(PageTableViolation) as replayed:
            san.flush()
        assert expected in found(replayed.value.violations)
        assert int(indices_buf[position]) == 0  # the guard value, written before the captured kernel read it


def test_log_mode_append_past_the_cache_in_a_graph_keeps_its_finding():
    """append_child.py: the seed's fault planted after capture, log mode; the append's finding
    reported exactly (request 0, its page 2, value and bound the page count, 3 tokens), the
    device record the write overwrote reported as device-records-corrupted."""
    proc = subprocess.run([sys.executable, CHILD], capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "APPEND-CHILD-OK" in proc.stdout, text[-6000:]
