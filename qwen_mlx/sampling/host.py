"""Sampling rules, shared by every backend: logits arrive as a numpy float32 vector.

The order matches HF transformers' `generate`: repetition penalty, then temperature, top-k, top-p and
min-p. A temperature of 0 is greedy decoding. Pure numpy. Each filter first narrows the vocabulary to
candidates that provably hold every token HF would keep, then decides on those alone with HF's rules,
so nothing sorts the vocabulary (unless top_p is within rounding of 1) and, with top-k, nothing but the
candidates is exponentiated. The decisions are HF's rules in exact arithmetic (tests/test_sampling.py).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, fields, replace
from typing import Any, Iterable

import numpy as np

from ..errors import QwenError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise QwenError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise QwenError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise QwenError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise QwenError(f"--min-p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise QwenError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")

    @classmethod
    def from_generation_config(cls, generation_config: dict[str, Any], **overrides: Any) -> "SamplingParams":
        """The checkpoint's defaults (generation_config.json), each overridden by a flag that is not None."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in generation_config.items() if k in names and v is not None}
        if generation_config.get("do_sample") is False:
            values["temperature"] = 0.0  # the checkpoint asks for greedy decoding
        params = cls(**values)
        return replace(params, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Picks the next token from logits; holds the random generator so a seed replays exactly."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: Iterable[int] = ()) -> int:
        p = self.params
        if p.greedy:
            logits = np.asarray(logits, dtype=np.float32).reshape(-1)
            seen = _seen(history, logits.size) if p.repetition_penalty != 1.0 else _NO_IDS
            if seen.size:
                logits = logits.copy()
                logits[seen] = _penalize(logits[seen], p.repetition_penalty)
            return int(np.argmax(logits))
        ids, weights = self.distribution(logits, history)
        i = _draw(weights, self.rng)
        return i if ids is None else int(ids[i])

    def distribution(self, logits: np.ndarray, history: Iterable[int] = (),
                     ) -> tuple[np.ndarray | None, np.ndarray]:
        """What a sampling step draws from: the ids HF's processors leave in play and their weights
        (probabilities up to a common factor); ids is None when every token stays in play."""
        p = self.params
        if p.greedy:
            raise QwenError("greedy decoding (temperature 0) has no distribution to sample")
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)
        seen = _seen(history, logits.size) if p.repetition_penalty != 1.0 else _NO_IDS
        temperature = np.float32(p.temperature)
        # HF divides every score; that division is also the copy the penalty may write into
        x = logits / temperature if temperature != 1 or seen.size else logits
        if seen.size:
            x[seen] = _penalize(logits[seen], p.repetition_penalty) / temperature
        top = x.max()
        if not np.isfinite(top):  # NaN, +inf, or every token at -inf: no distribution (HF fails too)
            raise QwenError(f"cannot sample: the model's top score is {top}")
        # Each filter returns the ids still in play; every other token has probability exactly 0.
        ids = None
        if 0 < p.top_k < x.size:
            ids = _top_k(x, p.top_k)
        if p.top_p < 1.0:
            ids = _top_p(x, top, ids, p.top_p)
        if p.min_p > 0.0:
            ids = _min_p(x, top, ids, p.min_p)
        if ids is None:  # temperature alone: the whole softmax
            return None, _exp_below(x, top)
        return ids, np.exp(x[ids].astype(np.float64) - top)  # the top token is always in play


    def probabilities(self, logits: np.ndarray, history: Iterable[int] = ()) -> np.ndarray:
        """`distribution` as float64 probabilities over the whole vocabulary (zero where a filter cut)."""
        ids, weights = self.distribution(logits, history)
        p = np.zeros(np.asarray(logits).size, np.float64)
        if ids is None:
            p[:] = weights / weights.sum(dtype=np.float64)
        else:
            p[ids] = weights / weights.sum()
        return p

    def verify(self, logits: np.ndarray, history: Iterable[int], draft: int,
               draft_probs: np.ndarray | None = None) -> int:
        """The token at a drafted position in speculative decoding, distributed exactly as `self(logits,
        history)`'s (Leviathan et al., 2023): greedy picks the argmax, which keeps the draft only when it is
        that; sampling keeps the draft with probability min(1, p(d) / q(d)) and otherwise draws from
        max(p - q, 0) renormalized. `draft_probs` is the drafter's distribution q over the vocabulary; None
        means the draft was chosen without chance (prompt lookup, a greedy draft model): q is one-hot at it."""
        if self.params.greedy:
            return self(logits, history)
        p = self.probabilities(logits, history)
        size = p.size
        q = np.zeros(size, np.float64)
        if draft_probs is None:
            q[draft] = 1.0
        else:  # a draft model's vocabulary may be shorter than the target's (or padded longer)
            n = min(size, draft_probs.size)
            q[:n] = draft_probs[:n]
        if self.rng.random() * q[draft] < p[draft]:
            return draft
        residual = np.maximum(p - q, 0.0)
        return _draw(residual if residual.sum() > 0 else p, self.rng)


@dataclass
class Draw:
    """What a backend that samples on its device needs to pick one row's next token."""

    params: SamplingParams
    history: set[int]  # the prompt and the tokens generated before this step (repetition penalty)
    u: float           # uniform in [0, 1) from the request's seeded generator (unused when greedy)


def apply_penalties(logits: np.ndarray, counts: collections.Counter, presence: float, frequency: float
                    ) -> np.ndarray:
    """OpenAI's rule: logit[t] -= frequency * count[t] + presence * (count[t] > 0), over generated tokens."""
    ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    n = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
    out = logits.copy()
    out[ids] -= frequency * n + presence
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - np.max(x)
    return x - np.log(np.sum(np.exp(x)))


_NO_IDS = np.empty(0, dtype=np.int64)
_MASS_MARGIN = 1e-5  # far above the float32 rounding of a vocabulary-wide softmax (~1e-6)


def _seen(history: Iterable[int], size: int) -> np.ndarray:
    seen = np.fromiter(history, dtype=np.int64)  # repeats are harmless: each writes the same value
    return seen[seen < size]  # HF leaves ids beyond the output vocabulary alone


def _penalize(scores: np.ndarray, penalty: float) -> np.ndarray:
    # CTRL's rule as HF applies it: shrink positive scores, push negative ones further down (float32 math).
    return np.where(scores < 0, scores * np.float32(penalty), scores / np.float32(penalty))


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
    """Ids (ascending) of every score >= the k-th largest: HF keeps all the ties at the boundary."""
    rows = min(64, x.size // (8 * k))
    if rows < 2:  # k is a sizeable share of the vocabulary: select over all of it
        return np.flatnonzero((x >= np.partition(x, x.size - k)[x.size - k]) & (x > -np.inf))
    cols = x.size // rows
    # Strided groups (column g holds ids g, g + cols, ...) and their maxima: k maxima are >= the k-th
    # largest of them, so it is <= the k-th largest score, and the scores above it hold the top k (plus
    # a few more, usually). They lie in the columns whose maximum reaches it, or in the short tail.
    grid = x[: rows * cols].reshape(rows, cols)
    group_max = grid.max(axis=0)
    floor = np.partition(group_max, cols - k)[cols - k]
    picked = np.flatnonzero(group_max >= floor)
    cand = np.concatenate([(np.arange(rows)[:, None] * cols + picked).ravel(),  # ascending ids
                           np.arange(rows * cols, x.size)])
    scores = np.concatenate([grid[:, picked].ravel(), x[rows * cols:]])
    cand, scores = cand[scores >= floor], scores[scores >= floor]
    kth = np.partition(scores, scores.size - k)[scores.size - k]
    # HF also keeps -inf scores when fewer than k are finite (a grammar mask), at probability 0: drop them
    return cand[(scores >= kth) & (scores > -np.inf)]


def _top_p(x: np.ndarray, top: np.float32, ids: np.ndarray | None, top_p: float) -> np.ndarray:
    """HF's nucleus over the tokens in play (all when `ids` is None), as ids in descending score."""
    if ids is not None:  # a handful left by top-k: their softmax is exact and cheap
        w = np.exp(x[ids].astype(np.float64) - top)
        return _nucleus(x, ids, w, w.sum(), top_p)
    e = _exp_below(x, top)  # float32: the one pass that exponentiates the vocabulary
    total = float(e.sum(dtype=np.float64))  # a float32 sum would blur the cut when top_p is near 1
    # Let A hold the tokens with probability >= tau. Every other token scores strictly below all of A,
    # so once A holds top_p of the mass, each of them has >= top_p above it and is cut: the nucleus lies
    # in A, and only A is sorted. Fewer than 1/tau tokens reach tau, so large taus come first. The last,
    # (1 - top_p) / 2V, leaves out < (1 - top_p) / 2 of the mass, which is enough unless top_p is within
    # rounding of 1; then everything is sorted, as HF does.
    last = (1.0 - top_p) / (2 * x.size)
    for tau in [t for t in (1e-3, 1e-4, 1e-5) if t > last] + [last]:
        # the threshold is taken on the scores, so "strictly below" holds exactly, whatever exp rounds
        cand = np.flatnonzero(x >= np.float32(top + np.log(tau * total)))
        w = e[cand].astype(np.float64)
        if w.sum() >= (top_p + _MASS_MARGIN) * total:
            return _nucleus(x, cand, w, total, top_p)
    return _nucleus(x, np.arange(x.size), e.astype(np.float64), total, top_p)


def _exp_below(x: np.ndarray, top: np.float32) -> np.ndarray:
    """exp(x - top) in float32, in one new vector."""
    e = x - top
    return np.exp(e, out=e)


def _nucleus(x: np.ndarray, cand: np.ndarray, w: np.ndarray, total: float, top_p: float) -> np.ndarray:
    """Of `cand` (ascending ids, a superset of the nucleus, weights `w` out of `total`), the tokens
    whose mass strictly above them is < top_p: the smallest prefix reaching top_p, crossing token
    included. Ties go to the lower id first (HF's order for ties is torch.sort's, which is unspecified)."""
    order = np.argsort(-x[cand], kind="stable")
    cumulative = np.cumsum(w[order] / total)
    return cand[order[: np.searchsorted(cumulative, top_p, side="left") + 1]]


def _min_p(x: np.ndarray, top: np.float32, ids: np.ndarray | None, min_p: float) -> np.ndarray:
    """HF's min-p over the tokens in play: p < min_p * p_max, that is exp(x - x_max) < min_p, is cut."""
    if ids is None:
        # every score below max + log(min_p) is cut; a float32 floor one step under it is safely below
        floor = np.nextafter(np.float32(top + np.log(min_p)), np.float32(-np.inf))
        ids = np.flatnonzero(x >= floor)
    return ids[np.exp(x[ids].astype(np.float64) - top) >= min_p]


def _draw(w: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn with probability proportional to `w` (inverse CDF on the seeded generator)."""
    rows = 64
    if w.size < 128 * rows:
        return _inverse_cdf(w, rng)
    # Two stages, so that no cumulative sum spans the vocabulary: a strided group (ids g, g + cols, ...)
    # by its mass, then a member of it; the leftover tail is one more group.
    cols = w.size // rows
    body, tail = w[: rows * cols], w[rows * cols:]
    g = _inverse_cdf(np.append(body.reshape(rows, cols).sum(axis=0), tail.sum()), rng)
    if g == cols:
        return rows * cols + _inverse_cdf(tail, rng)
    return g + cols * _inverse_cdf(body[g::cols], rng)


def _inverse_cdf(w: np.ndarray, rng: np.random.Generator) -> int:
    cdf = np.cumsum(w, dtype=np.float64)
    i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    # u * total may round up to total itself: the last token with any weight is the one then
    return i if i < cdf.size else int(np.flatnonzero(w)[-1])
