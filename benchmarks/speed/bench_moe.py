"""MoE speed on MLX: qwen-mlx beside mlx-lm on the same checkpoint, and the MoE beside a dense model of the
same total size, in one process with interleaved rounds (the machine is shared: alternating runners each
round and taking medians keeps the comparison fair when the load changes).

    python -m benchmarks.checkpoints.make_bench_model /tmp/bench  # the two random checkpoints (3.2 GB each)
    python -m benchmarks.speed.bench_moe /tmp/bench [--dtype float32] [--quantize 4] [--rounds 5]

Each runner is timed through its own generation path: qwen-mlx's engine (what `generate`, `chat` and `serve`
run), mlx-lm's `generate_step` (what `mlx_lm.generate` runs, with its asynchronous evaluation). Prefill: a fresh
cache and a 64-token prompt to the first token; decode: 16 greedy tokens after it. Peak memory is MLX's
own count: what loading a runner and one run of it add to the memory already allocated.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from pathlib import Path

from benchmarks.common import load_openblas, prog, round_order

load_openblas()  # before mlx, for both runners
import mlx.core as mx  # noqa: E402

PROMPT = list(range(3, 67))  # 64 ids every tokenizer of the bench models has
DECODE = 16


class Ours:
    def __init__(self, folder: Path, dtype: str, quantize: int | None):
        from qwen_mlx.checkpoint import prepare_model
        from qwen_mlx.backends.mlx import MLXBackend
        from qwen_mlx.tokenizer import Tokenizer

        self.backend = MLXBackend(prepare_model(str(folder)), dtype, quantize)
        self.tokenizer = Tokenizer.from_folder(str(folder))
        self.tokenizer.eos_token_ids = frozenset()  # decode exactly DECODE tokens

    def run(self) -> tuple[float, float]:
        from benchmarks.speed.bench_longctx import token_times
        from qwen_mlx.engine import local_engine

        # A fresh engine each run: one that had run PROMPT would serve it from its prefix cache.
        engine = local_engine(self.backend, self.tokenizer)
        t0 = time.perf_counter()
        times = token_times(engine, PROMPT, DECODE + 1)
        return times[0] - t0, times[-1] - times[0]


class MlxLm:
    def __init__(self, folder: Path, dtype: str, quantize: int | None):
        import mlx.nn as nn
        from mlx_lm import load

        self.model, _ = load(str(folder))
        self.model.set_dtype(getattr(mx, dtype))
        if quantize:
            nn.quantize(self.model, group_size=64, bits=quantize)  # what `mlx_lm.convert -q` does
        mx.eval(self.model.parameters())

    def run(self) -> tuple[float, float]:
        from mlx_lm.generate import generate_step
        from mlx_lm.sample_utils import make_sampler

        t0 = time.perf_counter()
        times = []
        for _ in generate_step(mx.array(PROMPT), self.model, max_tokens=DECODE + 1, sampler=make_sampler(0.0)):
            times.append(time.perf_counter())
        return times[0] - t0, times[-1] - times[0]


def measure(runners: dict, rounds: int) -> dict:
    """name -> (prefill tok/s, decode tok/s) medians over rounds, the runners' order alternating per round;
    prints each round's figures and the first runner's ratio to the second in that round."""
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    names = list(runners)
    for name in names:  # one warm-up each (compiles kernels, faults pages in)
        runners[name].run()
    for r in range(rounds):
        for name in round_order(names, r):
            prefill, decode = runners[name].run()
            out[name].append((len(PROMPT) / prefill, DECODE / decode))
        (p0, d0), (p1, d1) = out[names[0]][-1], out[names[1]][-1]
        print(f"round {r + 1}: {names[0]} {p0:.1f} / {d0:.2f}, {names[1]} {p1:.1f} / {d1:.2f} tok/s "
              f"(prefill / decode); ratio prefill {p0 / p1:.2f}x, decode {d0 / d1:.2f}x; "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
    return {name: (statistics.median(p for p, _ in v), statistics.median(d for _, d in v)) for name, v in out.items()}


def load_with_peak(cls, folder: Path, dtype: str, quantize: int | None):
    """The runner, and the peak memory its load and one run add above what was already allocated (the
    runners share the process, so each counts only its own)."""
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    runner = cls(folder, dtype, quantize)
    runner.run()
    return runner, (mx.get_peak_memory() - before) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(prog=prog(__spec__.name), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="the folder benchmarks.checkpoints.make_bench_model wrote (moe/, dense/)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quantize", type=int, default=0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--skip-dense", action="store_true")
    a = p.parse_args()
    q = a.quantize or None
    from qwen_mlx.config import ModelArgs

    moe_args = ModelArgs.from_folder(a.root / "moe")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
          f"load average {os.getloadavg()[0]:.1f}; {a.dtype}{f', {q}-bit' if q else ''}; prompt {len(PROMPT)}, "
          f"decode {DECODE} tokens, median of {a.rounds} interleaved rounds")
    print(f"MoE: {sum(moe_args.parameter_counts().values()) / 1e6:.0f}M parameters, "
          f"{moe_args.active_parameters() / 1e6:.0f}M active")
    ours, ours_peak = load_with_peak(Ours, a.root / "moe", a.dtype, q)
    theirs, theirs_peak = load_with_peak(MlxLm, a.root / "moe", a.dtype, q)
    res = measure({"qwen-mlx": ours, "mlx-lm": theirs}, a.rounds)
    print("| model | runner | prefill tok/s | decode tok/s | peak MLX GB |")
    print("| --- | --- | --- | --- | --- |")
    for name, peak in (("qwen-mlx", ours_peak), ("mlx-lm", theirs_peak)):
        print(f"| MoE | {name} | {res[name][0]:.1f} | {res[name][1]:.2f} | {peak:.2f} |", flush=True)
    print(f"qwen-mlx / mlx-lm: prefill {res['qwen-mlx'][0] / res['mlx-lm'][0]:.2f}x, "
          f"decode {res['qwen-mlx'][1] / res['mlx-lm'][1]:.2f}x", flush=True)
    if a.skip_dense:
        return
    del theirs
    dense_args = ModelArgs.from_folder(a.root / "dense")
    print(f"dense: {sum(dense_args.parameter_counts().values()) / 1e6:.0f}M parameters")
    dense, dense_peak = load_with_peak(Ours, a.root / "dense", a.dtype, q)
    res = measure({"moe": ours, "dense": dense}, a.rounds)
    print("| model | runner | prefill tok/s | decode tok/s | peak MLX GB |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| MoE | qwen-mlx | {res['moe'][0]:.1f} | {res['moe'][1]:.2f} | {ours_peak:.2f} |")
    print(f"| dense, same total | qwen-mlx | {res['dense'][0]:.1f} | {res['dense'][1]:.2f} | {dense_peak:.2f} |")
    ratio = sum(dense_args.parameter_counts().values()) / moe_args.active_parameters()
    print(f"MoE / dense decode: {res['moe'][1] / res['dense'][1]:.2f}x (parameters read per token: "
          f"{ratio:.2f}x fewer)")


if __name__ == "__main__":
    main()
