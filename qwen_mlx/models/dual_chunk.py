"""Dual Chunk Attention in MLX (the definition: qwen_mlx/dual_chunk.py; the torch twin:
export/models/dual_chunk.py).

Keys enter the cache rotated at their position mod chunk_len (and scaled), so the cache holds what every
later query needs. The new queries are cut where chunks begin; for the queries of one chunk the cached keys
are three contiguous spans (inter-chunk [0, s - c), successive [s - c, s), intra-chunk [s, ...) for the chunk
start s), each attended with its own rotation of the queries, in key blocks of bounded size, and the partial
results are merged exactly by their log-sum-exp: the attention scores of a long context are never held
whole. When a chunk's scores fit SCORES_BUDGET (decoding, shorter contexts), one softmax over the three
spans' concatenated scores makes the same merge in one step, with fewer operations. Shapes: B batch, H heads, K kv heads, G = H / K, L new tokens, T cached + new, D head_dim.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import numpy as np

from ..dual_chunk import DualChunk
from ..errors import QwenError

SCORES_BUDGET = 1 << 24  # float32 scores held at once (64 MB), over batch, heads, queries and keys
KEY_BLOCK_MIN = 4096  # the fewest keys per block when the budget is split (long prefill chunks)


def rotate(rope, x: mx.array, positions: np.ndarray) -> mx.array:
    """x B H L D rotated token by token at `positions` (L ints): the fused kernel of the plain path, one
    token per row of a vector offset (mx.fast.rope offsets each leading row by its own position)."""
    B, H, L, D = x.shape
    if rope.attention_factor != 1.0:  # yarn scales the rotated vector, as the plain path does
        x = x * rope.attention_factor
    rows = x.transpose(2, 0, 1, 3).reshape(L, B * H, 1, D)                          # L BH 1 D
    rows = mx.fast.rope(rows, D, traditional=False, base=None, scale=1.0,
                        offset=mx.array(positions, dtype=mx.int32), freqs=rope._freqs)
    return rows.reshape(L, B, H, D).transpose(1, 2, 0, 3)                             # B H L D


def dual_chunk_attention(dc: DualChunk, rope, q: mx.array, k: mx.array, v: mx.array, cache, scale: float,
                         on_weights: Callable[[mx.array], None] | None = None) -> mx.array:
    """q B H L D, k/v B K L D (projected, not yet rotated) of the L tokens after `cache.offset` -> B H L D.
    Appends the keys (rotated at position mod chunk_len, scaled) and values to `cache`."""
    if not isinstance(cache.offset, int):
        raise QwenError("Dual Chunk Attention runs one sequence at a time on MLX (no per-row offsets)")
    B, H, L, D = q.shape
    P, c = cache.offset, dc.chunk_len
    pos = np.arange(P, P + L)
    m = mx.array(dc.scaling(pos))[:, None]                                            # L 1
    k = rotate(rope, k * m.astype(k.dtype), pos % c)
    keys, values = cache.update(k, v)                                                 # B K T D
    q = q * m.astype(q.dtype)
    q_intra = rotate(rope, q, pos % c)
    q_succ = rotate(rope, q, np.minimum(pos % c + c, dc.chunk_size))
    q_inter = rotate(rope, q, np.full(L, dc.inter_position))
    outs, weights = [], []
    for chunk in range(P // c, (P + L - 1) // c + 1):
        a, b = max(P, chunk * c), min(P + L, (chunk + 1) * c)   # this chunk's new queries, absolute positions
        rows = slice(a - P, b - P)
        s = chunk * c
        spans = [(q_inter[:, :, rows], 0, s - c, False), (q_succ[:, :, rows], s - c, s, False),
                 (q_intra[:, :, rows], s, b, True)]
        spans = [(qs, max(lo, 0), hi, np.arange(a, b) if causal else None) for qs, lo, hi, causal in spans
                 if hi > max(lo, 0)]
        l = b - a
        if B * H * l * b <= SCORES_BUDGET:
            # All of this chunk's scores fit: one softmax over the three disjoint spans' scores, which is
            # their log-sum-exp merge in a single step (fewer operations: what decoding takes).
            scores = mx.concatenate([_scores(qs, keys, lo, hi, scale, qp) for qs, lo, hi, qp in spans], axis=-1)
            w = mx.softmax(scores, axis=-1)                                           # B K Gl b
            o = w @ values[:, :, :b].astype(mx.float32)                               # B K Gl D
        else:
            parts = [part for qs, lo, hi, qp in spans for part in _attend(qs, keys, values, lo, hi, scale, qp)]
            o, lse = _merge(parts)
            if on_weights is not None:
                w = mx.concatenate([mx.exp(part[2] - lse[..., None]) for part in parts], axis=-1)
        o = o.reshape(B, H, l, D)
        outs.append(o.astype(q.dtype))
        if on_weights is not None:  # the merged probabilities B H l T, keys past b masked (zero)
            weights.append(mx.pad(w.reshape(B, H, l, b), [(0, 0)] * 3 + [(0, keys.shape[2] - b)]))
    if on_weights is not None:
        on_weights(mx.concatenate(weights, axis=2))
    return mx.concatenate(outs, axis=2)                                               # B H L D


def _scores(q: mx.array, keys: mx.array, lo: int, hi: int, scale: float,
            query_positions: np.ndarray | None) -> mx.array:
    """q B H l D against keys [lo, hi) -> float32 scores B K Gl t: the G query heads of each kv head are
    rows of one matmul (no tiling of the cache). Causal (key j <= query i, else -inf) when
    `query_positions` are given."""
    B, H, l, D = q.shape
    K = keys.shape[1]
    qg = q.astype(mx.float32).reshape(B, K, H // K * l, D) * scale                  # B K Gl D
    s = qg @ keys[:, :, lo:hi].astype(mx.float32).swapaxes(-1, -2)                   # B K Gl t
    if query_positions is not None:
        rows = np.tile(query_positions, H // K)                                      # Gl
        s = mx.where(mx.arange(lo, hi)[None] <= mx.array(rows)[:, None], s, -mx.inf)
    return s


def _attend(q: mx.array, keys: mx.array, values: mx.array, lo: int, hi: int, scale: float,
            query_positions: np.ndarray | None) -> list[tuple[mx.array, mx.array, mx.array]]:
    """softmax attention of q B H l D over keys [lo, hi), in key blocks within SCORES_BUDGET: per block
    (o B K Gl D float32, its log-sum-exp B K Gl, its scores B K Gl t)."""
    B, H, l, D = q.shape
    block = max(KEY_BLOCK_MIN, SCORES_BUDGET // (B * H * l))
    out = []
    for start in range(lo, hi, block):
        end = min(hi, start + block)
        s = _scores(q, keys, start, end, scale, query_positions)                     # B K Gl t
        top = mx.max(s, axis=-1, keepdims=True)                                      # B K Gl 1
        top = mx.where(top == -mx.inf, 0.0, top)  # a row with every key of this block masked: weight 0
        p = mx.exp(s - top)
        total = p.sum(axis=-1, keepdims=True)
        o = p @ values[:, :, start:end].astype(mx.float32)                            # B K Gl D
        o = o / mx.maximum(total, 1.0)  # total >= 1 (the max scores exp(0)) unless every key is masked
        out.append((o, (top + mx.log(total))[..., 0], s))  # log 0 = -inf: the block adds nothing
    return out


def _merge(parts: list[tuple[mx.array, mx.array, mx.array]]) -> tuple[mx.array, mx.array]:
    """Partial attentions over disjoint key sets -> their exact union: weights exp(lse_i - lse)."""
    lse = parts[0][1]
    for _, l, _ in parts[1:]:
        lse = mx.logaddexp(lse, l)
    o = sum(mx.exp(l - lse)[..., None] * o for o, l, _ in parts)
    return o, lse
