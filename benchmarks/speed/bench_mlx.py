"""MLX backend against mlx-lm on the same checkpoint, in one run: prefill tok/s, decode tok/s, peak memory.

    python -m benchmarks.speed.bench_mlx --model FOLDER [--dtypes float32,bfloat16] [--quantize 4]
        [--quantize-from float32,bfloat16] [--prompt-tokens 128] [--decode-tokens 64] [--rounds N]

Each measurement runs in a fresh subprocess (so peak memory is its own and nothing stays warm), both
sides decode exactly the same number of tokens greedily with no EOS stop, and both are timed by the same
code: prefill = time to the first token, decode = the following tokens / their time.
mlx-lm runs twice: as it comes (MLX's bundled reference BLAS on Linux) and with the same OpenBLAS that
qwen-mlx loads, so the table separates what the BLAS gives from what the implementation gives.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import time
from pathlib import Path

from benchmarks.common import REPO, load_openblas, module_command, module_env, prog, round_order

TEXT = (REPO / "cli.py").read_text()  # a fixed, code-flavoured prompt


def prompt_ids(tokenizer_encode, n: int) -> list[int]:
    ids = tokenizer_encode(TEXT)
    assert len(ids) >= n, "prompt text too short"
    return ids[:n]


def run_ours(model: str, dtype: str, quantize: int | None, n_prompt: int, n_decode: int) -> dict:
    import numpy as np

    blas_name = load_openblas()
    from qwen_mlx.checkpoint import prepare_model
    from qwen_mlx.backends.base import Session
    from qwen_mlx.backends.mlx import MLXBackend
    from qwen_mlx.tokenizer import Tokenizer

    backend = MLXBackend(prepare_model(model), dtype, quantize)
    ids = prompt_ids(Tokenizer.from_folder(model).encode, n_prompt)
    session = Session(backend)
    t0 = time.perf_counter()
    token = int(np.argmax(session.prefill(ids)))
    t1 = time.perf_counter()
    for _ in range(n_decode - 1):
        token = int(np.argmax(session.step(token)))
    t2 = time.perf_counter()
    return dict(prefill_s=t1 - t0, decode_s=t2 - t1, blas=blas_name, peak_gb=backend.peak_memory_gb())


def run_mlx_lm(model: str, dtype: str, quantize: int | None, n_prompt: int, n_decode: int, blas: bool) -> dict:
    # With `blas`, the OpenBLAS qwen-mlx loads, before mlx, exactly as qwen-mlx does; without, nothing imports
    # qwen_mlx in this process (benchmarks.common imports only the standard library).
    blas_name = load_openblas() if blas else "bundled"
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import load
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    model_, tok = load(model)
    model_.set_dtype(getattr(mx, dtype))
    if quantize:
        nn.quantize(model_, group_size=64, bits=quantize)  # what `mlx_lm.convert -q` does to the weights
    mx.eval(model_.parameters())
    tok.eos_token_ids = set()  # decode exactly n_decode tokens
    ids = prompt_ids(lambda s: tok.encode(s, add_special_tokens=False), n_prompt)
    times = []
    t0 = time.perf_counter()
    for _ in stream_generate(model_, tok, ids, max_tokens=n_decode + 1, sampler=make_sampler(0.0)):
        times.append(time.perf_counter())
    times = times[:n_decode]
    return dict(prefill_s=times[0] - t0, decode_s=times[-1] - times[0], blas=blas_name,
                peak_gb=mx.get_peak_memory() / 1e9)


def worker_command(runner: str, model: str, dtype: str, quantize: int, n_prompt: int, n_decode: int) -> list[str]:
    """One measurement as a fresh subprocess (run it with `module_env()`): its JSON is the last line of stdout."""
    return module_command("benchmarks.speed.bench_mlx", "--worker", runner, "--model", model, "--dtype", dtype,
                          "--quantize", str(quantize), "--prompt-tokens", str(n_prompt),
                          "--decode-tokens", str(n_decode))


def worker(a: argparse.Namespace) -> None:
    q = a.quantize or None
    if a.worker == "ours":
        r = run_ours(a.model, a.dtype, q, a.prompt_tokens, a.decode_tokens)
    else:
        r = run_mlx_lm(a.model, a.dtype, q, a.prompt_tokens, a.decode_tokens, blas=a.worker == "mlx-lm+openblas")
    r.update(prefill_tps=a.prompt_tokens / r["prefill_s"], decode_tps=(a.decode_tokens - 1) / r["decode_s"],
             # not qwen_mlx's helper: importing qwen_mlx preloads OpenBLAS, which would change the mlx-lm rows
             rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
    print(json.dumps(r))


def main() -> None:
    p = argparse.ArgumentParser(prog=prog(__spec__.name), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--quantize", type=int, default=0, help="also run 4- or 8-bit, from each --quantize-from dtype")
    p.add_argument("--quantize-from", default="float32,bfloat16", help="the dtypes --quantize starts from")
    p.add_argument("--rounds", type=int, default=1, help="rows per case, runners alternating (order reversed "
                   "every other round)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--runners", default="ours,mlx-lm,mlx-lm+openblas")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    cases = [(d, 0) for d in a.dtypes.split(",") if d]
    if a.quantize:
        cases += [(d, a.quantize) for d in a.quantize_from.split(",") if d]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
          f"python {platform.python_version()}; prompt {a.prompt_tokens} tokens, decode {a.decode_tokens} tokens")
    print("| runner | dtype | quant | BLAS | prefill tok/s | decode tok/s | peak MLX GB | max RSS GB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    env = module_env(dict(os.environ, QWEN_MLX_QUIET="1"))
    runners = a.runners.split(",")
    for dtype, q in cases:
        for runner in [r for i in range(a.rounds) for r in round_order(runners, i)]:
            cmd = worker_command(runner, a.model, dtype, q, a.prompt_tokens, a.decode_tokens)
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:
                print(f"| {runner} | {dtype} | {q or '-'} | failed: {out.stderr.strip().splitlines()[-1]} |")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {runner} | {dtype} | {f'{q}-bit' if q else '-'} | {Path(r['blas']).name} | "
                  f"{r['prefill_tps']:.1f} | {r['decode_tps']:.2f} | {r['peak_gb']:.2f} | {r['rss_gb']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
