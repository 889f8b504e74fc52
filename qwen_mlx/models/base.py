"""Attention, in one place: the cache-aware entry point every model calls, and its kernels.

`scaled_dot_product_attention(q, k, v, cache, scale, mask)` is what a model's attention layer calls after
`cache.update`: it picks the kernel for the cache kind (qwen_mlx/models/cache.py), so the model never asks
which cache it holds (the idea of mlx-lm's models/base.py). A float cache goes to `attention`; a quantized
cache's (codes, scales, biases) to `quantized_attention`, which reads the codes in place with
`mx.quantized_matmul`, as mlx-lm does, each kv head's group of query heads folded into the rows of one matmul.
On MLX's CPU backend a chunk of several new tokens instead dequantizes the cache it attends to
(layers.dequantize, bit for bit mx.dequantize) and runs the float `attention`: the CPU quantized matmul has no
fast path for many rows (docs/BENCHMARKS.md, "Quantized KV cache"); the values are exactly those the
quantized matmul reads. `attention_weights` writes the probabilities out for attention maps.

The float kernel:

On Metal and CUDA `mx.fast.scaled_dot_product_attention` is a fused kernel. On MLX's CPU backend it falls back to
matmul, softmax, matmul, and the softmax's `exp` runs one scalar at a time on x86 (MLX vectorizes it only with
NEON), so for a long prefill chunk the softmax is most of the layer's attention; numpy's `exp` is SIMD. So for
float32 chunks of many scores on a CPU, `attention` computes the scores with MLX, then each kv head's softmax and
probabilities-times-values in numpy, in blocks of rows on two threads (numpy releases the GIL) (the figures:
docs/BENCHMARKS.md, "CPU attention" and "Long prompts beside mlx-lm"). It is the same arithmetic (max-subtracted
float32 exp, sum, then weights times values); results equal the fused kernel's to float32 rounding. The extra memory
is one block of probabilities per thread, not a second score matrix.

Shapes: B batch, H heads, K kv heads, G = H / K, L new tokens, T cached + new tokens, D head_dim.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np

from .cache import Cache, Quantized, QuantizedKVCache
from .layers import dequantize

NUMPY_SOFTMAX_FROM = 1 << 16  # L * T from which the numpy softmax pays for its synchronisation (a CPU only)
ROW_BLOCK = 256  # rows of probabilities per numpy block: 256 x 16K positions is 16 MB
_pool = ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1), thread_name_prefix="qwen-mlx-softmax")


def scaled_dot_product_attention(q: mx.array, k, v, cache: Cache, scale: float,
                                 mask: mx.array | str | None) -> mx.array:
    """softmax(q k^T * scale + mask) v over what `cache.update` returned: q B H L D -> B H L D."""
    if isinstance(cache, QuantizedKVCache):  # k and v are (codes, scales, biases)
        return quantized_attention(q, k, v, scale, mask, cache.group_size, cache.bits)
    return attention(q, k, v, scale, mask)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str | None) -> mx.array:
    """softmax(q k^T * scale + mask) v: q B H L D, k and v B K T D -> B H L D, each group of H/K query heads
    attending to its kv head. `mask` is "causal" (lower-right aligned), boolean (True = attend) or additive,
    broadcastable to B 1 L T or B H L T."""
    L, T = q.shape[2], k.shape[2]
    if L > 1 and L * T >= NUMPY_SOFTMAX_FROM and q.dtype == mx.float32 and mx.default_device() == mx.cpu:
        return _numpy_softmax_attention(q, k, v, scale, mask)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def masked_scores(s: mx.array, mask: mx.array | str | None) -> mx.array:
    """Scores s B K G L T with `mask` applied; a masked score becomes the dtype's lowest value, not -inf, so a
    row whose keys are all masked stays finite."""
    B, K, G, L, T = s.shape
    if isinstance(mask, str):  # "causal", lower-right aligned as in the fused kernel
        mask = mx.arange(T - L, T)[:, None] >= mx.arange(T)[None]                       # L T
    if mask is None:
        return s
    if mask.ndim == 4:  # B 1 L T or B H L T -> broadcastable against B K G L T
        mask = mask[:, :, None] if mask.shape[1] == 1 else mask.reshape(mask.shape[0], K, G, L, T)
    if mask.dtype == mx.bool_:
        return mx.where(mask, s, mx.finfo(s.dtype).min)
    return s + mask.astype(s.dtype)



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


def attention_weights(q: mx.array, k: mx.array, scale: float, mask: mx.array | str | None) -> mx.array:
    """softmax(q k^T * scale + mask) in float32, written out: q B H L D, k B K T D -> B H L T, each group of
    H/K query heads against its kv head (what the fused kernel computes without returning it). A float64
    model's scores are computed in float64 (qwen_mlx/attention_maps.py: float64_model)."""
    B, H, L, D = q.shape
    K, T = k.shape[1], k.shape[2]
    dtype = mx.float64 if q.dtype == mx.float64 else mx.float32  # float64: attention_maps' exact path
    q = q.astype(dtype).reshape(B, K, H // K, L, D)                                  # B K G L D
    s = masked_scores(q @ k.astype(dtype)[:, :, None].swapaxes(-1, -2) * scale, mask)  # B K G L T
    return mx.softmax(s.reshape(B, H, L, T), axis=-1)


def _numpy_softmax_attention(q: mx.array, k: mx.array, v: mx.array, scale: float,
                             mask: mx.array | str | None) -> mx.array:
    B, H, L, D = q.shape
    K, T = k.shape[1], k.shape[2]
    G = H // K
    rows = (q * scale).reshape(B, K, G * L, D)                                          # B K GL D
    s = masked_scores((rows @ k.swapaxes(-1, -2)).reshape(B, K, G, L, T), mask)        # B K G L T
    s, v = mx.contiguous(s), mx.contiguous(v)
    mx.eval(s, v)
    scores = np.asarray(memoryview(s)).reshape(B * K, G * L, T)  # MLX's buffer, read in place
    values = np.asarray(memoryview(v)).reshape(B * K, T, D)
    out = np.empty((B * K, G * L, D), np.float32)

    def block(job: tuple[int, int]) -> None:
        head, lo = job
        x = scores[head, lo:lo + ROW_BLOCK]
        p = x - x.max(axis=-1, keepdims=True)
        np.exp(p, out=p)
        np.matmul(p, values[head], out=out[head, lo:lo + ROW_BLOCK])
        out[head, lo:lo + ROW_BLOCK] /= p.sum(axis=-1, keepdims=True)

    list(_pool.map(block, [(h, lo) for h in range(B * K) for lo in range(0, G * L, ROW_BLOCK)]))
    return mx.array(out).reshape(B, H, L, D)
