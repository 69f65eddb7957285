"""A tensor-parallel decode loop for the fail-fast tests (``test_distributed.py``, and on two
GPUs ``benchmarks/gpu_tp_failfast.py``): each rank decodes its shard of the query heads through
a paged kernel, then the ranks all-reduce the output, once per step. It never imports
tsan_paged: the sanitizer comes from ``TSAN_PAGED`` (``tsan-paged run``).

    python tp_worker.py --bad-rank 1 --bad-step 5 [--busy-s 60] [--steps 20]

On a CPU (gloo): vLLM's ``_C::paged_attention_v1`` with its CPU kernel (``vllm_ops.py``, the
built-in rule). On GPUs (nccl): FlashInfer's ``trtllm_batch_decode_with_kv_cache`` (xqa).
At ``--bad-step`` the bad rank's table gets one entry equal to the page count in a live column.
``--busy-s``: the other ranks compute that long (no collective) right after the bad step, as a
rank does between collectives: only the sanitizer's store watcher can end them then.
Prints ``planted <time>`` when the fault is planted and ``rank R done`` at a normal end.
"""

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

PAGES, BATCH = 64, 4


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bad-rank", type=int, default=1)
    parser.add_argument("--bad-step", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--busy-s", type=float, default=0.0)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    decode = flashinfer_decode if cuda else vllm_decode
    step_fn, table, out = decode(rank, world)
    for step in range(args.steps):
        if step == args.bad_step and rank == args.bad_rank:
            table[1, 2] = PAGES  # row 1 holds 40 tokens: 3 pages of 16, column 2 is read
            print(f"planted {time.time():.3f}", flush=True)
        step_fn()
        if step == args.bad_step and rank != args.bad_rank and args.busy_s:
            end = time.time() + args.busy_s
            while time.time() < end:
                torch.ones(256, 256) @ torch.ones(256, 256)
        dist.all_reduce(out)
    if cuda:
        torch.cuda.synchronize()
    print(f"rank {rank} done", flush=True)
    dist.destroy_process_group()


def lengths(device, page):
    """Row 1 spans 3 pages: column 2 is live."""
    return torch.tensor([20, 40, 33, 7], dtype=torch.int32, device=device) * (page // 16)


def vllm_decode(rank, world, page=16, heads=8, dim=64):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import vllm_ops  # noqa: F401  (vLLM's schema, a CPU kernel)

    heads //= world
    g = torch.Generator().manual_seed(rank)
    table = torch.randint(0, PAGES, (BATCH, 4), generator=g, dtype=torch.int32)
    key_cache = torch.randn(PAGES, heads, dim // 8, page, 8, generator=g)
    value_cache = torch.randn(PAGES, heads, dim, page, generator=g)
    query = torch.randn(BATCH, heads, dim, generator=g)
    out = torch.empty_like(query)
    one = torch.tensor(1.0)
    lens = lengths("cpu", page)

    def step():
        torch.ops._C.paged_attention_v1(out, query, key_cache, value_cache, heads, dim ** -0.5, table, lens, page,
                                        4 * page, None, "auto", one, one, 0, 0, 0, 64, 0)

    return step, table, out


def flashinfer_decode(rank, world, page=64, qo_heads=32, kv_heads=8, dim=128):
    """Each rank: its shard of the query and KV heads (as SGLang shards them), xqa decode."""
    import flashinfer.decode

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(rank)
    table = torch.randint(0, PAGES, (BATCH, 4), generator=g, device=dev, dtype=torch.int32)
    k = torch.randn(PAGES, kv_heads // world, page, dim, generator=g, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    query = torch.randn(BATCH, qo_heads // world, dim, generator=g, device=dev, dtype=torch.bfloat16)
    workspace = torch.zeros(128 * 1024 * 1024, dtype=torch.uint8, device=dev)
    out = torch.empty_like(query)
    lens = lengths(dev, page)

    def step():
        flashinfer.decode.trtllm_batch_decode_with_kv_cache(query=query, kv_cache=(k, v), workspace_buffer=workspace,
                                                             block_tables=table, seq_lens=lens, max_seq_len=4 * page,
                                                             out=out)

    return step, table, out


if __name__ == "__main__":
    main()
