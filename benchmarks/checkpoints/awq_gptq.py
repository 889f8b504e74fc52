"""Tiny AWQ and GPTQ checkpoints for benchmarks/quality/awq_gptq_exactness.py and tests/test_awq_gptq.py: a tiny
HF model quantized here by plain min/max rounding and packed to the published layouts (AutoAWQ's GEMM words in
AWQ_ORDER; GPTQ v1 with its stored zero - 1, and gptq_v2; act-order g_idx)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from qwen_mlx.formats.awq_gptq import AWQ_ORDER

MODEL = "gqa4-tied"  # hidden 64, intermediate 128, tied (mlx-lm's qwen2 has no explicit head_dim)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PROJECTIONS = {name.split(".")[1] for name in LINEARS}  # experts' too; MoE routers (mlp.gate) stay float
# name -> (method, bits, group size, sym, GPTQ checkpoint format, modules given an act-order g_idx)
CASES = {
    "awq4-g32": ("awq", 4, 32, False, None, ()),
    "gptq4-g32-sym-descact": ("gptq", 4, 32, True, "gptq", ("mlp.down_proj",)),
    "gptq8-row-asym": ("gptq", 8, -1, False, "gptq", ()),
    "gptq4-g64-v2-asym": ("gptq", 4, 64, False, "gptq_v2", ()),
}


# ---- a hand-made quantizer and the published packings ---------------------------------------------------

def quantize(w: np.ndarray, bits: int, g_idx: np.ndarray, groups: int, sym: bool, min_zero: int):
    """Min/max rounding of w [out, in] per (row, group): codes [out, in], zeros and fp16 scales [out, groups]."""
    top = (1 << bits) - 1
    scales = np.zeros((w.shape[0], groups), np.float16)
    zeros = np.zeros((w.shape[0], groups), np.int64)
    for g in range(groups):
        cols = w[:, g_idx == g]
        if sym:
            scales[:, g] = np.abs(cols).max(1) / (top // 2)
            zeros[:, g] = 1 << (bits - 1)
        else:
            lo, hi = np.minimum(cols.min(1), 0), np.maximum(cols.max(1), 0)
            scales[:, g] = (hi - lo) / top
            zeros[:, g] = np.clip(np.round(-lo / scales[:, g].astype(np.float32)), min_zero, top)
    s, z = scales.astype(np.float32)[:, g_idx], zeros[:, g_idx]
    codes = np.clip(np.round(w / s + z), 0, top).astype(np.int64)
    return codes, zeros, scales


def pack(codes: np.ndarray, bits: int, axis: int, order=None) -> np.ndarray:
    """int codes -> int32 words along `axis`, low bits first (slot i holding column order[i] when given)."""
    c = np.moveaxis(codes, axis, -1).astype(np.uint32)
    per = 32 // bits
    c = c.reshape(*c.shape[:-1], -1, per)
    if order is not None:
        c = c[..., list(order)]
    words = np.bitwise_or.reduce(c << (np.arange(per, dtype=np.uint32) * bits), axis=-1)
    return np.ascontiguousarray(np.moveaxis(words, -1, axis)).view(np.int32)


def make_checkpoint(src: Path, dst: Path, method: str, bits: int, group: int, sym: bool, fmt: str | None,
                    act_order: tuple[str, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """Write an AWQ/GPTQ folder from the float HF folder `src`; return the float32 weights it encodes
    (s * (q - z) per quantized module, the rest as stored in fp16)."""
    rng = np.random.default_rng(seed)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            (dst / f.name).write_bytes(f.read_bytes())
    floats = load_file(str(src / "model.safetensors"))
    stored, exact = {}, {}
    for key, w in floats.items():
        module = key.removesuffix(".weight")
        if not (key.endswith(".weight") and module.rsplit(".", 1)[-1] in PROJECTIONS):
            stored[key] = w.astype(np.float16)  # as Qwen publishes: float tensors in fp16
            exact[key] = stored[key].astype(np.float32)
            continue
        out, n_in = w.shape
        g = n_in if group == -1 else group
        g_idx = np.arange(n_in) // g
        if module.endswith(act_order) or f"mlp.experts.{module.rsplit('.', 1)[-1]}" in act_order:
            g_idx = g_idx[rng.permutation(n_in)]
        codes, zeros, scales = quantize(w, bits, g_idx, n_in // g, sym, min_zero=1 if fmt == "gptq" else 0)
        exact[key] = scales.astype(np.float32)[:, g_idx] * (codes - zeros[:, g_idx]).astype(np.float32)
        if method == "awq":
            stored[module + ".qweight"] = pack(codes.T, bits, 1, AWQ_ORDER)
            stored[module + ".qzeros"] = pack(zeros.T, bits, 1, AWQ_ORDER)
        else:
            stored[module + ".qweight"] = pack(codes.T, bits, 0)
            stored[module + ".qzeros"] = pack((zeros.T - (fmt == "gptq")) & ((1 << bits) - 1), bits, 1)
            stored[module + ".g_idx"] = g_idx.astype(np.int32)
        stored[module + ".scales"] = np.ascontiguousarray(scales.T)
    save_file(stored, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    qc = {"quant_method": method, "bits": bits, "group_size": group}
    qc.update({"version": "gemm", "zero_point": True} if method == "awq" else
              {"sym": sym, "desc_act": bool(act_order), "checkpoint_format": fmt})
    config.update(quantization_config=qc, torch_dtype="float16")
    (dst / "config.json").write_text(json.dumps(config))
    return exact
