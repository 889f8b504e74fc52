"""Sampling rules against HF transformers' logits processors, and the generation loop's stop rules."""

from __future__ import annotations

import numpy as np
import pytest

from qwen_mlx.errors import QwenError
from qwen_mlx.sampling import Sampler, SamplingParams

RNG = np.random.default_rng(0)


def hf_distribution(logits: np.ndarray, history: list[int], p: SamplingParams) -> np.ndarray:
    """The probabilities HF `generate` samples from, built from its own processors in its own order."""
    import torch
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    ids = torch.tensor([history])
    scores = torch.tensor(logits)[None]
    procs = [RepetitionPenaltyLogitsProcessor(p.repetition_penalty), TemperatureLogitsWarper(p.temperature)]
    if p.top_k:
        procs.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1:
        procs.append(TopPLogitsWarper(p.top_p))
    if p.min_p:
        procs.append(MinPLogitsWarper(p.min_p))
    for proc in procs:
        scores = proc(ids, scores)
    return torch.softmax(scores, -1)[0].numpy()


def our_support(logits, history, p):
    """Our sampler's empirical distribution over 3000 draws."""
    sampler = Sampler(p)
    return np.bincount([sampler(logits, history) for _ in range(3000)], minlength=logits.size) / 3000


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=1.3, min_p=0.1),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
])
def test_distribution_matches_transformers(params):
    logits = (RNG.normal(size=50) * 2).astype(np.float32)
    history = RNG.integers(0, 50, size=10).tolist()
    want = hf_distribution(logits, history, params)
    got = our_support(logits, history, params)
    assert set(np.flatnonzero(got)) <= set(np.flatnonzero(want > 0))
    np.testing.assert_allclose(got, want, atol=0.035)


def test_greedy_and_repetition_penalty():
    logits = np.array([1.0, 3.0, -2.0, 2.9], dtype=np.float32)
    assert Sampler(SamplingParams(temperature=0))(logits) == 1
    # the penalty divides the positive score of a seen token: 3.0 / 1.5 = 2.0 < 2.9
    assert Sampler(SamplingParams(temperature=0, repetition_penalty=1.5))(logits, [1]) == 3


def test_seed_replays_exactly():
    logits = RNG.normal(size=100).astype(np.float32)
    a, b = Sampler(SamplingParams(seed=7)), Sampler(SamplingParams(seed=7))
    assert [a(logits) for _ in range(20)] == [b(logits) for _ in range(20)]
    c = Sampler(SamplingParams(seed=8))
    assert [a(logits) for _ in range(20)] != [c(logits) for _ in range(20)]


def test_generation_config_defaults_and_overrides():
    gen = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1, "do_sample": True}
    p = SamplingParams.from_generation_config(gen, temperature=0.0, top_k=None)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.0, 0.8, 20, 1.1)
    assert SamplingParams.from_generation_config({"do_sample": False}).greedy


@pytest.mark.parametrize("kwargs,flag", [
    (dict(temperature=-1), "--temperature"), (dict(top_p=0), "--top-p"), (dict(top_p=1.5), "--top-p"),
    (dict(top_k=-1), "--top-k"), (dict(min_p=1.0), "--min-p"), (dict(repetition_penalty=0), "--repetition-penalty"),
])
def test_out_of_range_flags(kwargs, flag):
    with pytest.raises(QwenError, match=flag):
        SamplingParams(**kwargs)
