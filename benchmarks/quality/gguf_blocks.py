"""GGUF blocks kept, on the real checkpoint: beside its float32 conversion and beside mlx-lm on the same folder.

    nice python -m benchmarks.quality.gguf_blocks [--rounds 2] [--prompt-tokens 32] [--decode-tokens 32]
        [--text-tokens 256] [--greedy 16]

Three models: `kept` (the GGUF's Q8_0/Q5_0/Q4_K blocks as MLX quantized layers, its Q6_K matrices float32:
`--model x.gguf`'s default), `float32` (every tensor dequantized: `--dtype float32`), and mlx-lm's
`mlx_lm.load` of the kept folder. Speed and memory: benchmarks/speed/bench_mlx.py's own workers, one fresh
subprocess per measurement, the three interleaved in each round (median over rounds). Quality: the first
--text-tokens tokens of colorsys.py teacher-forced through each (parity.teacher_forced: perplexity, top-1
agreement and max |logit diff| against float32), with the quantized kernels themselves. Greedy: --greedy
tokens of each parity-suite prompt (benchmarks/quality/parity.py), kept against float32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import module_env, prog
from benchmarks.quality import parity  # imports qwen_mlx first, which loads OpenBLAS
from benchmarks.speed.bench_mlx import worker_command

# row -> (bench_mlx worker, which folder)
RUNNERS = {"qwen-mlx, GGUF blocks kept": ("ours", "kept"), "qwen-mlx, float32 conversion": ("ours", "float32"),
           "mlx-lm, the same kept folder": ("mlx-lm+openblas", "kept")}


def folders() -> dict[str, Path]:
    from qwen_mlx.formats.gguf import cached_conversion
    from qwen_mlx.formats.real_checkpoint import real_gguf

    gguf = real_gguf()
    return {"kept": cached_conversion(gguf, None), "float32": cached_conversion(gguf, "float32")}


def speed(dirs: dict[str, Path], rounds: int, n_prompt: int, n_decode: int) -> list[str]:
    runs: dict[str, list[dict]] = {name: [] for name in RUNNERS}
    env = module_env(dict(os.environ, QWEN_MLX_QUIET="1"))
    for r in range(rounds):
        for name, (worker, folder) in RUNNERS.items():
            print(f"round {r + 1}: {name} ...", file=sys.stderr, flush=True)
            cmd = worker_command(worker, str(dirs[folder]), "float32", 0, n_prompt, n_decode)
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:
                raise SystemExit(f"{name} failed: {out.stderr.strip().splitlines()[-1]}")
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    lines = [f"Prompt {n_prompt} tokens, {n_decode} decoded greedily; median of {rounds} interleaved rounds "
             "(all rounds' decode tok/s in brackets).", "",
             "| model | on disk GB | prefill tok/s | decode tok/s | peak MLX GB | max RSS GB |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, rs in runs.items():
        disk = sum(f.stat().st_size for f in dirs[RUNNERS[name][1]].glob("*.safetensors")) / 1e9
        med = {k: statistics.median(r[k] for r in rs) for k in ("prefill_tps", "decode_tps", "peak_gb", "rss_gb")}
        every = ", ".join(f"{r['decode_tps']:.2f}" for r in rs)
        lines.append(f"| {name} | {disk:.2f} | {med['prefill_tps']:.1f} | {med['decode_tps']:.2f} ({every}) | "
                     f"{med['peak_gb']:.2f} | {med['rss_gb']:.2f} |")
    return lines


def mlx_lm_position_logits(model, ids, chunk: int = parity.CHUNK):
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    for s in range(0, len(ids), chunk):
        out = model(mx.array([list(ids[s:s + chunk])]), cache=cache)
        yield np.array(out[0].astype(mx.float32))


def quality(dirs: dict[str, Path], n_text: int, n_greedy: int) -> list[str]:
    from qwen_mlx.backends import load
    from qwen_mlx.backends.base import Session, greedy_tokens
    from qwen_mlx.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(dirs["float32"])
    ids = parity.text_ids(tokenizer, n_text)
    prompts = parity.parity_prompts(tokenizer)
    rows, greedy = [], {}
    for name, folder, dtype in (("float32 conversion", "float32", "float32"), ("GGUF blocks kept", "kept", None)):
        print(f"quality: {name} ...", file=sys.stderr, flush=True)
        loaded = load("mlx", str(dirs[folder]), dtype)
        ref = rows[0] if rows else None
        rows.append(parity.teacher_forced(name, parity.mlx_position_logits(loaded, ids), ids, ref, keep=ref is None))
        greedy[name] = {p: greedy_tokens(Session(loaded.backend), ids_, n_greedy) for p, ids_ in prompts.items()}
        del loaded
        parity.free_memory()
    print("quality: mlx-lm ...", file=sys.stderr, flush=True)
    from mlx_lm import load as mlx_lm_load

    model, _ = mlx_lm_load(str(dirs["kept"]))
    rows.append(parity.teacher_forced("mlx-lm, kept folder", mlx_lm_position_logits(model, ids), ids, rows[0]))
    del model
    lines = [f"Teacher-forced over the first {n_text} tokens of colorsys.py (token digest {parity.text_digest(ids)}), "
             f"{parity.CHUNK} positions per forward, quantized kernels as they run; against the float32 conversion.",
             "", "| model | perplexity | top-1 agreement | max abs logit diff |", "| --- | --- | --- | --- |"]
    lines += [f"| {q.name} | {q.perplexity:.4f} | {q.top1_agreement:.2%} | {q.max_abs_diff:.3g} |" for q in rows]
    lines += ["", f"Greedy, {n_greedy} tokens per parity-suite prompt, GGUF blocks kept vs float32 conversion:", "",
              "| prompt | identical | first differing step |", "| --- | --- | --- |"]
    a, b = greedy["GGUF blocks kept"], greedy["float32 conversion"]
    for p in prompts:
        first = next((i for i, (x, y) in enumerate(zip(a[p], b[p])) if x != y), None)
        lines.append(f"| {p} | {'yes' if first is None else 'NO'} | {'-' if first is None else first} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(prog=prog(__spec__.name), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--text-tokens", type=int, default=256)
    p.add_argument("--greedy", type=int, default=16)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-quality", action="store_true")
    a = p.parse_args()
    start = time.perf_counter()
    dirs = folders()
    out = [f"machine: {platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}", ""]
    if not a.skip_speed:
        out += speed(dirs, a.rounds, a.prompt_tokens, a.decode_tokens) + [""]
    if not a.skip_quality:
        out += quality(dirs, a.text_tokens, a.greedy) + [""]
    out.append(f"total {time.perf_counter() - start:.0f}s")
    print("\n".join(out))


if __name__ == "__main__":
    main()
