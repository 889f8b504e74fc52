"""Sampling rules against HF transformers' logits processors, and the generation loop's stop rules."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_mlx.errors import QwenError
from qwen_mlx.sampling import Sampler, SamplingParams

RNG = np.random.default_rng(0)
VOCAB = 151_936  # Qwen2's
QWEN_DEFAULTS = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05)


def hf_scores(logits: np.ndarray, history: list[int], p: SamplingParams, filters: bool = True) -> np.ndarray:
    """The scores HF `generate` samples from (-inf where filtered), from its own processors in its order."""
    import torch
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    ids = torch.tensor([history], dtype=torch.long)
    scores = torch.tensor(logits)[None]
    procs = [RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty)),
             TemperatureLogitsWarper(float(p.temperature))]
    if filters and p.top_k:
        procs.append(TopKLogitsWarper(p.top_k))
    if filters and p.top_p < 1:
        procs.append(TopPLogitsWarper(p.top_p))
    if filters and p.min_p:
        procs.append(MinPLogitsWarper(p.min_p))
    for proc in procs:
        scores = proc(ids, scores)
    return scores[0].numpy()


def hf_distribution(logits: np.ndarray, history: list[int], p: SamplingParams) -> np.ndarray:
    import torch

    return torch.softmax(torch.tensor(hf_scores(logits, history, p)), -1).numpy()


def our_distribution(logits: np.ndarray, history: list[int], p: SamplingParams) -> np.ndarray:
    """The probabilities Sampler draws from, as a vocabulary-sized vector."""
    ids, weights = Sampler(p).distribution(logits, history)
    probs = np.zeros(logits.size)
    probs[slice(None) if ids is None else ids] = weights / weights.sum()
    return probs


def realistic_logits(rng: np.random.Generator, vocab: int = VOCAB) -> np.ndarray:
    """Drawn like a Qwen2.5 model's next-token logits: a bulk around -3 (spread 2.7) and a ranked head of
    a few dozen tokens up to 17-23 above it, so the top token holds 0.1-0.99 of the mass."""
    x = rng.normal(-3.0, 2.7, vocab).astype(np.float32)
    head = rng.choice(vocab, 48, replace=False)
    x[head] = rng.uniform(14, 20) - np.cumsum(rng.exponential(rng.uniform(0.3, 1.2), head.size))
    return x


def count_bound(n: int, p: float, fail: float = 1e-12) -> float:
    """t with P(|K - np| >= t) <= fail for K ~ Binomial(n, p): Bernstein's inequality, which holds at any
    n and p (the normal approximation sqrt(np(1-p)) * z does not for rare tokens)."""
    log_term = math.log(2 / fail)
    return log_term / 3 + math.sqrt((log_term / 3) ** 2 + 2 * n * p * (1 - p) * log_term)


def assert_frequencies(draws: np.ndarray, probs: np.ndarray) -> None:
    """Every count within its Bernstein bound at 1e-12: a correct sampler fails this with probability
    < 1e-9 over a whole test (and the seed fixes the draws), while n = 20000 draws still catch any
    probability off by more than 0.03, or a missing token of probability 0.01."""
    n = draws.size
    counts = np.bincount(draws, minlength=probs.size)
    assert counts[probs == 0].sum() == 0, "drew a token HF's processors filter out"
    bounds = np.array([count_bound(n, q) for q in probs])
    off = np.abs(counts - n * probs) > bounds
    assert not off.any(), f"tokens {np.flatnonzero(off)}: counts {counts[off]} vs expected {n * probs[off]}"


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, top_k=5, seed=1),
    SamplingParams(temperature=1.0, top_p=0.8, seed=2),
    SamplingParams(temperature=1.3, min_p=0.1, seed=3),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3, seed=4),
])
def test_distribution_matches_transformers(params):
    logits = (RNG.normal(size=50) * 2).astype(np.float32)
    history = RNG.integers(0, 50, size=10).tolist()
    sampler = Sampler(params)
    draws = np.array([sampler(logits, history) for _ in range(20_000)])
    assert_frequencies(draws, hf_distribution(logits, history, params))


def test_large_vocabulary_draw_matches_softmax():
    """Temperature alone on a vocabulary past the two-stage draw's size (and not a multiple of its
    groups): the frequencies of heavy tokens spread over groups and the tail, and of the rest together."""
    rng = np.random.default_rng(5)
    vocab = 10_007
    logits = rng.normal(0, 1, vocab).astype(np.float32)
    heavy = np.array([0, 1, 155, 156, 3000, 9983, 9984, 10_006])  # 9984.. lie past the 64 full groups
    logits[heavy] = np.float32(8.0) - np.arange(heavy.size, dtype=np.float32) * np.float32(0.3)
    params = SamplingParams(temperature=0.9, seed=6)
    probs = hf_distribution(logits, [], params).astype(np.float64)
    sampler = Sampler(params)
    draws = np.array([sampler(logits) for _ in range(20_000)])
    lumped = np.where(np.isin(draws, heavy), draws, vocab)  # the light tokens as one outcome
    lumped_probs = np.zeros(vocab + 1)
    lumped_probs[heavy] = probs[heavy]
    lumped_probs[vocab] = 1 - probs[heavy].sum()
    assert_frequencies(lumped, lumped_probs)


# The fast paths against HF on Qwen's vocabulary size: the same tokens in play, the same probabilities
# (up to float32 softmax rounding). Decisions within float32 rounding of a threshold (a token whose mass
# ends exactly at top_p) may differ; this sampler follows the exact arithmetic there, and these seeds
# are nowhere near one.
@pytest.mark.parametrize("params", [
    QWEN_DEFAULTS,
    SamplingParams(top_p=0.8),
    SamplingParams(temperature=0.7, top_p=0.95),
    SamplingParams(temperature=1.2, top_p=0.9),  # wider: ~2-3k candidates, from a later threshold
    SamplingParams(temperature=3.0, top_p=0.9),  # flat: the last threshold, most of the vocabulary
    SamplingParams(top_p=0.8, min_p=0.05),
    SamplingParams(temperature=0.7, top_p=0.95, min_p=0.2),
    SamplingParams(temperature=1.3, min_p=0.1),
    SamplingParams(temperature=0.9, top_k=50),
    SamplingParams(top_k=30_000, top_p=0.9, repetition_penalty=0.8),  # k too large for the group prefilter
    SamplingParams(temperature=0.8, top_k=20, repetition_penalty=0.7),  # a penalty < 1 raises seen tokens
    SamplingParams(temperature=0.8),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_real_sized_vocabulary_matches_transformers(params, seed):
    rng = np.random.default_rng(seed)
    logits = realistic_logits(rng)
    history = rng.integers(0, VOCAB, 300).tolist() + np.flatnonzero(logits > 10).tolist()[:5]
    want, got = hf_distribution(logits, history, params), our_distribution(logits, history, params)
    np.testing.assert_array_equal(np.flatnonzero(got), np.flatnonzero(want))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-9)


def test_ties_at_the_top_k_boundary_are_all_kept():
    rng = np.random.default_rng(2)
    logits = realistic_logits(rng)
    ranked = np.argsort(-logits, kind="stable")
    logits[ranked[17:26]] = logits[ranked[19]]  # the 18th..26th share the 20th's score
    logits[rng.choice(VOCAB, 4, replace=False)] = logits[ranked[19]]  # and a few ids elsewhere too
    for params in (SamplingParams(top_k=20), QWEN_DEFAULTS, SamplingParams(top_k=20, min_p=0.001)):
        want, got = hf_distribution(logits, [], params), our_distribution(logits, [], params)
        np.testing.assert_array_equal(np.flatnonzero(got), np.flatnonzero(want))
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-9)
    assert np.count_nonzero(our_distribution(logits, [], SamplingParams(top_k=20))) >= 27
    # a coarse grid of scores: thousands of ties everywhere, the group maxima included
    coarse = np.round(rng.normal(0, 3, VOCAB) * 2).astype(np.float32) / 2
    for k in (1, 20, 500):
        want, got = (f(coarse, [], SamplingParams(top_k=k)) for f in (hf_distribution, our_distribution))
        np.testing.assert_array_equal(np.flatnonzero(got), np.flatnonzero(want))


@pytest.mark.parametrize("params", [
    SamplingParams(top_k=20), QWEN_DEFAULTS, SamplingParams(top_k=20, min_p=0.1),
    SamplingParams(top_k=40_000, top_p=0.9),
])
def test_a_mask_leaving_fewer_than_k_tokens(params):
    """A grammar mask (-inf everywhere but 6 tokens) under top-k 20: HF's top-k keeps the -inf scores too,
    at probability 0; only the 6 stay in play, and nothing sorts the vocabulary."""
    rng = np.random.default_rng(7)
    allowed = rng.choice(VOCAB, 6, replace=False)
    logits = np.full(VOCAB, -np.inf, dtype=np.float32)
    logits[allowed] = realistic_logits(rng)[allowed] + np.float32(15)
    want = hf_distribution(logits, allowed[:2].tolist(), params)
    ids, _ = Sampler(params).distribution(logits, allowed[:2].tolist())
    assert set(ids) <= set(allowed)
    got = our_distribution(logits, allowed[:2].tolist(), params)
    np.testing.assert_array_equal(np.flatnonzero(got), np.flatnonzero(want))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-9)


def test_a_tie_at_the_top_p_crossing():
    """HF cuts tokens tied with the crossing one in torch.sort's order, which is unspecified; the count
    kept and the probabilities are what is defined. This sampler keeps the lower ids of a tie."""
    rng = np.random.default_rng(3)
    logits = realistic_logits(rng)
    params = SamplingParams(top_p=0.8)
    nucleus = np.flatnonzero(hf_distribution(logits, [], params))
    crossing = nucleus[np.argmin(logits[nucleus])]
    others = np.array([5, 77_777, VOCAB - 1])
    logits[others] = logits[crossing]  # four tokens now share the crossing score
    want, got = hf_distribution(logits, [], params), our_distribution(logits, [], params)
    assert np.count_nonzero(got) == np.count_nonzero(want)
    np.testing.assert_allclose(np.sort(got[got > 0]), np.sort(want[want > 0]), rtol=2e-4)
    tied = np.sort(np.append(others, crossing))
    kept = np.flatnonzero(got[tied])
    assert 0 < kept.size < tied.size, "the crossing should fall inside the tie"
    np.testing.assert_array_equal(kept, np.arange(kept.size))  # the lowest ids of the tie


def test_top_p_within_rounding_of_one_sorts_everything():
    """top_p + the mass margin > 1: no threshold can prove the nucleus, so the whole vocabulary is
    sorted (HF's own path); tens of thousands of tokens stay in play and the draw takes two stages."""
    rng = np.random.default_rng(4)
    logits = realistic_logits(rng)
    params = SamplingParams(top_p=0.999995, seed=9)
    want, got = hf_distribution(logits, [], params), our_distribution(logits, [], params)
    np.testing.assert_array_equal(np.flatnonzero(got), np.flatnonzero(want))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-9)
    assert np.count_nonzero(got) > 10_000
    assert want[Sampler(params)(logits)] > 0


@pytest.mark.parametrize("delta,kept", [(2e-4, 2), (-2e-4, 3)])
def test_the_token_that_crosses_top_p_stays(delta, kept):
    """Masses 0.5, 0.3 + delta, 0.1, ...: with top_p 0.8 the second token crosses when delta > 0 (the
    third then has 0.8002 above it and goes), the third when delta < 0."""
    probs = np.full(VOCAB, 0.1 / (VOCAB - 3))
    probs[[70_000, 3, 150_000]] = 0.5, 0.3 + delta, 0.1 - delta
    logits = np.log(probs).astype(np.float32)
    params = SamplingParams(top_p=0.8)
    want, got = hf_distribution(logits, [], params), our_distribution(logits, [], params)
    np.testing.assert_array_equal(np.flatnonzero(got), np.flatnonzero(want))
    assert np.count_nonzero(got) == kept


@pytest.mark.parametrize("params", [SamplingParams(min_p=0.25), SamplingParams(top_p=0.999, min_p=0.25),
                                    SamplingParams(top_k=40, min_p=0.25)])
def test_min_p_boundary(params):
    """HF cuts p < min_p * p_max: a token 1e-4 above that line in log space stays, one 1e-4 below goes."""
    logits = realistic_logits(np.random.default_rng(6))
    top = logits.max()
    line = top + np.log(0.25)
    logits[[11, 22]] = np.float32(line + 1e-4), np.float32(line - 1e-4)
    want, got = hf_distribution(logits, [], params), our_distribution(logits, [], params)
    np.testing.assert_array_equal(np.flatnonzero(got), np.flatnonzero(want))
    assert got[11] > 0 and got[22] == 0


SCORE_GRID = [-np.inf, -2.0, -1.0, 0.0, 0.5, 1.0, 3.0]  # few values: ties at every boundary


@settings(max_examples=200, deadline=None)
@given(
    logits=st.lists(st.sampled_from(SCORE_GRID), min_size=1, max_size=40).filter(lambda v: max(v) > -np.inf),
    history=st.lists(st.integers(0, 45), max_size=12),
    temperature=st.sampled_from([0.3, 0.7, 1.0, 1.7]),
    top_k=st.integers(0, 45),
    top_p=st.sampled_from([0.05, 0.3, 0.5, 0.8, 0.95, 1.0]),
    min_p=st.sampled_from([0.0, 0.05, 0.3, 0.9]),
    penalty=st.sampled_from([0.8, 1.0, 1.3]),
)
def test_any_small_case_matches_transformers(logits, history, temperature, top_k, top_p, min_p, penalty):
    """Small vocabularies full of ties and -inf, ids past the vocabulary in the history: the same scores
    in play (ids may differ only within a tie at the top-p crossing) with the same probabilities."""
    logits = np.array(logits, dtype=np.float32)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=penalty)
    want, got = hf_distribution(logits, history, params), our_distribution(logits, history, params)
    scores = hf_scores(logits, history, params, filters=False)  # after penalty and temperature
    np.testing.assert_array_equal(np.sort(scores[got > 0]), np.sort(scores[want > 0]))
    np.testing.assert_allclose(np.sort(got[got > 0]), np.sort(want[want > 0]), rtol=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_logits_without_a_distribution_are_refused(bad):
    logits = np.zeros(1000, dtype=np.float32)
    logits[7] = bad
    with pytest.raises(QwenError, match="cannot sample"):
        Sampler(SamplingParams(top_k=20, top_p=0.8))(logits)
    with pytest.raises(QwenError, match="cannot sample"):
        Sampler(SamplingParams())(np.full(1000, -np.inf, dtype=np.float32))


def test_greedy_and_repetition_penalty():
    logits = np.array([1.0, 3.0, -2.0, 2.9], dtype=np.float32)
    assert Sampler(SamplingParams(temperature=0))(logits) == 1
    # the penalty divides the positive score of a seen token: 3.0 / 1.5 = 2.0 < 2.9
    assert Sampler(SamplingParams(temperature=0, repetition_penalty=1.5))(logits, [1]) == 3


@pytest.mark.parametrize("params", [QWEN_DEFAULTS, SamplingParams(top_p=0.8),
                                    SamplingParams(temperature=0.8)])
def test_seed_replays_exactly(params):
    rng = np.random.default_rng(8)
    steps = [realistic_logits(rng) for _ in range(4)]
    small = rng.normal(size=100).astype(np.float32)

    def run(seed: int) -> list[int]:
        sampler = Sampler(replace(params, seed=seed))
        history: set[int] = set()
        out = []
        for i in range(24):
            out.append(sampler(steps[i % 4] if i < 8 else small, history))
            history.add(out[-1])
        return out

    assert run(7) == run(7)
    assert run(7) != run(8)


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
