"""Sampling on the MLX device, a batch of rows at once, so logits never leave a GPU.

The rules are qwen_mlx.sampling's (HF's processors, in HF's order: repetition penalty, temperature,
top-k, top-p, min-p; temperature 0 is greedy), each row with its own parameters. The one random number
per step comes from the request's seeded numpy generator (`Draw.u`), so a seed replays; the draw is the
inverse CDF over the tokens left in play, in descending score when a rule needed them sorted.
tests/test_engine.py checks, on the CPU, the same tokens in play with the same probabilities as the
numpy sampler and the same greedy tokens through the engine.

Where the rules need an order, only the candidates are sorted: the top max(k) scores when every sampled
row has a top-k (found with argpartition), else the whole vocabulary. Tokens tied with the k-th score
beyond the candidates (HF keeps every tie) are left out: with float logits they do not occur in practice.
Shapes: B rows, V vocabulary, C candidates.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import mlx.core as mx
import numpy as np

from .host import Draw, SamplingParams


def seen_mask(histories: Sequence[Iterable[int]], vocab: int) -> mx.array:
    """B V bool: the ids each row has seen (ids past the output vocabulary are ignored, as HF does)."""
    mask = np.zeros((len(histories), vocab), dtype=bool)
    for b, history in enumerate(histories):
        ids = np.fromiter(history, dtype=np.int64)
        mask[b, ids[ids < vocab]] = True
    return mx.array(mask)


def sample(logits: mx.array, draws: Sequence[Draw], seen: mx.array | None) -> mx.array:
    """logits B V float32 -> each row's next token, B int32 (lazy: nothing is evaluated here)."""
    params = [d.params for d in draws]
    x = _penalized(logits, params, seen)
    greedy = mx.argmax(x, axis=-1)
    if all(p.greedy for p in params):
        return greedy.astype(mx.int32)
    ids, w = _distribution(x, params)
    cdf = mx.cumsum(w, axis=-1)
    u = mx.array([d.u for d in draws], dtype=mx.float32)[:, None]
    i = mx.sum(cdf <= u * cdf[:, -1:], axis=-1)  # numpy's searchsorted(cdf, u * total, side="right")
    # u * total may round up to total itself: the last token with any weight is the one then
    last = w.shape[-1] - 1 - mx.argmax((w > 0)[:, ::-1], axis=-1)
    i = mx.minimum(i, last)
    token = i if ids is None else mx.take_along_axis(ids, i[:, None], axis=-1)[:, 0]
    return mx.where(mx.array([p.greedy for p in params]), greedy, token).astype(mx.int32)


def distribution(logits: mx.array, draws: Sequence[Draw], seen: mx.array | None,
                 ) -> tuple[mx.array | None, mx.array]:
    """What `sample` draws from for rows that are not greedy: (ids B C, or None for the whole vocabulary
    in order) and their weights B C, probabilities up to a factor per row, 0 for tokens out of play."""
    params = [d.params for d in draws]
    return _distribution(_penalized(logits, params, seen), params)


def _penalized(x: mx.array, params: list[SamplingParams], seen: mx.array | None) -> mx.array:
    if seen is None or all(p.repetition_penalty == 1.0 for p in params):
        return x
    r = mx.array([p.repetition_penalty for p in params], dtype=mx.float32)[:, None]
    # CTRL's rule as HF applies it: shrink positive scores, push negative ones further down
    return mx.where(seen, mx.where(x < 0, x * r, x / r), x)


def _distribution(x: mx.array, params: list[SamplingParams]) -> tuple[mx.array | None, mx.array]:
    V = x.shape[-1]
    sampled = [not p.greedy for p in params]
    x = x / mx.array([p.temperature if s else 1.0 for p, s in zip(params, sampled)], dtype=mx.float32)[:, None]
    k = [p.top_k if s and 0 < p.top_k < V else 0 for p, s in zip(params, sampled)]
    top_p = [p.top_p if s else 1.0 for p, s in zip(params, sampled)]
    min_p = [p.min_p if s else 0.0 for p, s in zip(params, sampled)]
    ids = None
    if any(k) and all(kb > 0 for kb, s in zip(k, sampled) if s):  # the candidates: each row's top max(k)
        K = max(k)
        ids = mx.argpartition(-x, K - 1, axis=-1)[:, :K]
        x = mx.take_along_axis(x, ids, axis=-1)
    if ids is not None or any(p < 1.0 for p in top_p):  # top-k and top-p need the candidates in order
        order = mx.argsort(-x, axis=-1)
        ids = order if ids is None else mx.take_along_axis(ids, order, axis=-1)
        x = mx.take_along_axis(x, order, axis=-1)
    e = mx.exp(x - mx.max(x, axis=-1, keepdims=True))  # the top token always stays in play
    if any(k):  # every score >= the k-th largest stays (HF keeps the ties)
        kth = mx.take_along_axis(x, mx.array([max(kb, 1) - 1 for kb in k])[:, None], axis=-1)
        e = mx.where((mx.array(k)[:, None] == 0) | (x >= kth), e, 0.0)
    if any(p < 1.0 for p in top_p):  # the smallest prefix whose mass reaches top_p, crossing token included
        cumulative = mx.cumsum(e, axis=-1)
        above = cumulative - e  # the mass strictly above each token
        tp = mx.array(top_p, dtype=mx.float32)[:, None]
        e = mx.where((tp >= 1.0) | (above < tp * cumulative[:, -1:]), e, 0.0)
    if any(min_p):  # p < min_p * p_max is cut; e is p / p_max
        e = mx.where(e >= mx.array(min_p, dtype=mx.float32)[:, None], e, 0.0)
    return ids, e
