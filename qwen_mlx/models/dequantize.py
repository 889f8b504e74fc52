"""Weights stored quantized (mlx-lm folders, repacked AWQ/GPTQ, a GGUF's kept blocks) run as float on a CPU.

MLX's CPU `quantized_matmul` is a plain loop: one decode step of a 4864 x 896 matrix takes 6.0 ms quantized
against 2.7 ms as float32 through BLAS (docs/BENCHMARKS.md, "Quantized MLX layers"), and the real checkpoint's
GGUF dequantized prefilled 4.4x and decoded 2.8x as fast as its blocks kept on a quiet machine ("What runs where on
a CPU"; on a machine busy enough that OpenBLAS's threads fight other jobs, decode is within the noise). So on a CPU
the stored layers are dequantized once at load, exactly (w = scales * q + biases in float32, the numbers the
kernels use), at the cost of float memory, which the banner states; `--keep-quantized` keeps the kernels (less memory).
Metal and CUDA keep them always: there the quantized kernels are the fast path. A model whose float weights
would take more than half of this machine's memory keeps them too, and says so.
"""

from __future__ import annotations

import math
import os

import mlx.core as mx

from ..checkpoint import Checkpoint
from ..formats.affine import module_params
from .layers import dequantize

FLOAT_SHARE_OF_MEMORY = 0.5  # dequantize only while the float weights fit in this share of physical memory
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def dequantize_stored(weights: dict[str, mx.array], quantization: dict) -> dict[str, mx.array]:
    """The checkpoint's tensors (its own key names) with every stored-quantized module's `weight`, `scales`
    and `biases` replaced by its float32 `weight` (lazy: evaluated as the loader reads each layer)."""
    out = dict(weights)
    for scales_key in [k for k in weights if k.endswith(".scales")]:
        module = scales_key.removesuffix(".scales")
        p = module_params(quantization, module)
        biases = out.pop(module + ".biases", None)
        out[module + ".weight"] = dequantize(out[module + ".weight"], out.pop(scales_key).astype(mx.float32),
                                             None if biases is None else biases.astype(mx.float32),
                                             p.group_size, p.bits)
    return out


def weight_bytes(ckpt: Checkpoint, dtype: str) -> tuple[int, int]:
    """(bytes of the weights as stored, float tensors at `dtype`; bytes once every module is `dtype`)."""
    stored = as_float = 0
    itemsize = ITEMSIZE.get(dtype, 4)
    for key, info in ckpt.tensors.items():
        count = math.prod(info.shape)
        module = key.rsplit(".", 1)[0]
        packed = ckpt.tensors.get(module + ".weight")
        if packed is None or packed.dtype != "U32":  # a float tensor
            stored += count * itemsize
            as_float += count * itemsize
        elif key.endswith(".weight"):  # uint32 codes
            stored += count * 4
        else:  # scales and biases; a scale per group of weights
            stored += count * itemsize
            if key.endswith(".scales"):
                p = module_params(ckpt.quantization or {}, module)
                as_float += count * (p.group_size if p else 1) * itemsize
    return stored, as_float


def dequantize_at_load(ckpt: Checkpoint, dtype: str, on_cpu: bool, keep: bool,
                       memory_bytes: int | None = None) -> tuple[bool, str]:
    """Whether to load `ckpt`'s stored quantized layers as float, and the note for the banner (empty for a
    float checkpoint). `memory_bytes`: this machine's physical memory (read here when None)."""
    if ckpt.quantization is None:
        return False, ""
    bits = ckpt.quantization["bits"]
    if not on_cpu:
        return False, f"{bits}-bit as stored"
    stored, as_float = weight_bytes(ckpt, dtype)
    if keep:
        return False, f"{bits}-bit as stored (--keep-quantized: MLX's CPU kernels, slower than float here)"
    memory = _physical_memory() if memory_bytes is None else memory_bytes
    if memory and as_float > FLOAT_SHARE_OF_MEMORY * memory:
        return False, (f"{bits}-bit as stored: as {dtype} its weights ({as_float / 1e9:.1f} GB) would take over "
                       f"half of this machine's memory; MLX's CPU quantized kernels are slower than float")
    return True, (f"dequantized from {bits}-bit at load, +{(as_float - stored) / 1e9:.1f} GB, faster on a CPU "
                  "(--keep-quantized keeps them)")


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
