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
    for path, o in quantization.items():
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
    if "rope_theta" not in config:
        extra["rope_theta"] = a.rope_theta
    if "rope_scaling" not in config and a.rope_type != "default":
        extra["rope_scaling"] = a.rope_scaling
    if a.num_experts and "num_experts" not in config:
        extra["num_experts"] = a.num_experts
    return extra
