"""Per-token cost of qwen_mlx.sampling.Sampler against the implementation it replaced, in one run.

    python -m benchmarks.speed.bench_sampling [--rounds 7] [--tokens 30] [--vocab 151936] [--logits FILE.npy]

Both samplers see the same logits, drawn like a Qwen2.5 model's over its 151,936-token vocabulary: a
bulk around -3 (spread 2.7) and a ranked head of a few dozen tokens up to 17-23 above it, so the top
token holds 0.1-0.99 of the mass, as the real 0.5B checkpoint's next-token logits do; and a history of
~300 distinct ids for the repetition penalty. Old and new alternate within each round (the order flips
every round) so the shared machine's load hits both alike; each figure is the median over rounds.
--logits takes real next-token logits instead, a [steps, vocab] float array saved with numpy.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.common import prog, round_order
from qwen_mlx.sampling import Sampler, SamplingParams

MODES = {
    "greedy": SamplingParams(temperature=0.0),
    "Qwen defaults (T 0.7, top-k 20, top-p 0.8, rep 1.05)": SamplingParams(
        temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05),
    "top-p 0.8 alone (T 1.0)": SamplingParams(top_p=0.8),
    "top-p 0.95 + min-p 0.05 (T 0.7)": SamplingParams(temperature=0.7, top_p=0.95, min_p=0.05),
    "temperature 0.8 alone": SamplingParams(temperature=0.8),
}


class BaselineSampler:
    """The sampler as it was before this benchmark's change (qwen_mlx/sampling.py at 8b57838), kept
    here only as the baseline: full-vector softmax, a full argsort for top-p, rng.choice."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history=()) -> int:
        p = self.params
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)
        if p.repetition_penalty != 1.0:
            seen = np.fromiter(set(history), dtype=np.int64)
            if seen.size:
                logits = logits.copy()
                scores = logits[seen]
                logits[seen] = np.where(scores < 0, scores * p.repetition_penalty,
                                        scores / p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(logits))
        logits = logits / np.float32(p.temperature)
        if p.top_k and p.top_k < logits.size:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits = np.where(logits < kth, -np.inf, logits)
        e = np.exp(logits - np.max(logits))
        probs = e / e.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            probs[order[np.searchsorted(cumulative, p.top_p, side="left") + 1:]] = 0.0
        if p.min_p > 0.0:
            probs[probs < p.min_p * probs.max()] = 0.0
        probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))


def realistic_logits(rng: np.random.Generator, vocab: int) -> np.ndarray:
    x = rng.normal(-3.0, 2.7, vocab).astype(np.float32)
    head = rng.choice(vocab, 48, replace=False)  # ranked: each a random gap below the one before
    x[head] = rng.uniform(14, 20) - np.cumsum(rng.exponential(rng.uniform(0.3, 1.2), head.size))
    return x


def ms_per_token(sampler, logits: list[np.ndarray], history: set[int], tokens: int) -> float:
    t0 = time.perf_counter()
    for i in range(tokens):
        sampler(logits[i % len(logits)], history)
    return (time.perf_counter() - t0) / tokens * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(prog=prog(__spec__.name), description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=30, help="tokens sampled per side, mode and round")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--logits", type=Path, help="a .npy of real logits, [steps, vocab]")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    if args.logits:
        logits = list(np.load(args.logits).astype(np.float32))
        args.vocab = logits[0].size
    else:
        logits = [realistic_logits(rng, args.vocab) for _ in range(8)]
    history = set(rng.integers(0, args.vocab, 300).tolist())
    sides = {"old": BaselineSampler, "new": Sampler}
    times: dict[tuple[str, str], list[float]] = {(m, s): [] for m in MODES for s in sides}
    for mode, params in MODES.items():  # warm-up, untimed
        for make in sides.values():
            ms_per_token(make(params), logits, history, 3)
    for r in range(args.rounds):
        order = round_order(list(sides), r)
        for mode, params in MODES.items():
            for side in order:
                times[mode, side].append(ms_per_token(sides[side](params), logits, history, args.tokens))
    source = args.logits.name if args.logits else "drawn"
    print(f"vocab {args.vocab}, {source} logits, {args.rounds} rounds x {args.tokens} tokens; "
          f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, numpy "
          f"{np.__version__}; load average {os.getloadavg()[0]:.1f} at the end")
    print("| sampling | old ms/token | new ms/token | speed-up |")
    print("| --- | --- | --- | --- |")
    for mode in MODES:
        old, new = (statistics.median(times[mode, s]) for s in sides)
        print(f"| {mode} | {old:.3f} | {new:.3f} | {old / new:.1f}x |")


if __name__ == "__main__":
    main()
