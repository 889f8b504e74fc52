"""Sampling rules, shared by every backend: logits arrive as a numpy float32 vector.

The order matches HF transformers' `generate`: repetition penalty, then temperature, top-k, top-p and
min-p. A temperature of 0 is greedy decoding. Pure numpy: one vocabulary-sized vector per token costs
well under a millisecond next to a forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Iterable

import numpy as np

from .errors import QwenError


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
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)
        if p.repetition_penalty != 1.0:
            seen = np.fromiter(set(history), dtype=np.int64)
            if seen.size:
                logits = logits.copy()
                scores = logits[seen]
                # CTRL's rule as HF applies it: shrink positive scores, push negative ones further down.
                logits[seen] = np.where(scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(logits))
        logits = logits / np.float32(p.temperature)
        if p.top_k and p.top_k < logits.size:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = _softmax(logits)
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            # keep the smallest prefix whose mass reaches top_p (the token that crosses it stays)
            cut = order[np.searchsorted(cumulative, p.top_p, side="left") + 1:]
            probs[cut] = 0.0
        if p.min_p > 0.0:
            probs[probs < p.min_p * probs.max()] = 0.0
        probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()
