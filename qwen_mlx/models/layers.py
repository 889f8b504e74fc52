"""MLX's quantized layers, with BLAS for prefill chunks on a CPU.

On Metal and CUDA, `mx.quantized_matmul` and `mx.gather_qmm` are fast kernels. On MLX's CPU backend they are a plain
loop that does not use BLAS, so unpacking the matrix to float32 and multiplying with (Open)BLAS is many times faster
for a prompt chunk, and the unpack, whose cost does not depend on the rows, pays from 4 rows on (the figures:
docs/BENCHMARKS.md, "Quantized MLX layers: prefill through BLAS"; `python -m
benchmarks.speed.bench_quantized_matmul`). Here a float32 layer on a CPU multiplies a prefill chunk (or a batch of
4+ sequences) by its dequantized matrix, one matrix alive at a time, and keeps the quantized kernel for a single
sequence's decode step, where it reads 4-8x fewer bytes than a float matrix. Stacked experts are unpacked whole, so
they switch later, from 6 (token, expert) rows per expert; a matrix of over 64M weights keeps the kernel, so no more
than 256 MB of float32 is ever alive for this. Both forms compute w = scales * q + biases in float32; outputs agree
to float32 rounding. Nothing changes on a GPU, or for half-precision scales (MLX's CPU half matmuls have
no BLAS either).
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx
import mlx.nn as nn

DEQUANTIZE_FROM_ROWS = 4  # input rows from which dequantize + BLAS beats the CPU quantized matmul (1.6x at 4)
DEQUANTIZE_FROM_ROWS_PER_EXPERT = 6  # the same for stacked experts, per expert: all X are unpacked (~1.0x at 4.3)
# 3-, 5- and 6-bit codes straddle uint32 words and take mx.dequantize (~33 ns a weight at 6 bits, against ~2.5 for
# `_unpack`), so their thresholds are 8x higher (6 bits at 64 rows: 2.4x faster than the kernel).
FAST_UNPACK_BITS = (2, 4, 8)
SLOW_UNPACK_ROWS = 8
DEQUANTIZE_UP_TO = 1 << 26  # weights of one matrix: at most 256 MB of float32 alive (a big lm_head keeps the kernel)


def _dequantize_pays(rows: int, from_rows: int, layer: nn.Module) -> bool:
    scales = layer["scales"]
    if layer.bits not in FAST_UNPACK_BITS:
        from_rows *= SLOW_UNPACK_ROWS
    return (rows >= from_rows and scales.dtype == mx.float32 and scales.size * layer.group_size <= DEQUANTIZE_UP_TO
            and mx.default_device() == mx.cpu)


def _float_weight(layer: nn.Module) -> mx.array:
    return dequantize(layer["weight"], layer["scales"], layer.get("biases"), layer.group_size, layer.bits, layer.mode)


def dequantize(w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int,
               mode: str = "affine") -> mx.array:
    """mx.dequantize, 3x faster on a CPU for 2-, 4- and 8-bit affine codes (a compiled unpack: ~2.5 ns a weight
    against ~7.5 ns, bit for bit the same result)."""
    if mode != "affine" or biases is None or bits not in FAST_UNPACK_BITS:
        return mx.dequantize(w, scales, biases, group_size, bits, mode=mode)
    return _unpack(bits, group_size)(w, scales, biases)


@cache
def _unpack(bits: int, group_size: int):
    def unpack(w: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
        # w ... out in*bits/32 (codes packed low bits first) -> ... out in
        codes = (w[..., None] >> mx.arange(0, 32, bits, dtype=mx.uint32)) & ((1 << bits) - 1)
        groups = codes.astype(scales.dtype).reshape(*scales.shape, group_size)         # ... out in/G G
        return (groups * scales[..., None] + biases[..., None]).reshape(*w.shape[:-1], -1)
    return mx.compile(unpack)  # one fused loop; MLX runs the ops as they are where no C++ compiler is found


class QuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear, with a prefill chunk on a CPU multiplied by the dequantized matrix."""

    def __call__(self, x: mx.array) -> mx.array:
        if not _dequantize_pays(x.size // x.shape[-1], DEQUANTIZE_FROM_ROWS, self):
            return super().__call__(x)
        y = x @ _float_weight(self).T                                                   # ... in -> ... out
        return y + self["bias"] if "bias" in self else y


class Linear(nn.Linear):
    """nn.Linear whose quantized form (`nn.quantize`, a stored quantized folder) is the QuantizedLinear above."""

    def to_quantized(self, group_size: int | None = None, bits: int | None = None, mode: str = "affine",
                     quantize_input: bool = False) -> nn.Module:
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedLinear.from_linear(self, group_size, bits, mode)


class QuantizedSwitchLinear(nn.Module):
    """Stacked experts X out in, affine-quantized (what `--quantize` makes of model.SwitchLinear), multiplied by
    `mx.gather_qmm`; on a CPU, a chunk with enough (token, expert) rows per expert dequantizes the stack and
    takes `mx.gather_mm` instead."""

    def __init__(self, weight: mx.array, group_size: int, bits: int, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight, self.scales, *biases = mx.quantize(weight, group_size, bits, mode=mode)
        self.biases = biases[0] if biases else None
        self.freeze()

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        experts = self["weight"].shape[0]
        if _dequantize_pays(indices.size, DEQUANTIZE_FROM_ROWS_PER_EXPERT * experts, self):
            w = _float_weight(self)                                                     # X out in
            return mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)
        return mx.gather_qmm(x, self["weight"], self["scales"], self.get("biases"), rhs_indices=indices,
                             transpose=True, group_size=self.group_size, bits=self.bits, mode=self.mode,
                             sorted_indices=sorted_indices)
