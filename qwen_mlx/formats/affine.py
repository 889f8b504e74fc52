"""MLX affine quantization as `mlx_lm.convert -q` stores it, in pure Python (numpy only, no MLX, no torch).

config.json `"quantization": {"group_size": G, "bits": b, "mode": "affine", "<module path>": {...} | false}`
names the default and per-module overrides. A quantized module holds `weight` uint32 [..., out, in*b/32]
(b-bit codes packed little end first), and `scales` and `biases` [..., out, in/G]: w = scales * q + biases
per group of G inputs. The MLX loader quantizes the model to match; the torch twin dequantizes here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import QwenError

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantParams:
    group_size: int
    bits: int


def read_quantization(config: dict[str, Any]) -> dict[str, Any] | None:
    """The stored `quantization` dict (mlx-lm's spelling), or None for a float checkpoint. Only the affine
    mode is taken: mxfp4/nvfp4 and others use other scale formats."""
    q = config.get("quantization")
    if q is None:
        qc = config.get("quantization_config")
        if isinstance(qc, dict) and "quant_method" in qc:
            raise QwenError(f"quantization_config.quant_method {qc['quant_method']!r} is not supported "
                            "(MLX affine folders written by mlx_lm.convert -q are)")
        q = qc if isinstance(qc, dict) and "bits" in qc else None
    if q is None:
        return None
    if not isinstance(q, dict):
        raise QwenError(f"config.json quantization must be an object, got {q!r}")
    mode = q.get("mode", "affine")
    if mode != "affine":
        raise QwenError(f"quantization mode {mode!r} is not supported (only MLX's affine mode is)")
    _check_params("quantization", q)
    # mlx-lm names Qwen3.5's modules by its own path to the text model (`language_model.model.layers.0.mlp.gate`);
    # the checkpoint reader names them as the text model does (ModelArgs.checkpoint_key drops the prefix).
    q = {k.removeprefix("language_model."): v for k, v in q.items()}
    for path, override in q.items():
        if isinstance(override, dict):
            if override.get("mode", "affine") != "affine":
                raise QwenError(f"quantization of {path}: mode {override['mode']!r} is not supported")
            _check_params(f"quantization of {path}", override)
    return q


def _check_params(where: str, q: dict[str, Any]) -> None:
    bits, group = q.get("bits"), q.get("group_size")
    if bits not in BITS:
        raise QwenError(f"{where}: bits {bits!r} is not supported (choose from {', '.join(map(str, BITS))})")
    if group not in GROUP_SIZES:
        raise QwenError(f"{where}: group_size {group!r} is not supported "
                        f"(choose from {', '.join(map(str, GROUP_SIZES))})")


def module_params(quantization: dict[str, Any], path: str) -> QuantParams | None:
    """The parameters of module `path` (e.g. `model.layers.0.mlp.down_proj`): its override, False for a
    module left in float, else the defaults."""
    override = quantization.get(path)
    if override is False:
        return None
    if isinstance(override, dict):
        return QuantParams(override["group_size"], override["bits"])
    return QuantParams(quantization["group_size"], quantization["bits"])


def quantized_shapes(shape: tuple[int, ...], p: QuantParams) -> dict[str, tuple[int, ...]]:
    """A float weight shape [..., out, in] -> the shapes of its stored weight/scales/biases, or raise when
    `in` does not split into whole groups."""
    *lead, n = shape
    if n % p.group_size or (n * p.bits) % 32:
        raise ValueError(f"an input width of {n} does not split into groups of {p.group_size}")
    return {"weight": (*lead, n * p.bits // 32), "scales": (*lead, n // p.group_size),
            "biases": (*lead, n // p.group_size)}


def unpack_codes(weight: np.ndarray, bits: int) -> np.ndarray:
    """uint32-packed codes [..., out, in*b/32] -> uint8 codes [..., out, in]. Bits are read as one
    little-endian stream, so codes of 3, 5 and 6 bits may straddle two words."""
    words = np.ascontiguousarray(weight, dtype="<u4")
    *lead, packed = words.shape
    n = packed * 32 // bits
    stream = np.unpackbits(words.view(np.uint8).reshape(*lead, packed * 4), axis=-1, bitorder="little")
    return (stream.reshape(*lead, n, bits) @ (1 << np.arange(bits, dtype=np.uint16))).astype(np.uint8)


def dequantize(weight: np.ndarray, scales: np.ndarray, biases: np.ndarray, p: QuantParams) -> np.ndarray:
    """uint32-packed codes [..., out, in*b/32] -> float32 [..., out, in] = scales * q + biases per group."""
    return dequantize_codes(unpack_codes(weight, p.bits), scales, biases, p.group_size)


def dequantize_codes(codes: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int) -> np.ndarray:
    """Unpacked codes [..., out, in] -> float32 scales * q + biases per group of `group_size` inputs."""
    *lead, n = codes.shape
    groups = codes.reshape(*lead, n // group_size, group_size).astype(np.float32)
    w = groups * scales.astype(np.float32)[..., None] + biases.astype(np.float32)[..., None]
    return w.reshape(*lead, n)


def describe(quantization: dict[str, Any]) -> str:
    """One line for `info`: the default, then the per-module overrides grouped by what they say."""
    text = f"{quantization['bits']}-bit affine, group size {quantization['group_size']}"
    overrides: dict[str, int] = {}
    for o in quantization.values():
        if isinstance(o, dict):
            key = f"{o['bits']}-bit/{o['group_size']}"
        elif o is False:
            key = "float"
        else:
            continue
        overrides[key] = overrides.get(key, 0) + 1
    if overrides:
        text += "; overrides: " + ", ".join(f"{n} module{'s' * (n > 1)} {k}" for k, n in overrides.items())
    return text


# Files an MLX folder writer leaves behind when it copies a checkpoint's side files (tokenizer, chat template,
# generation defaults): weights, weight indexes and pickles are written anew or never copied.
COPIED_SKIPPED = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf")


def mlx_lm_config_keys(args, config: dict) -> dict:
    """Top-level keys mlx-lm's model classes read but transformers >= 5 nests or renames: without them
    mlx-lm's qwen2 falls back to its default rope_theta (1e6) and its MoE classes fail on num_experts."""
    a, extra = args, {}
    if a.hybrid:
        return _mlx_lm_hybrid_keys(a, config)
    if "rope_theta" not in config:
        extra["rope_theta"] = a.rope_theta
    if "rope_scaling" not in config and a.rope_type != "default":
        extra["rope_scaling"] = a.rope_scaling
    if a.num_experts and "num_experts" not in config:
        extra["num_experts"] = a.num_experts
    return extra


# What mlx-lm's qwen3_next.py / qwen3_5.py read of the text model, written from what this project runs.
_MLX_LM_HYBRID_FIELDS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                         "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "max_position_embeddings",
                         "tie_word_embeddings", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                         "linear_value_head_dim", "linear_conv_kernel_dim")
_MLX_LM_MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                      "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers")
# mlx-lm has no module for the text-only Qwen3.5 types; its qwen3_5 / qwen3_5_moe take a flat text config.
_MLX_LM_MODEL_TYPES = {"qwen3_5_text": "qwen3_5", "qwen3_5_moe_text": "qwen3_5_moe"}


def _mlx_lm_hybrid_keys(a, config: dict) -> dict:
    """The hybrids' text config as mlx-lm reads it, every field it reads written out, so that its defaults (which
    differ: norm_topk_prob False for Qwen3-Next, a rope_theta of 1e5 for Qwen3.5) never fill a gap. Its Qwen3-Next
    requires rope_theta and partial_rotary_factor at the top level (transformers 5 nests them in rope_parameters);
    its Qwen3.5 reads them from rope_parameters only, and tie_word_embeddings from text_config (transformers 5 writes
    the top-level one). Both place full attention by full_attention_interval, not layer_types."""
    nested = isinstance(config.get("text_config"), dict)
    text = dict(config["text_config"] if nested else config)
    # mlx-lm's Qwen3-Next requires the MoE fields even of a dense model; its Qwen3.5 has defaults for them.
    fields = _MLX_LM_HYBRID_FIELDS + (_MLX_LM_MOE_FIELDS if a.num_experts or a.model_type == "qwen3_next" else ())
    text.update({f: getattr(a, f) for f in fields}, attention_bias=bool(a.attention_bias))
    interval = mlx_lm_full_attention_interval(a)
    if interval is not None:
        text["full_attention_interval"] = interval
    if a.model_type == "qwen3_next":
        text.update(rope_theta=a.rope_theta, partial_rotary_factor=a.partial_rotary_factor)
        if a.rope_type != "default":
            text["rope_scaling"] = a.rope_scaling
    else:
        text["rope_parameters"] = {**(a.rope_scaling or {"rope_type": "default"}), **(text.get("rope_parameters") or {}),
                                   "rope_theta": a.rope_theta, "partial_rotary_factor": a.partial_rotary_factor}
    if not nested:
        return {**text, "model_type": _MLX_LM_MODEL_TYPES.get(a.model_type, a.model_type)}
    return {"text_config": text, "tie_word_embeddings": a.tie_word_embeddings}


def mlx_lm_full_attention_interval(args) -> int | None:
    """n when exactly every n-th layer is full attention, the only pattern mlx-lm builds the hybrids in; else None."""
    types = args.layer_types
    if "full_attention" not in types:
        return None
    n = types.index("full_attention") + 1
    return n if types == ["full_attention" if (i + 1) % n == 0 else "linear_attention" for i in range(len(types))] \
        else None
