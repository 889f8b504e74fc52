"""Dual Chunk Attention against plain attention on MLX, same checkpoint, one run: prefill and decode tok/s.

    python -m benchmarks.speed.bench_dca --model FOLDER [--chunks 2048/256,8192/1024] [--prompt-tokens 4096]
        [--decode-tokens 32] [--rounds 2] [--dtype float32]

For each `chunk_size/local_size`, the loaded model's layers take that Dual Chunk Attention (no attention
scaling); one model in one process runs every configuration in interleaved rounds, timed as
benchmarks/speed/bench_mlx.py times them: prefill = time to the first token, decode = the next tokens / their time.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

from benchmarks.common import REPO, prog

TEXT = (REPO / "cli.py").read_text() + (REPO / "README.md").read_text()


def run_all(model: str, specs: dict[str, object], dtype: str, n_prompt: int, n_decode: int,
            rounds: int) -> dict[str, list[dict]]:
    """One model in memory; each configuration sets every layer's `dual_chunk` (None: plain attention) and
    prefills afresh, in interleaved rounds."""
    import numpy as np

    from qwen_mlx.checkpoint import prepare_model
    from qwen_mlx.backends.base import Session
    from qwen_mlx.backends.mlx import MLXBackend
    from qwen_mlx.tokenizer import Tokenizer

    backend = MLXBackend(prepare_model(model), dtype)
    ids = (Tokenizer.from_folder(model).encode(TEXT) * 8)[:n_prompt]
    results: dict[str, list[dict]] = {name: [] for name in specs}
    for r in range(rounds):
        for name, spec in specs.items():
            for layer in backend.model.model.layers:
                layer.self_attn.dual_chunk = spec
            backend.trim(0)
            session = Session(backend)
            t0 = time.perf_counter()
            token = int(np.argmax(session.prefill(ids)))
            t1 = time.perf_counter()
            for _ in range(n_decode - 1):
                token = int(np.argmax(session.step(token)))
            t2 = time.perf_counter()
            results[name].append(dict(prefill_tok_s=n_prompt / (t1 - t0), decode_tok_s=(n_decode - 1) / (t2 - t1)))
            print(f"round {r + 1} {name}: {results[name][-1]}", file=sys.stderr, flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(prog=prog(__spec__.name), description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--chunks", default="2048/256,8192/1024")
    p.add_argument("--prompt-tokens", type=int, default=4096)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()
    from qwen_mlx.dual_chunk import DualChunk

    specs: dict[str, object] = {"plain": None}
    for spec in a.chunks.split(","):
        chunk, local = (int(x) for x in spec.split("/"))
        specs[f"DCA {chunk}/{local}"] = DualChunk(chunk, local)
    results = run_all(a.model, specs, a.dtype, a.prompt_tokens, a.decode_tokens, a.rounds)
    print(f"{platform.machine()} {platform.system()}, MLX {a.dtype}, prompt {a.prompt_tokens}, "
          f"decode {a.decode_tokens}, best of {a.rounds} interleaved rounds")
    print("| attention | prefill tok/s | decode tok/s |\n| --- | --- | --- |")
    for name, rows in results.items():
        print(f"| {name} | {max(x['prefill_tok_s'] for x in rows):.1f} | {max(x['decode_tok_s'] for x in rows):.2f} |")


if __name__ == "__main__":
    main()
