"""Quantized KV cache (`--kv-bits 4|8`): keys and values stored as affine codes, attended without a float copy.

Each position's key and value vectors are quantized on entry with `mx.quantize` (groups of `group_size`
features along head_dim, a scale and a bias per group, in the activations' dtype), the scheme and default
group size of mlx-lm's QuantizedKVCache. A cache of T positions then holds, per layer and kv head,
T * D * bits / 8 bytes of codes plus 2 * T * D / group_size scales and biases, instead of T * D floats.

Attention (`quantized_attention`) reads the codes in place with `mx.quantized_matmul`, as mlx-lm does, each
kv head's group of query heads folded into the rows of one matmul (decoding reads the cache once per kv
head, not once per query head). On MLX's CPU backend a chunk of several new tokens (prefill) instead
dequantizes the cache it attends to (layers.dequantize, bit for bit mx.dequantize) and runs the float
`attention` (qwen_mlx/attention.py): the CPU quantized matmul has no fast path for many rows (~5x slower than
float32 BLAS at 512 rows, docs/BENCHMARKS.md). The dequantized values are exactly those the quantized matmul
reads, so both paths compute the same attention up to summation order.

Shapes: B batch, H heads, K kv heads, G = H / K, L new tokens, T cached + new tokens, D head_dim,
P packed uint32 words per vector (D * bits / 32), S groups per vector (D / group_size).
"""

from __future__ import annotations

import mlx.core as mx

from ..attention import attention, masked_scores
from ..errors import QwenError
from .layers import dequantize

KV_BITS = (4, 8)
KV_GROUP_SIZE = 64  # mlx-lm's default for kv_group_size
KV_GROUP_SIZES = (32, 64, 128)  # what mx.quantize accepts

Quantized = tuple[mx.array, mx.array, mx.array]  # codes B K T P (uint32), scales B K T S, biases B K T S


def check_kv_bits(bits: int | None, group_size: int, head_dim: int) -> None:
    """Refuse what mx.quantize cannot store: other bit widths, group sizes, or a head_dim not split in groups."""
    if bits is None:
        return
    if bits not in KV_BITS:
        raise QwenError(f"--kv-bits must be 4 or 8, got {bits}")
    if group_size not in KV_GROUP_SIZES:
        raise QwenError(f"--kv-group-size must be one of {', '.join(map(str, KV_GROUP_SIZES))}, got {group_size}")
    if head_dim % group_size:
        raise QwenError(f"--kv-group-size {group_size} does not divide this model's head_dim {head_dim}; "
                        f"pick one of {', '.join(str(g) for g in KV_GROUP_SIZES if head_dim % g == 0) or 'none'}")


class QuantizedKVCache:
    """KVCache's interface (`update`, `offset`, O(1) trim by lowering `offset`) over quantized buffers that
    grow in steps; `update` returns the valid prefix as (codes, scales, biases) triples."""

    step = 256

    def __init__(self, bits: int, group_size: int = KV_GROUP_SIZE) -> None:
        self.bits, self.group_size = bits, group_size
        self.keys: list[mx.array] | None = None  # [codes, scales, biases]
        self.values: list[mx.array] | None = None
        self.offset = 0

    def quantize(self, x: mx.array) -> Quantized:
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def update(self, k: mx.array, v: mx.array) -> tuple[Quantized, Quantized]:
        qk, qv = self.quantize(k), self.quantize(v)
        end = self.offset + k.shape[2]
        if self.keys is None or end > self.keys[0].shape[2]:
            # As KVCache: a new buffer sized from `end`, only the valid prefix copied.
            capacity = ((end + self.step - 1) // self.step) * self.step
            self.keys = self._grown(self.keys, qk, capacity)
            self.values = self._grown(self.values, qv, capacity)
        for buf, new in zip(self.keys + self.values, qk + qv):
            buf[..., self.offset:end, :] = new
        self.offset = end
        return tuple(x[..., :end, :] for x in self.keys), tuple(x[..., :end, :] for x in self.values)

    def _grown(self, old: list[mx.array] | None, like: Quantized, capacity: int) -> list[mx.array]:
        new = [mx.zeros((*x.shape[:2], capacity, x.shape[3]), x.dtype) for x in like]
        if old is not None and self.offset:
            for n, o in zip(new, old):
                n[..., :self.offset, :] = o[..., :self.offset, :]
        return new

    def fill(self, keys: mx.array, values: mx.array) -> None:
        """Replace the contents with float keys and values B K T D (a saved prompt cache), quantized."""
        self.keys, self.values = list(self.quantize(keys)), list(self.quantize(values))
        self.offset = keys.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes of the valid positions (codes, scales and biases of keys and values)."""
        if self.keys is None:
            return 0
        return sum(x[..., :self.offset, :].nbytes for x in self.keys + self.values)

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [*self.keys, *self.values]


def quantized_attention(q: mx.array, k: Quantized, v: Quantized, scale: float, mask: mx.array | str | None,
                        group_size: int, bits: int) -> mx.array:
    """softmax(q k^T * scale + mask) v with k and v quantized: q B H L D -> B H L D."""
    B, H, L, D = q.shape
    K, T = k[0].shape[1], k[0].shape[2]
    if L > 1 and mx.default_device() == mx.cpu:  # measured: from 2-4 new tokens on, dequantizing wins on a CPU
        keys = dequantize(*k, group_size, bits)                                        # B K T D
        values = dequantize(*v, group_size, bits)
        return attention(q, keys, values, scale, mask)
    G = H // K
    rows = (q * scale).reshape(B, K, G * L, D)                                          # B K GL D
    s = mx.quantized_matmul(rows, *k, transpose=True, group_size=group_size, bits=bits)  # B K GL T
    s = masked_scores(s.reshape(B, K, G, L, T), mask)                                   # B K G L T
    p = mx.softmax(s, axis=-1, precise=True).reshape(B, K, G * L, T)
    o = mx.quantized_matmul(p, *v, transpose=False, group_size=group_size, bits=bits)   # B K GL D
    return o.reshape(B, H, L, -1)
