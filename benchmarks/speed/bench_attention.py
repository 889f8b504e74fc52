"""One layer's attention on the CPU: qwen_mlx.models.base (the numpy softmax for long float32 chunks) beside MLX's
`mx.fast.scaled_dot_product_attention`, at Qwen2.5-0.5B's shape (14 query heads on 2 kv heads, head_dim 64),
a causal prefill chunk of L new tokens over T positions. Interleaved rounds, medians; the largest absolute
difference of the outputs is printed too.

    python -m benchmarks.speed.bench_attention [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from benchmarks.common import load_openblas, prog, round_order

load_openblas()  # before mlx
import mlx.core as mx  # noqa: E402

from qwen_mlx.models.base import attention  # noqa: E402

SHAPES = [(512, 512), (512, 2048), (512, 8192), (512, 16384), (64, 4096), (8, 4096)]  # (L, T)


def timed(f) -> float:
    t = time.perf_counter()
    mx.eval(f())
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(prog=prog(__spec__.name), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    print(f"{os.cpu_count()} cores, mlx {mx.__version__}, float32, load average {os.getloadavg()[0]:.1f}; "
          f"median of {a.rounds} interleaved rounds")
    print("| L new | T positions | fused kernel ms | qwen_mlx.models.base ms | speed-up | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    for L, T in SHAPES:
        mx.random.seed(0)
        q, k, v = mx.random.normal((1, 14, L, 64)), mx.random.normal((1, 2, T, 64)), mx.random.normal((1, 2, T, 64))
        mx.eval(q, k, v)
        runners = {"fused": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal"),
                   "ours": lambda: attention(q, k, v, 0.125, "causal")}
        diff = float(mx.abs(runners["fused"]() - runners["ours"]()).max())
        times: dict[str, list[float]] = {name: [] for name in runners}
        for r in range(a.rounds):
            for name in round_order(list(runners), r):
                times[name].append(timed(runners[name]))
        fused, ours = (statistics.median(times[n]) * 1e3 for n in ("fused", "ours"))
        print(f"| {L} | {T} | {fused:.1f} | {ours:.1f} | {fused / ours:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
