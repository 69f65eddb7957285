"""Our edits to three of vLLM 0.33.0's own test files, so they run on a CPU (tsan_paged's, not vLLM's).

Each function takes a test file's text as vLLM ships it (from the source distribution on PyPI) and
returns the edited text. Every edit is marked in the output: ``# CPU-EDIT`` (CPU device, fp16 for
bf16 -- Triton's interpreter gets bf16 wrong, without the sanitizer too -- fewer parameter cases)
or ``# PLANT harness`` / ``# ---- PLANT harness (not vLLM's)`` (with the environment variable
``PLANT`` set, it writes one out-of-range entry into a table the test built, just before the
kernel call, and prints ``PLANTED {...}``). The tables and lengths stay as vLLM's tests build them.
An edit whose original text is missing raises: the edits are for vLLM 0.33.0 exactly.
"""

import json
import re


def _apply(src: str, edits) -> str:
    for old, new in edits:
        assert src.count(old) >= 1, f"vLLM's test text not found (not vLLM 0.33.0?): {old!r}"
        src = src.replace(old, new)
    return src


def unified_attention(src: str) -> str:
    """tests/kernels/attention/test_triton_unified_attention.py"""
    src = _apply(src, [
        ("DEVICE_TYPE = current_platform.device_type",
         'DEVICE_TYPE = "cpu"  # CPU-EDIT: UnspecifiedPlatform.device_type is ""'),
        ("NUM_HEADS = [(4, 4), (8, 2), (5, 1)]", "NUM_HEADS = [(8, 2)]  # CPU-EDIT reduced"),
        ("HEAD_SIZES = [128, 256]", "HEAD_SIZES = [128]  # CPU-EDIT reduced"),
        ("DTYPES = [torch.bfloat16]", "DTYPES = [torch.float16]  # CPU-EDIT: bf16 output is garbage under TRITON_INTERPRET"),
        ("NUM_BLOCKS = [32768, 2048]", "NUM_BLOCKS = [2048]  # CPU-EDIT reduced"),
        ('@pytest.mark.parametrize("sliding_window", [None, 64, 128, 256])',
         '@pytest.mark.parametrize("sliding_window", [None, 64, 256])  # CPU-EDIT reduced'),
        ('QDTYPES = [None, current_platform.fp8_dtype()]', 'QDTYPES = [None]  # CPU-EDIT reduced (fp8 KV: the fp8 tests below)'),
        ('@pytest.mark.parametrize("soft_cap", [None, 50.0])', '@pytest.mark.parametrize("soft_cap", [None])  # CPU-EDIT'),
        ('HEAD_SIZES_USE_TD = [128, 256, 96]', 'HEAD_SIZES_USE_TD = [96]  # CPU-EDIT reduced'),
        ('        [(1, 1)] * 533,\n        [(533, 533)] * 533,\n', '        [(1, 1)] * 533,  # CPU-EDIT: [(533, 533)] * 533 dropped\n'),
        # speculative split-K: keep 2 of the w* ids
        ('for w in range(2, MAX_3D_QUERY_LEN + 1, 2)', 'for w in (2, MAX_3D_QUERY_LEN)  # CPU-EDIT reduced'),
        # bf16 -> fp16 where the owner test hardcodes bf16 activations (interpreter bf16 issue)
        ('dtype=torch.bfloat16,\n        block_size=128,', 'dtype=torch.float16,  # CPU-EDIT bf16\n        block_size=128,'),
        ('    dtype = torch.bfloat16\n    query = torch.randn(sum(query_lens)', '    dtype = torch.float16  # CPU-EDIT bf16\n    query = torch.randn(sum(query_lens)'),
        ('    dtype: torch.dtype = torch.bfloat16,\n    num_blocks: int = 2048,', '    dtype: torch.dtype = torch.float16,  # CPU-EDIT bf16\n    num_blocks: int = 2048,'),
        ('        dtype=torch.bfloat16,\n        device=DEVICE_TYPE,\n    )\n    num_blocks_per_req', '        dtype=torch.float16,  # CPU-EDIT bf16\n        device=DEVICE_TYPE,\n    )\n    num_blocks_per_req'),
        ('        dtype=torch.bfloat16,\n        device=DEVICE_TYPE,\n    )\n    value_cache = torch.randn_like(key_cache)\n\n    block_tables = torch.zeros(',
         '        dtype=torch.float16,  # CPU-EDIT bf16\n        device=DEVICE_TYPE,\n    )\n    value_cache = torch.randn_like(key_cache)\n\n    block_tables = torch.zeros('),
    ])
    # fp8 test: output bf16
    src = src.replace("output = torch.empty(1, 1, head_size, dtype=torch.bfloat16, device=device)",
                      "output = torch.empty(1, 1, head_size, dtype=torch.float16, device=device)  # CPU-EDIT bf16")
    # Planting hook (PLANT env): every keyword call of unified_attention goes through _ua, which may
    # plant one out-of-range entry in the table first. Names the call by the module global at call time
    # (the sanitizer rebinds the module's `unified_attention`).
    assert re.findall(r"\n    unified_attention\(\n", src)
    src = re.sub(r"\n    unified_attention\(\n", "\n    _ua(\n", src)
    src += '''

# ---- PLANT harness (not vLLM's) ------------------------------------------------------------
import os as _os
PLANTED = []

def _ua(*args, **kw):
    mode = _os.environ.get("PLANT")
    if mode and not args:  # _uses_splitk (positional, MagicMock kernel) is not planted
        PLANTED.append(_plant(kw, mode))
        print("PLANTED", PLANTED[-1])
    return globals()["unified_attention"](*args, **kw)

def _plant(kw, mode):
    table, lens, cu, k = kw["block_table"], kw["seqused_k"], kw["cu_seqlens_q"], kw["k"]
    bs, nb = k.shape[1], k.shape[0]
    ql = (cu[1:] - cu[:-1]).tolist(); kl = lens.tolist()
    wl = kw["window_size"][0] if kw.get("window_size") is not None else -1
    rows = [r for r in range(len(kl)) if ql[r] > 0 and kl[r] > 0]
    r = max(rows, key=lambda i: (kl[i], i))
    last = -(-kl[r] // bs) - 1
    first = max(kl[r] - ql[r] - wl, 0) // bs if wl >= 0 else 0  # first page some query attends to
    col = {"last": last, "first": first, "dead0": 0}[mode]
    table[r, col] = nb
    return dict(mode=mode, row=r, col=col, value=nb, first_attended=first, last=last, q_len=ql[r], kv_len=kl[r], window_left=wl)
'''
    return src


def cache(src: str, vllm_src: str) -> str:
    """tests/kernels/attention/test_cache.py; ``vllm_src``: the extracted source (for tests.kernels.utils)."""
    src = _apply(src, [
        ('CUDA_DEVICES = [\n    f"cuda:{i}" for i in range(1 if torch.accelerator.device_count() == 1 else 2)\n]',
         'CUDA_DEVICES = ["cpu"]  # CPU-EDIT'),
        ("DTYPES = [torch.bfloat16, torch.float]", "DTYPES = [torch.float]  # CPU-EDIT reduced"),
        ("HEAD_SIZES = [64, 80, 256]", "HEAD_SIZES = [64, 80]  # CPU-EDIT reduced"),
        ("BLOCK_SIZES = [8, 16, 32]", "BLOCK_SIZES = [16]  # CPU-EDIT reduced"),
        ("NUM_BLOCKS = [1024, 10000]", "NUM_BLOCKS = [1024]  # CPU-EDIT reduced"),
        ("KV_LORA_RANKS = [256, 512]", "KV_LORA_RANKS = [256]  # CPU-EDIT reduced"),
    ])
    src = src.replace("    torch.accelerator.set_device_index(device)\n", "    # CPU-EDIT: torch.accelerator.set_device_index(device) dropped\n")
    src = src.replace("from tests.kernels.utils import", f"import sys; sys.path.insert(0, {vllm_src!r})  # CPU-EDIT\nfrom tests.kernels.utils import")
    for old in ("    slot_mapping = torch.tensor(slot_mapping_lst, dtype=torch.long)\n",
                "    slot_mapping = torch.tensor(slot_mapping_lst, dtype=torch.long, device=device)\n"):
        src = src.replace(old, old + "    _plant_slots(slot_mapping, num_slots if \"num_slots\" in dir() else total_slots)  # PLANT harness\n")
    # concat_and_cache_mla: its reference indexes the cache by slot first, so plant just before the op call
    _pl = '    _plant_slots(slot_mapping, num_slots if "num_slots" in dir() else total_slots)  # PLANT harness\n'
    _i = src.index("def test_concat_and_cache_mla(")
    _j = src.index(_pl, _i)
    src = src[:_j] + src[_j + len(_pl):]
    _call = "    opcheck(\n        torch.ops._C_cache_ops.concat_and_cache_mla,\n        (kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale),"
    assert src.count(_call) >= 1
    _k = src.index(_call, _i)
    src = src[:_k] + "    _plant_slots(slot_mapping, total_slots)  # PLANT harness (before the op)\n" + src[_k:]
    src += '''

# ---- PLANT harness (not vLLM's): PLANT=slot sets one live slot to num_blocks * block_size -------
import os as _os
def _plant_slots(slot_mapping, num_slots):
    if _os.environ.get("PLANT") == "slot":
        t = int(slot_mapping.shape[0]) - 1
        slot_mapping[t] = num_slots
        print("PLANTED", dict(index=t, value=num_slots))
'''
    return src


def attention_backends(src: str, model_dir: str) -> str:
    """tests/v1/attention/test_attention_backends.py; ``model_dir``: the local Qwen3 config.json's directory."""
    src = _apply(src, [
        ('BACKENDS_TO_TEST = [\n    AttentionBackendEnum.FLASH_ATTN,\n    AttentionBackendEnum.FLASHINFER,\n    AttentionBackendEnum.FLEX_ATTENTION,\n    AttentionBackendEnum.TRITON_ATTN,\n    "FLEX_ATTENTION_SLOW",\n]',
         'BACKENDS_TO_TEST = [AttentionBackendEnum.TRITON_ATTN]  # CPU-EDIT: the backend tsan_paged has rules for'),
        ("DEVICE_TYPE = current_platform.device_type", 'DEVICE_TYPE = "cpu"  # CPU-EDIT'),
        ('@pytest.mark.parametrize("model", ["Qwen/Qwen3-0.6B"])',
         f'@pytest.mark.parametrize("model", [{json.dumps(model_dir)}])  # CPU-EDIT: local config.json, no hub'),
        ('@pytest.mark.parametrize("tensor_parallel_size", [1, 2, 4])\n@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8", "fp8_e4m3"])',
         '@pytest.mark.parametrize("tensor_parallel_size", [1])  # CPU-EDIT\n@pytest.mark.parametrize("kv_cache_dtype", ["auto"])  # CPU-EDIT'),
    ])
    _flex = '[AttentionBackendEnum.FLEX_ATTENTION]\n        if is_torch_equal_or_newer("2.9.0.dev0")\n        else []'
    src = src.replace(_flex, "[]  # CPU-EDIT: FlexAttention (block 128) not a tsan_paged target")
    _anchor = "    num_heads = vllm_config.model_config.get_num_attention_heads(\n"
    assert src.count(_anchor) == 1
    src = src.replace(_anchor, "    _plant(attn_metadata, kv_cache)  # PLANT harness\n" + _anchor)
    src += '''

# ---- PLANT harness (not vLLM's) ------------------------------------------------------------
import os as _os
def _plant(md, kv_cache):
    mode = _os.environ.get("PLANT")
    if not mode:
        return
    num_blocks, block_size = kv_cache.shape[0], kv_cache.shape[2]  # logical [blocks, H, block_size, 2D]
    if mode == "table":
        lens = md.seq_lens.tolist()
        r = max(range(len(lens)), key=lambda i: lens[i])
        c = -(-lens[r] // block_size) - 1
        md.block_table[r, c] = num_blocks
        print("PLANTED", dict(mode=mode, index=(r, c), value=num_blocks))
    elif mode == "slot":
        t = md.slot_mapping.shape[0] - 1
        md.slot_mapping[t] = num_blocks * block_size
        print("PLANTED", dict(mode=mode, index=(t,), value=num_blocks * block_size))
'''
    return src


# The Qwen3-0.6B shapes the backend test reads from the model's config (hand-written, not from the hub:
# the test only needs the attention shapes; no weights, no tokenizer).
QWEN3_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 28, "intermediate_size": 3072, "vocab_size": 151936,
    "max_position_embeddings": 40960, "torch_dtype": "float16", "rms_norm_eps": 1e-06, "rope_theta": 1000000,
    "tie_word_embeddings": True, "sliding_window": None, "use_sliding_window": False,
}
