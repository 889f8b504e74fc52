"""GGUF blocks kept (qwen_mlx.formats.gguf_blocks): llama.cpp's affine block formats held as MLX quantized layers.

Independent reference: `gguf.quants.dequantize` (the llama.cpp project's numpy code). Blocks of the types
gguf-py can write (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) come from `gguf.quants.quantize`; gguf-py has no K-quant
quantizer, so Q4_K, Q5_K and Q6_K blocks are random bytes with finite float16 d/dmin (every such byte string
is a valid block). The tiny model mixes every type, one per matrix, so the folder has mixed bits.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from qwen_mlx.checkpoint import prepare_model
from qwen_mlx.errors import QwenError
from qwen_mlx.formats.gguf_blocks import KEPT, to_mlx
from qwen_mlx.formats.gguf import convert_gguf
from qwen_mlx.backends.mlx import MLXBackend
from qwen_mlx.formats.affine import QuantParams, dequantize as our_dequantize
from tests.support.gguf import CHAT_TEMPLATE, tiny_vocab

KEPT_TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K]
H, FFN, HEADS, KV_HEADS = 256, 512, 4, 2  # K-quant rows are whole 256-element super-blocks
HEAD_DIM = H // HEADS
PROMPT = [1, 5, 9, 33, 100, 7, 250, 42]
# One type per matrix (GGUF name -> type): every kept type, a Q6_K matrix that must be dequantized.
TYPES = {
    "token_embd.weight": T.Q5_0, "output.weight": T.Q8_0,
    "blk.0.attn_q.weight": T.Q8_0, "blk.0.attn_k.weight": T.Q4_0, "blk.0.attn_v.weight": T.Q4_1,
    "blk.0.attn_output.weight": T.Q5_1, "blk.0.ffn_gate.weight": T.Q4_K, "blk.0.ffn_up.weight": T.Q5_K,
    "blk.0.ffn_down.weight": T.Q6_K,
    "blk.1.attn_q.weight": T.Q4_K, "blk.1.attn_k.weight": T.Q5_K, "blk.1.attn_v.weight": T.Q8_0,
    "blk.1.attn_output.weight": T.Q4_0, "blk.1.ffn_gate.weight": T.Q5_0, "blk.1.ffn_up.weight": T.Q4_1,
    "blk.1.ffn_down.weight": T.Q5_1,
}


def blocks(rng: np.random.Generator, shape: tuple[int, int], qtype: T, scale: float = 0.05) -> np.ndarray:
    """Raw GGUF rows [rows, row bytes] of `qtype` for a [rows, cols] matrix."""
    if qtype not in (T.Q4_K, T.Q5_K, T.Q6_K):
        return gguf.quants.quantize((rng.standard_normal(shape) * scale).astype(np.float32), qtype)
    per, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (shape[0], shape[1] // per, size), dtype=np.uint8)
    if qtype == T.Q6_K:  # d (float16) is the last 2 bytes; the 16 int8 scales reach 127
        raw[..., -2:] = _f16_bytes(rng, raw.shape[:2], 1, scale / 32 / 64)
    else:  # d and dmin lead; 6-bit sub-block scales reach 63, codes 15 or 31
        raw[..., 0:4] = _f16_bytes(rng, raw.shape[:2], 2, scale / 63 / 8)
    return raw.reshape(shape[0], -1)


def _f16_bytes(rng, lead, count: int, scale: float) -> np.ndarray:
    values = np.abs(rng.standard_normal((*lead, count))) * scale
    return values.astype(np.float16).view(np.uint8)


# ------------------------------------------------------------------------------------ block exactness


@pytest.mark.parametrize("qtype", KEPT_TYPES, ids=lambda t: t.name)
def test_mlx_layers_hold_gguf_blocks_exactly(qtype):
    """mx.dequantize of the repacked tensor equals gguf's own dequantization: every value, and every bit
    except the sign of a zero (d * 0 with a negative d is -0.0 in gguf, d * q + bias gives +0.0)."""
    rng = np.random.default_rng(int(qtype))
    raw = blocks(rng, (16, 512), qtype, scale=1.0)
    if qtype in (T.Q4_0, T.Q5_0, T.Q8_0):  # and zero-sized blocks and extreme float16 d values
        per, size = gguf.GGML_QUANT_SIZES[qtype]
        view = raw.reshape(16, -1, size)
        view[0, :, 0:2] = np.array([0.0], np.float16).view(np.uint8)
        view[1, :, 0:2] = np.array([-60000.0 / 128], np.float16).view(np.uint8)
        view[2, :, 0:2] = np.array([6e-8], np.float16).view(np.uint8)  # a float16 subnormal
    want = gguf_dequantize(raw, qtype)
    weight, scales, biases = to_mlx(raw, qtype)
    bits = KEPT[int(qtype)][1]
    assert weight.dtype == np.uint32 and weight.shape == (16, 512 * bits // 32)
    assert scales.dtype == biases.dtype == np.float32 and scales.shape == (16, 512 // 32)
    got = np.array(mx.dequantize(mx.array(weight), mx.array(scales), mx.array(biases), group_size=32, bits=bits))
    np.testing.assert_array_equal(got, want)
    differ = got.view(np.uint32) != want.view(np.uint32)
    assert (want[differ] == 0).all()
    # the torch twin's numpy reader of MLX's layout agrees
    np.testing.assert_array_equal(our_dequantize(weight, scales, biases, QuantParams(32, bits)), want)


def test_a_non_finite_scale_is_one_error(tmp_path):
    raw = blocks(np.random.default_rng(0), (KV_HEADS * HEAD_DIM, H), T.Q8_0)
    raw.reshape(raw.shape[0], -1, 34)[3, 2, 0:2] = np.array([np.nan], np.float16).view(np.uint8)
    path = tmp_path / "nan.gguf"
    write_mixed_gguf(path, {"blk.1.attn_v.weight": raw})
    with pytest.raises(QwenError, match="'blk.1.attn_v.weight' has non-finite block scales"):
        convert_gguf(path, tmp_path / "out", dtype=None, progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ a mixed tiny model


def write_mixed_gguf(path: Path, replace: dict[str, np.ndarray] | None = None, seed: int = 0) -> None:
    """A 2-layer qwen2 GGUF whose matrices use TYPES (norms and biases F32)."""
    rng = np.random.default_rng(seed)
    tokens, types, merges = tiny_vocab()
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(H)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_chat_template(CHAT_TEMPLATE)
    shapes = {"token_embd.weight": (len(tokens), H), "output.weight": (len(tokens), H)}
    for n in range(2):
        shapes |= {f"blk.{n}.attn_q.weight": (H, H), f"blk.{n}.attn_k.weight": (KV_HEADS * HEAD_DIM, H),
                   f"blk.{n}.attn_v.weight": (KV_HEADS * HEAD_DIM, H), f"blk.{n}.attn_output.weight": (H, H),
                   f"blk.{n}.ffn_gate.weight": (FFN, H), f"blk.{n}.ffn_up.weight": (FFN, H),
                   f"blk.{n}.ffn_down.weight": (H, FFN)}
    for name, shape in shapes.items():
        raw = (replace or {}).get(name)
        raw = blocks(rng, shape, TYPES[name]) if raw is None else raw
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=TYPES[name])
    floats = {"output_norm.weight": (H,)}
    for n in range(2):
        floats |= {f"blk.{n}.attn_norm.weight": (H,), f"blk.{n}.ffn_norm.weight": (H,),
                   f"blk.{n}.attn_q.bias": (H,), f"blk.{n}.attn_k.bias": (KV_HEADS * HEAD_DIM,),
                   f"blk.{n}.attn_v.bias": (KV_HEADS * HEAD_DIM,)}
    for name, shape in floats.items():
        base = 1.0 if "norm" in name else 0.0
        writer.add_tensor(name, (base + rng.standard_normal(shape) * 0.1).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(the GGUF, its kept-blocks folder, its float32 folder)."""
    root = tmp_path_factory.mktemp("mixed")
    write_mixed_gguf(root / "mixed.gguf")
    kept = convert_gguf(root / "mixed.gguf", root / "kept", dtype=None, progress=False)
    full = convert_gguf(root / "mixed.gguf", root / "f32", dtype="float32", progress=False)
    return root / "mixed.gguf", kept, full


def _greedy(backend, prompt: list[int], n: int) -> tuple[list[np.ndarray], list[int]]:
    logits, tokens = [backend.forward(prompt)], []
    for _ in range(n):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(backend.forward([tokens[-1]]))
    return logits, tokens


def test_kept_folder_config_is_mixed_bits(mixed):
    _, kept, _ = mixed
    q = json.loads((kept / "config.json").read_text())["quantization"]
    assert (q["group_size"], q["bits"], q["mode"]) == (32, 4, "affine")  # 4-bit: Q4_0, Q4_1, Q4_K are commonest
    assert q["model.embed_tokens"] == {"group_size": 32, "bits": 5}
    assert q["lm_head"] == q["model.layers.0.self_attn.q_proj"] == {"group_size": 32, "bits": 8}
    assert q["model.layers.0.mlp.up_proj"] == q["model.layers.1.mlp.down_proj"] == {"group_size": 32, "bits": 5}
    assert "model.layers.0.self_attn.k_proj" not in q  # at the default
    assert q["model.layers.0.mlp.down_proj"] is False  # Q6_K, dequantized to float32


def test_kept_layers_equal_gguf_dequantization(mixed):
    """Every matrix of the loaded MLX model, dequantized by MLX, equals the float32 folder's tensor (itself
    gguf.quants.dequantize's output): exact blocks where kept, float32 where not."""
    from safetensors.numpy import load_file

    _, kept, full = mixed
    model = MLXBackend(prepare_model(str(kept)), "float32").model
    want = load_file(str(full / "model.safetensors"))
    modules = dict(model.named_modules())
    quantized = 0
    for key, value in want.items():
        module = modules.get(key.removesuffix(".weight"))
        if module is None or not key.endswith(".weight") or value.ndim != 2:
            continue
        if hasattr(module, "scales"):
            quantized += 1
            got = mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits)
        else:
            got = module.weight
        np.testing.assert_array_equal(np.array(got), value, err_msg=key)
    assert quantized == len(TYPES) - 1  # all but the Q6_K down_proj


def test_kept_model_runs_like_the_float32_one(mixed):
    """Logits to float rounding and the same 16 greedy tokens, in this project and in mlx-lm."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    _, kept, full = mixed
    ours, reference = MLXBackend(prepare_model(str(kept)), "float32"), MLXBackend(prepare_model(str(full)), "float32")
    assert "as stored" in ours.device
    got_logits, got = _greedy(ours, PROMPT, 16)
    want_logits, want = _greedy(reference, PROMPT, 16)
    assert got == want
    for a, b in zip(got_logits, want_logits):
        np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=0)
    model, _ = load(str(kept))  # mlx-lm runs the same folder unmodified
    assert [int(t) for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=16)] == want


def test_torch_twin_dequantizes_the_kept_folder_exactly(mixed):
    from export.models.load import load_model

    _, kept, full = mixed
    a, b = load_model(prepare_model(str(kept))).state_dict(), load_model(prepare_model(str(full))).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), key


def test_cli_keeps_blocks_unless_a_dtype_is_asked(mixed, tmp_path):
    """`--model x.gguf` runs the kept folder (cached once), `--dtype` the dequantized one; `info` shows the
    stored quantization; `convert --gguf` writes the kept folder, `--dtype` an HF float folder."""
    from tests.support.cli import run_with_cache

    path, kept, full = mixed
    cache = tmp_path / "cache"
    r = run_with_cache("info", "--model", str(path), cache=cache)
    assert r.returncode == 0, r.stderr
    assert "4-bit affine, group size 32; overrides: " in r.stdout and "1 module float" in r.stdout
    assert [p.name.split("-")[-1] for p in (cache / "gguf").iterdir() if p.is_dir()] == ["blocks"]
    r = run_with_cache("convert", "--gguf", str(path), "--out", str(tmp_path / "k"), cache=cache)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "k" / "config.json").read_text())["quantization"]["bits"] == 4
    r = run_with_cache("convert", "--gguf", str(path), "--dtype", "float32", "--out", str(tmp_path / "f"), cache=cache)
    assert r.returncode == 0, r.stderr
    assert "quantization" not in json.loads((tmp_path / "f" / "config.json").read_text())


# ------------------------------------------------------------------------------------ the real checkpoint


@pytest.fixture(scope="module")
def real_kept(real_model_dir) -> Path:
    from qwen_mlx.formats.gguf import cached_conversion
    from qwen_mlx.formats.real_checkpoint import real_gguf

    return cached_conversion(real_gguf(progress=False), None, progress=False)


@pytest.mark.real
def test_real_gguf_keeps_q8_q5_q4k_and_dequantizes_q6k(real_kept, real_model_dir):
    """Its Q5_0 (default), Q8_0 and Q4_K matrices kept, its 12 Q6_K ffn_down float32; one module of each
    kept type dequantizes by MLX to exactly the float32 conversion's tensor (gguf.quants.dequantize)."""
    from safetensors import safe_open

    q = json.loads((real_kept / "config.json").read_text())["quantization"]
    assert (q["bits"], q["group_size"]) == (5, 32)
    overrides = [v for k, v in q.items() if k not in ("bits", "group_size", "mode")]
    assert sum(v == {"group_size": 32, "bits": 8} for v in overrides) == 13  # attn_v x12, output
    assert sum(v == {"group_size": 32, "bits": 4} for v in overrides) == 12
    assert sorted(k for k, v in q.items() if v is False) == sorted(
        f"model.layers.{n}.mlp.down_proj" for n in (0, 1, 3, 6, 7, 8, 9, 10, 13, 16, 19, 21))
    with safe_open(str(real_kept / "model.safetensors"), "numpy") as kept, \
            safe_open(str(real_model_dir / "model.safetensors"), "numpy") as full:
        for module, bits in (("model.embed_tokens", 5), ("lm_head", 8), ("model.layers.2.mlp.down_proj", 4)):
            assert module not in q or q[module]["bits"] == bits
            w, s, b = (mx.array(kept.get_tensor(f"{module}.{k}")) for k in ("weight", "scales", "biases"))
            np.testing.assert_array_equal(np.array(mx.dequantize(w, s, b, 32, bits)), full.get_tensor(f"{module}.weight"))


@pytest.mark.real
def test_real_gguf_blocks_greedy_equals_float32(real_kept, real_model_dir):
    """The first 16 greedy tokens of each parity-suite prompt: kept blocks (quantized kernels) equal the
    dequantized float32 model's."""
    from qwen_mlx.backends import load
    from qwen_mlx.backends.base import Session, greedy_tokens
    from benchmarks.quality import parity

    runs = []
    for folder, dtype in ((real_kept, None), (real_model_dir, "float32")):
        loaded = load("mlx", str(folder), dtype)
        prompts = parity.parity_prompts(loaded.tokenizer)
        runs.append({p: greedy_tokens(Session(loaded.backend), ids, 16) for p, ids in prompts.items()})
        del loaded
        parity.free_memory()
    assert runs[0] == runs[1]


def test_kept_expert_stacks_are_mlx_lm_switch_mlp(tiny_model, tmp_path):
    """Q8_0 expert stacks stay one quantized `mlp.switch_mlp.<proj>` [X, out, in] module (mlx-lm's layout):
    the same logits (to float rounding) and greedy tokens as the float32 conversion, here and in mlx-lm."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    from tests.support.gguf import write_gguf_from_hf

    path = tmp_path / "moe.gguf"
    write_gguf_from_hf(tiny_model("qwen3moe-q64"), path, True, False)
    kept = convert_gguf(path, tmp_path / "kept", dtype=None, progress=False)
    full = convert_gguf(path, tmp_path / "f32", dtype="float32", progress=False)
    q = json.loads((kept / "config.json").read_text())["quantization"]
    assert q["bits"] == 8 and q["model.layers.0.self_attn.q_proj"] is False  # F32 in the GGUF
    ckpt = prepare_model(str(kept))
    layer = ckpt.args.moe_layers[0]
    assert f"model.layers.{layer}.mlp.switch_mlp.gate_proj.scales" in ckpt.tensors
    ours, reference = MLXBackend(ckpt, "float32"), MLXBackend(prepare_model(str(full)), "float32")
    assert ours.model.model.layers[layer].mlp.experts.gate_proj.bits == 8
    got_logits, got = _greedy(ours, PROMPT, 8)
    want_logits, want = _greedy(reference, PROMPT, 8)
    assert got == want
    for a, b in zip(got_logits, want_logits):
        np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=0)
    model, _ = load(str(kept))
    assert [int(t) for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=8)] == want
