"""Drive vLLM 0.33.0's own KV-cache bookkeeping and Triton attention backend on a CPU.

Nothing here re-implements vLLM: it plays the scheduler's and model runner's part (which
requests run, how many tokens each computed and schedules) and calls vLLM's own objects:

- blocks: ``vllm.v1.core.block_pool.BlockPool`` (block 0 is its null block) and the
  scheduler-side ``FullAttentionManager`` / ``SlidingWindowManager``
  (``vllm.v1.core.single_type_kv_cache_manager``): ``allocate_new_blocks``, and
  ``remove_skipped_blocks``, which frees the blocks a window left and puts the null block in
  their place, as the scheduler does each step;
- the table and slot mapping: ``vllm.v1.worker.block_table.BlockTable``, filled as the model
  runner fills it (``gpu_input_batch.py``: ``add_row`` for a request new to the batch;
  ``gpu_model_runner.py`` ``_update_states``: ``append_row`` of the step's new blocks only, so
  blocks the scheduler freed behind a window stay in the worker's row: stale, in range), and
  ``compute_slot_mapping`` (vLLM's Triton kernel, run by the interpreter);
- the per-step metadata: ``CommonAttentionMetadata`` as the model runner fills it, then
  ``TritonAttentionMetadataBuilder.build`` (its split-KV scratch, 3D threshold);
- the layer: ``TritonAttentionImpl.do_kv_cache_update`` (-> ``triton_reshape_and_cache_flash``)
  and ``TritonAttentionImpl.forward`` (-> ``unified_attention``, vLLM's Triton kernel).

Two things differ from a GPU run, both outside vLLM's code: ``BlockTable.commit_block_table``
copies through pinned memory (vLLM's platform says pinning works; there is no driver here to
pin with), so its copy is made here unpinned; and ``triton_reshape_and_cache_flash`` asks
``torch.cuda.get_device_capability`` before its launch, which refuses a CPU after the
sanitizer's check, so the cache is written here the way that kernel writes it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import needs_vllm  # noqa: F401  (CUDA_VISIBLE_DEVICES, TRITON_INTERPRET, the compiled stand-ins; skips without vLLM)
import torch
from vllm.config import CacheConfig, DeviceConfig, ModelConfig, VllmConfig, set_current_vllm_config
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl, TritonAttentionMetadataBuilder
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager, SlidingWindowManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec
from vllm.v1.worker.block_table import BlockTable

HEADS, KV_HEADS, DIM = 4, 2, 16
LAYER = "model.layers.0.self_attn.attn"
_CONFIGS: dict = {}


def vllm_config(block_size: int, max_model_len: int = 1024) -> VllmConfig:
    """A ``VllmConfig`` for a one-layer Llama (a local ``config.json``: no hub access)."""
    key = (block_size, max_model_len)
    if key not in _CONFIGS:
        model = tempfile.mkdtemp(prefix="tsan_paged_vllm_model_")
        with open(os.path.join(model, "config.json"), "w") as f:
            json.dump(dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=HEADS * DIM,
                           num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=DIM,
                           num_hidden_layers=1, intermediate_size=128, vocab_size=256,
                           max_position_embeddings=max_model_len, torch_dtype="float32"), f)
        model_config = ModelConfig(model=model, tokenizer=model, skip_tokenizer_init=True, dtype="float32",
                                   max_model_len=max_model_len, seed=0)
        _CONFIGS[key] = VllmConfig(model_config=model_config, cache_config=CacheConfig(block_size=block_size),
                                   device_config=DeviceConfig(device="cpu"))
    return _CONFIGS[key]


class Layer(torch.nn.Module):
    """What ``TritonAttentionImpl`` reads of vLLM's ``Attention`` layer: its q/k/v scales (1.0
    for an unquantized cache, as ``Attention.__init__`` sets them)."""

    def __init__(self):
        super().__init__()
        self._q_scale = torch.tensor(1.0)
        self._k_scale = torch.tensor(1.0)
        self._v_scale = torch.tensor(1.0)


@dataclass
class Step:
    metadata: object  # TritonAttentionMetadata
    common: CommonAttentionMetadata
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    kv_cache: torch.Tensor  # [num_blocks, H, block_size, 2 * D], as the backend's cache shape
    context: list
    q_lens: list


class TritonBackend:
    """vLLM's Triton attention backend for one layer, its blocks and its table."""

    def __init__(self, block_size=16, num_blocks=48, sliding_window=None, max_reqs=8, max_blocks_per_req=16):
        self.block_size, self.num_blocks = block_size, num_blocks
        self.config = vllm_config(block_size)
        if sliding_window is None:
            self.spec = FullAttentionSpec(block_size=block_size, num_kv_heads=KV_HEADS, head_size=DIM,
                                          dtype=torch.float32)
            manager = FullAttentionManager
        else:
            self.spec = SlidingWindowSpec(block_size=block_size, num_kv_heads=KV_HEADS, head_size=DIM,
                                          dtype=torch.float32, sliding_window=sliding_window)
            manager = SlidingWindowManager
        self.pool = BlockPool(num_blocks, enable_caching=False, hash_block_size=block_size)
        self.manager = manager(self.spec, block_pool=self.pool, enable_caching=False, kv_cache_group_id=0,
                               scheduler_block_size=block_size)
        self.table = BlockTable(block_size, max_reqs, max_blocks_per_req, max_reqs * 64, False, torch.device("cpu"), 1)
        with set_current_vllm_config(self.config):
            self.builder = TritonAttentionMetadataBuilder(self.spec, [LAYER], self.config, torch.device("cpu"))
            self.impl = TritonAttentionImpl(HEADS, DIM, DIM ** -0.5, KV_HEADS, None, sliding_window, "auto")
        self.layer = Layer()
        self.rows: dict = {}  # request id -> its row in the persistent batch
        g = torch.Generator().manual_seed(0)
        self.kv_cache = torch.randn(num_blocks, KV_HEADS, block_size, 2 * DIM, generator=g)

    def step(self, requests, seed=0) -> Step:
        """``requests``: ``[(request_id, computed_tokens, scheduled_tokens)]``, in batch order."""
        for row, (rid, computed, scheduled) in enumerate(requests):
            self.manager.remove_skipped_blocks(rid, computed)  # the scheduler frees what the window left
            new = self.manager.allocate_new_blocks(rid, computed + scheduled, computed + scheduled)
            if self.rows.get(rid) != row:  # new to the batch (this driver keeps each request's row)
                self.table.add_row([b.block_id for b in self.manager.req_to_blocks[rid]], row)
                self.rows[rid] = row
            elif new:
                self.table.append_row([b.block_id for b in new], row)
        n = len(requests)
        self.table.block_table.gpu[:n].copy_(self.table.block_table.cpu[:n])  # commit_block_table, unpinned
        q_lens = [s for _, _, s in requests]
        context = [c for _, c, _ in requests]
        query_start_loc = torch.zeros(n + 1, dtype=torch.int32)
        query_start_loc[1:] = torch.cumsum(torch.tensor(q_lens), 0)
        seq_lens = torch.tensor([c + s for c, s in zip(context, q_lens)], dtype=torch.int32)
        positions = torch.cat([torch.arange(c, c + s) for c, s in zip(context, q_lens)])
        self.table.compute_slot_mapping(n, query_start_loc, positions)
        tokens = int(query_start_loc[-1])
        common = CommonAttentionMetadata(
            query_start_loc=query_start_loc, query_start_loc_cpu=query_start_loc, seq_lens=seq_lens, num_reqs=n,
            num_actual_tokens=tokens, max_query_len=max(q_lens), max_seq_len=int(seq_lens.max()),
            block_table_tensor=self.table.get_device_tensor(n), slot_mapping=self.table.slot_mapping.gpu[:tokens])
        metadata = self.builder.build(0, common)
        g = torch.Generator().manual_seed(seed)
        return Step(metadata, common, torch.randn(tokens, HEADS, DIM, generator=g),
                    torch.randn(tokens, KV_HEADS, DIM, generator=g), torch.randn(tokens, KV_HEADS, DIM, generator=g),
                    self.kv_cache, context, q_lens)

    def kv_update(self, step: Step):
        """``do_kv_cache_update`` as the model runner calls it (the sanitizer checks
        ``triton_reshape_and_cache_flash``'s slots there; the launch then refuses a CPU), then the
        write that kernel makes: token t into slot ``slot_mapping[t]``, negative slots skipped."""
        try:
            self.impl.do_kv_cache_update(self.layer, step.key, step.value, step.kv_cache, step.metadata.slot_mapping)
        except RuntimeError as exc:  # torch.cuda.get_device_capability, after the check
            if "NVIDIA driver" not in str(exc) and "CUDA" not in str(exc):
                raise
        slots = step.metadata.slot_mapping
        live = slots >= 0
        key_cache, value_cache = step.kv_cache.transpose(1, 2).split(DIM, dim=-1)  # [blocks, bs, H, D] views
        blocks, offsets = slots[live] // self.block_size, slots[live] % self.block_size
        key_cache[blocks, offsets] = step.key[live]
        value_cache[blocks, offsets] = step.value[live]

    def forward(self, step: Step) -> torch.Tensor:
        output = torch.empty_like(step.query)
        self.impl.forward(self.layer, step.query, step.key, step.value, step.kv_cache, step.metadata, output)
        return output

    def reference(self, step: Step, window=None) -> torch.Tensor:
        """Causal attention of each request's queries over its tokens, read from the cache by its
        block table (null blocks before a window included: they are masked)."""
        key_cache, value_cache = step.kv_cache.transpose(1, 2).split(DIM, dim=-1)
        table = step.metadata.block_table
        out = torch.empty_like(step.query)
        group = HEADS // KV_HEADS
        for b, (ctx, q_len) in enumerate(zip(step.context, step.q_lens)):
            length = ctx + q_len
            pos = torch.arange(length)
            blocks = table[b, pos // self.block_size].long()
            keys = key_cache[blocks, pos % self.block_size].repeat_interleave(group, 1)
            values = value_cache[blocks, pos % self.block_size].repeat_interleave(group, 1)
            rows = slice(int(step.common.query_start_loc[b]), int(step.common.query_start_loc[b + 1]))
            scores = torch.einsum("qhd,khd->hqk", step.query[rows], keys) * DIM ** -0.5
            qpos = torch.arange(ctx, length).unsqueeze(1)
            mask = pos <= qpos
            if window is not None:
                mask &= pos > qpos - window
            out[rows] = torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), values)
        return out
