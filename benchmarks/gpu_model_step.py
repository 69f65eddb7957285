"""What the sanitizer costs a model-sized decode step (issue 21), eager and in CUDA graphs.

    STEPS=model bash benchmarks/gpu_run.sh        # on the lent GPU; or: python benchmarks/gpu_model_step.py

A Llama-3-8B-shaped decode step: 32 layers, each with its qkv, o and MLP projections (bf16 matmuls,
hidden 4096, 32 query heads, 8 KV heads, head_dim 128, MLP 14336) and one FlashInfer
``trtllm_batch_decode_with_kv_cache`` (xqa on sm90) over the step's one page table (page 64,
context 4096), each layer its own KV cache. Batch 8 (host-bound) and 64.

For each batch, bare and under ``PagedSanitizer(mode="log")`` in alternating blocks on the same
warm GPU (``BLOCKS`` blocks of ``STEPS_PER_BLOCK`` steps each way, medians of the blocks):

- eager: wall time per step (the host enqueues, the GPU runs; synced per block);
- graphs: the step captured once bare and once sanitized, time per replay;
- per checked call: (sanitized - bare) / 32 layers.

Prints one table (the last lines) and writes ``gpu_model_step.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "gpu"))
os.environ.setdefault("FLASHINFER_NO_DOWNLOAD", "1")

import torch  # noqa: E402

import flashinfer.decode  # noqa: E402
from gpu_batches import workspace  # noqa: E402
from tsan_paged import PagedSanitizer  # noqa: E402

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP = 32, 4096, 32, 8, 128, 14336
PAGE, CTX = 64, 4096
BLOCKS = int(os.environ.get("BLOCKS", "7"))
STEPS_PER_BLOCK = int(os.environ.get("STEPS_PER_BLOCK", "10"))


class Model:
    """The step's weights, KV caches and table; ``step()`` runs the 32 layers once."""

    def __init__(self, batch: int):
        dev, dt = "cuda", torch.bfloat16
        g = torch.Generator(device=dev).manual_seed(batch)
        width = math.ceil(CTX / PAGE)
        pages = batch * width + 1
        self.batch = batch
        self.w_qkv = torch.randn(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device=dev, dtype=dt, generator=g) * 0.01
        self.w_o = torch.randn(HEADS * HEAD_DIM, HIDDEN, device=dev, dtype=dt, generator=g) * 0.01
        self.w_up = torch.randn(HIDDEN, 2 * MLP, device=dev, dtype=dt, generator=g) * 0.01
        self.w_down = torch.randn(MLP, HIDDEN, device=dev, dtype=dt, generator=g) * 0.01
        self.caches = [(torch.randn(pages, KV_HEADS, PAGE, HEAD_DIM, device=dev, dtype=dt, generator=g),
                        torch.randn(pages, KV_HEADS, PAGE, HEAD_DIM, device=dev, dtype=dt, generator=g))
                       for _ in range(LAYERS)]
        self.table = torch.randperm(pages - 1, device=dev, generator=g)[: batch * width].view(batch, width).int() + 1
        self.seq_lens = torch.full((batch,), CTX, device=dev, dtype=torch.int32)
        self.x = torch.randn(batch, HIDDEN, device=dev, dtype=dt, generator=g)
        self.ws = workspace()

    def step(self):
        x = self.x
        for k, v in self.caches:
            qkv = x @ self.w_qkv
            q = qkv[:, : HEADS * HEAD_DIM].reshape(self.batch, HEADS, HEAD_DIM)
            attn = flashinfer.decode.trtllm_batch_decode_with_kv_cache(
                query=q, kv_cache=(k, v), workspace_buffer=self.ws, block_tables=self.table, seq_lens=self.seq_lens,
                max_seq_len=CTX, bmm1_scale=1 / math.sqrt(HEAD_DIM), bmm2_scale=1.0, kv_layout="HND")
            x = x + attn.reshape(self.batch, -1) @ self.w_o
            up = x @ self.w_up
            x = x + (torch.nn.functional.silu(up[:, :MLP]) * up[:, MLP:]) @ self.w_down
        return x


def eager_ms(model: Model) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(STEPS_PER_BLOCK):
        model.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000 / STEPS_PER_BLOCK


def capture(model: Model):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        model.step()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model.step()
    return graph


def replay_ms(graph) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(STEPS_PER_BLOCK):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / STEPS_PER_BLOCK


def measure(batch: int) -> dict:
    model = Model(batch)
    model.step()  # builds the xqa module
    torch.cuda.synchronize()
    bare_graph = capture(model)
    sanitizer = PagedSanitizer(mode="log")
    with sanitizer:
        model.step()
        torch.cuda.synchronize()
        sanitized_graph = capture(model)
    eager = {"bare": [], "log": []}
    graphs = {"bare": [], "log": []}
    for _ in range(BLOCKS):
        eager["bare"].append(eager_ms(model))
        with sanitizer:
            eager["log"].append(eager_ms(model))
        graphs["bare"].append(replay_ms(bare_graph))
        with sanitizer:
            graphs["log"].append(replay_ms(sanitized_graph))
    with sanitizer:
        sanitizer.flush()
    errors = [v for v in sanitizer.reports if v.severity == "error"]
    out = {"batch": batch, "layers": LAYERS, "ctx": CTX, "errors": len(errors), "checked": sum(sanitizer.checked.values())}
    for name, samples in (("eager", eager), ("graph", graphs)):
        bare, log = statistics.median(samples["bare"]), statistics.median(samples["log"])
        out[name] = {"bare_ms": bare, "log_ms": log, "added_us": (log - bare) * 1000,
                     "ratio": log / bare - 1, "per_call_us": (log - bare) * 1000 / LAYERS,
                     "bare_spread_us": (max(samples["bare"]) - min(samples["bare"])) * 1000}
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    parser.add_argument("--batches", default="8,64")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = [measure(int(b)) for b in args.batches.split(",")]
    with open(os.path.join(args.out, "gpu_model_step.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)
    print(f"{torch.cuda.get_device_name()}: 32-layer decode step, ctx {CTX}, page {PAGE}, xqa; medians of {BLOCKS} "
          f"alternating blocks of {STEPS_PER_BLOCK} steps")
    print("| batch | eager step | sanitized eager | per checked call | in CUDA graphs | per call in graphs | errors |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        e, g = r["eager"], r["graph"]
        print(f"| {r['batch']} | {e['bare_ms']:.2f} ms | {e['added_us']:+.0f} us ({e['ratio']:+.1%}) | "
              f"{e['per_call_us']:.1f} us | {g['added_us']:+.0f} us ({g['ratio']:+.2%}) of {g['bare_ms']:.2f} ms | "
              f"{g['per_call_us']:.2f} us | {r['errors']} |")


if __name__ == "__main__":
    main()
