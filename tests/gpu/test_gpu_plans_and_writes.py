"""Issue 20 on the GPU: plan() metadata on the host, and a write the checks could not stop.

- FlashInfer's own ``test_cuda_graph_batch_decode_with_paged_kv_cache``
  (tests/attention/test_batch_decode_kernels.py) plans its CUDA-graph decode wrapper with a CUDA
  ``indptr`` and ``indices`` and a CPU ``last_page_len``: plan() copies them. Under ``raise`` the
  sanitizer reported ``bad-device`` there; now 0 findings through the warm-up, the capture and
  the re-plans with host tensors, and a page planted into the buffer run() reads is caught at
  run(), eagerly and at the replay.

Skips without a CUDA sm90 GPU; run on the lent H200 (benchmarks/gpu_run.sh, TESTS=plans_and_writes).
"""

import pytest
import torch

from gpu_batches import cuda_ready

REASON = cuda_ready()
pytestmark = pytest.mark.skipif(bool(REASON), reason=REASON or "ok")

if not REASON:
    from tsan_paged import PagedSanitizer, PageTableViolation

KV_HEADS, QO_HEADS, HEAD_DIM = 4, 4, 128  # FlashInfer's test: num_kv_heads 4, num_qo_heads 4, head_dim 128


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

