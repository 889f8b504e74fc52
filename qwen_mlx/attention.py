"""Scaled dot-product attention, with a faster softmax for long prefill chunks on a CPU.

On Metal and CUDA `mx.fast.scaled_dot_product_attention` is a fused kernel. On MLX's CPU backend it falls back
to matmul, softmax, matmul, and the softmax's `exp` runs one scalar at a time on x86 (MLX vectorizes it only
with NEON): for a 512-token chunk over 8K cached positions (Qwen2.5-0.5B, 14 heads) the softmax takes 1.25 s
of the layer's 1.5 s attention. numpy's `exp` is SIMD, ~5x faster. So for float32 chunks of many scores on a
CPU, `attention` computes the scores with MLX, then each kv head's softmax and probabilities-times-values in
numpy, in blocks of rows on two threads (numpy releases the GIL): 2.1x faster attention on that chunk, and a
16K-token prompt prefills 1.9x faster (docs/BENCHMARKS.md). It is the same arithmetic (max-subtracted
float32 exp, sum, then weights times values); results equal the fused kernel's to float32 rounding. The
extra memory is one block of probabilities per thread, not a second score matrix.

Shapes: B batch, H heads, K kv heads, G = H / K, L new tokens, T cached + new tokens, D head_dim.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np

NUMPY_SOFTMAX_FROM = 1 << 16  # L * T from which the numpy softmax pays for its synchronisation (a CPU only)
ROW_BLOCK = 256  # rows of probabilities per numpy block: 256 x 16K positions is 16 MB
_pool = ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1), thread_name_prefix="qwen-mlx-softmax")


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
