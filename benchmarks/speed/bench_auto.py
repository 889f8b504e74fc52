"""What runs where on this machine: each path `cli.py generate` can take on the real GGUF, beside llama.cpp on the
same file, in interleaved rounds (each row a fresh process per round, as a user runs it).

    python -m benchmarks.speed.bench_auto [--rounds 2] [--runners auto,mlx,mlx-blocks,llama.cpp]
        [--gguf FILE] [--llama-python PYTHON] [--prompt-chars 600] [--max-tokens 64]

Runners (`generate --raw`, greedy, the same prompt):
- auto: the default, `--backend auto` (no GPU here: the int4 ONNX export, made once into the cache; made
  before the timed rounds by a warm-up run, so its export time is not counted)
- auto-fp32: `--backend auto --dtype float32` (the float32 ONNX export)
- mlx: `--backend mlx`, the GGUF's blocks dequantized at load (the CPU default now)
- mlx-blocks: `--backend mlx --keep-quantized`, the GGUF's blocks on MLX's CPU quantized kernels (the old default)
- llama.cpp: llama-cpp-python (`--llama-python`: an interpreter that imports llama_cpp), 2 threads, greedy
- llama.cpp-passive: the same with OMP_WAIT_POLICY=PASSIVE (its OpenMP threads sleep instead of spinning
  between kernels, which is what a busy shared machine needs; not its default)
Prefill tok/s is the prompt's tokens over its time; decode tok/s the generated tokens over theirs, as the stats
line of `generate` reports them (llama.cpp's worker times the same two phases around `Llama.eval`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.common import REPO, prog, round_order

RUNNERS = {
    "auto": ("--backend", "auto"),
    "auto-fp32": ("--backend", "auto", "--dtype", "float32"),
    "mlx": ("--backend", "mlx"),
    "mlx-blocks": ("--backend", "mlx", "--keep-quantized"),
}
# The llama.cpp worker, run by an interpreter that has llama_cpp: greedy over raw logits, timed per phase.
LLAMA_WORKER = r"""
import json, sys, time
import numpy as np
import llama_cpp
from llama_cpp import Llama
path, text, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
llm = Llama(model_path=path, n_threads=2, n_threads_batch=2, n_ctx=2048, n_batch=512, verbose=False)
ids = llm.tokenize(text.encode(), add_bos=False, special=False)
t0 = time.perf_counter(); llm.eval(ids); t1 = time.perf_counter()
def last_logits():  # the last position's row (Llama.scores is filled only with logits_all)
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
out = []
for _ in range(n):
    out.append(int(np.argmax(last_logits())))
    llm.eval([out[-1]])
t2 = time.perf_counter()
print(json.dumps({"prompt_tokens": len(ids), "prompt_tps": len(ids) / (t1 - t0), "generation_tokens": n,
                  "generation_tps": n / (t2 - t1), "text": llm.detokenize(out).decode(errors="replace")}))
"""


def prompt_text(chars: int) -> str:
    """The start of the standard library's colorsys.py: code the coder model continues at length."""
    import colorsys

    return Path(colorsys.__file__).read_text(encoding="utf-8")[:chars]


def run_cli(runner: str, gguf: str, text: str, max_tokens: int) -> dict:
    env = dict(os.environ, QWEN_MLX_QUIET="1")
    env.pop("QWEN_MLX_BACKEND", None)
    r = subprocess.run([sys.executable, str(REPO / "cli.py"), "generate", "--model", gguf, "--raw", "--prompt", text,
                        "--temperature", "0", "--max-tokens", str(max_tokens), *RUNNERS[runner]],
                       capture_output=True, text=True, cwd=REPO, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{runner} failed: {r.stderr.strip().splitlines()[-1:]}")
    stats = json.loads(r.stderr.strip().splitlines()[-1])
    banner = next((line for line in r.stderr.splitlines() if line.startswith("backend auto:")), "")
    return {**stats, "text": r.stdout, "banner": banner}


def run_llama(python: str, gguf: str, text: str, max_tokens: int, passive: bool = False) -> dict:
    env = dict(os.environ, **({"OMP_WAIT_POLICY": "PASSIVE"} if passive else {}))
    r = subprocess.run([python, "-c", LLAMA_WORKER, gguf, text, str(max_tokens)], capture_output=True, text=True,
                       env=env)
    if r.returncode != 0:
        raise SystemExit(f"llama.cpp failed: {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(prog=prog(__spec__.name), description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", default=str(Path.home() / ".cache/qwen-mlx/real/qwen2.5-coder-0.5b-instruct.gguf"))
    ap.add_argument("--runners", default="auto,mlx,mlx-blocks,llama.cpp")
    ap.add_argument("--llama-python", default=None, help="an interpreter with llama_cpp (llama-cpp-python)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt-chars", type=int, default=600)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    runners = args.runners.split(",")
    llama = ("llama.cpp", "llama.cpp-passive")
    if any(r in llama for r in runners) and not args.llama_python:
        raise SystemExit("llama.cpp needs --llama-python")
    text = prompt_text(args.prompt_chars)
    for runner in runners:  # warm-up: make the exports (and GGUF conversions) once, untimed
        if runner not in llama:
            print(f"warm-up {runner}: {run_cli(runner, args.gguf, text, 2)['banner']}", file=sys.stderr, flush=True)
    results: dict[str, list[dict]] = {r: [] for r in runners}
    for i in range(args.rounds):
        for runner in round_order(runners, i):
            res = (run_llama(args.llama_python, args.gguf, text, args.max_tokens, runner == "llama.cpp-passive")
                   if runner in llama else run_cli(runner, args.gguf, text, args.max_tokens))
            results[runner].append(res)
            print(f"round {i + 1} {runner}: prefill {res['prompt_tps']:.1f} tok/s ({res['prompt_tokens']} tokens), "
                  f"decode {res['generation_tps']:.2f} tok/s ({res['generation_tokens']} tokens)",
                  file=sys.stderr, flush=True)
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| path | prefill tok/s (each round) | decode tok/s (each round) |")
    print("| --- | --- | --- |")
    for runner, rows in results.items():
        pre = " / ".join(f"{r['prompt_tps']:.1f}" for r in rows)
        dec = " / ".join(f"{r['generation_tps']:.2f}" for r in rows)
        print(f"| {runner} | {pre} (median {statistics.median(r['prompt_tps'] for r in rows):.1f}) "
              f"| {dec} (median {statistics.median(r['generation_tps'] for r in rows):.2f}) |")


if __name__ == "__main__":
    main()
