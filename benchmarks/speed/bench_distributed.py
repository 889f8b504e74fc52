"""One process against two ranks (`mlx.launch --backend ring -n 2` over loopback) on the real checkpoint:
qwen-mlx's `generate` alone, tensor parallel and pipeline parallel, and mlx-lm's own sharded benchmark
(`mlx_lm.benchmark`, tensor parallel) on the same folder, in one run.

    python -m benchmarks.speed.bench_distributed [--prompt-tokens 32] [--tokens 16]

Both ranks share this machine's cores (one BLAS thread each) and talk over loopback, so this shows what each
split costs in communication and what it saves in memory per rank, not the speed-up of two machines (each
with its own memory bandwidth, which is what bounds decode). mlx-lm runs with OpenBLAS preloaded, as qwen-mlx
loads it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.common import real_checkpoint

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = shutil.which("mlx.launch", path=str(Path(sys.executable).parent))
OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"


def run(args: list[str], ranks: int, env: dict | None = None) -> subprocess.CompletedProcess:
    python = [sys.executable, *args] if ranks == 1 else \
        [LAUNCH, "--backend", "ring", "-n", str(ranks), "--python", sys.executable, "--", *args]
    # Ranks sharing this machine's cores: one BLAS thread each, or their spinning threads starve each other.
    shared = {"OPENBLAS_NUM_THREADS": "1"} if ranks > 1 else {}
    out = subprocess.run(python, cwd=ROOT, env={**os.environ, "QWEN_MLX_QUIET": "1", **shared, **(env or {})},
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(python)}\n{out.stderr[-2000:]}")
    return out


def qwen_mlx(folder: Path, prompt: str, tokens: int, ranks: int, mode: str) -> dict:
    out = run(["cli.py", "generate", "--backend", "mlx", "--model", str(folder), "--prompt", prompt, "--raw",
               "--max-tokens", str(tokens), "--temperature", "0", "--parallel", mode], ranks)
    stats = json.loads([line for line in out.stderr.splitlines() if line.startswith("{")][-1])
    return {"prompt_tps": stats["prompt_tps"], "generation_tps": stats["generation_tps"],
            "peak_gb": stats["peak_memory_gb"], "text": out.stdout}


def mlx_lm(folder: Path, prompt_tokens: int, tokens: int, ranks: int) -> dict:
    out = run(["-m", "mlx_lm.benchmark", "--model", str(folder), "-p", str(prompt_tokens), "-g", str(tokens),
               "-n", "1"], ranks, env={"LD_PRELOAD": OPENBLAS} if Path(OPENBLAS).exists() else None)
    values = dict(re.findall(r"(\w+)=([\d.]+)", out.stdout.splitlines()[-1]))
    return {"prompt_tps": float(values["prompt_tps"]), "generation_tps": float(values["generation_tps"]),
            "peak_gb": float(values["peak_memory"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16)
    a = parser.parse_args()
    folder = real_checkpoint("float32")
    prompt = " ".join(["def reverse(s): return s[::-1]"] * (a.prompt_tokens // 10 + 1))
    rows = [("qwen-mlx, 1 process", qwen_mlx(folder, prompt, a.tokens, 1, "tensor")),
            ("qwen-mlx, 2 ranks, tensor", qwen_mlx(folder, prompt, a.tokens, 2, "tensor")),
            ("qwen-mlx, 2 ranks, pipeline", qwen_mlx(folder, prompt, a.tokens, 2, "pipeline")),
            ("mlx-lm, 1 process", mlx_lm(folder, a.prompt_tokens, a.tokens, 1)),
            ("mlx-lm, 2 ranks, tensor", mlx_lm(folder, a.prompt_tokens, a.tokens, 2))]
    same = {r["text"] for name, r in rows if "text" in r}
    print("| run | prefill tok/s | decode tok/s | peak GB (rank 0) |\n| --- | --- | --- | --- |")
    for name, r in rows:
        print(f"| {name} | {r['prompt_tps']:.1f} | {r['generation_tps']:.2f} | {r['peak_gb']:.2f} |")
    print(f"qwen-mlx's three replies identical: {len(same) == 1}")


if __name__ == "__main__":
    main()
