"""Dual Chunk Attention against plain attention on MLX, same checkpoint, one run: prefill and decode tok/s.

    python benchmarks/bench_dca.py --model FOLDER [--chunks 2048/256,8192/1024] [--prompt-tokens 4096]
        [--decode-tokens 32] [--rounds 2] [--dtype float32]

For each `chunk_size/local_size` a copy of FOLDER (weights linked, not copied) gets that
`dual_chunk_attention_config` (original_max_position_embeddings = the model's trained length, so no
scaling); all configurations are loaded in one process and run in interleaved rounds, timed as
benchmarks/bench_mlx.py times them: prefill = time to the first token, decode = the next tokens / their time.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = (ROOT / "cli.py").read_text() + (ROOT / "README.md").read_text()


def run_all(configs: dict[str, str], dtype: str, n_prompt: int, n_decode: int, rounds: int) -> dict[str, list[dict]]:
    """All configurations in one process (weights loaded once each), interleaved round by round."""
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from qwen_mlx.checkpoint import prepare_model
    from qwen_mlx.generate import Session
    from qwen_mlx.mlx_backend import MLXBackend
    from qwen_mlx.tokenizer import Tokenizer

    backends = {name: MLXBackend(prepare_model(folder), dtype) for name, folder in configs.items()}
    ids = (Tokenizer.from_folder(next(iter(configs.values()))).encode(TEXT) * 8)[:n_prompt]
    results: dict[str, list[dict]] = {name: [] for name in configs}
    for r in range(rounds):
        for name, backend in backends.items():
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


def with_dca(model: Path, chunk: int, local: int, out: Path) -> Path:
    out.mkdir()
    for f in model.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f.resolve())
    config = json.loads((model / "config.json").read_text())
    config["dual_chunk_attention_config"] = {"chunk_size": chunk, "local_size": local,
                                             "original_max_position_embeddings": config["max_position_embeddings"]}
    (out / "config.json").write_text(json.dumps(config))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--chunks", default="2048/256,8192/1024")
    p.add_argument("--prompt-tokens", type=int, default=4096)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        configs = {"plain": a.model}
        for spec in a.chunks.split(","):
            chunk, local = (int(x) for x in spec.split("/"))
            configs[f"DCA {chunk}/{local}"] = str(with_dca(Path(a.model), chunk, local, Path(tmp) / spec.replace("/", "-")))
        results = run_all(configs, a.dtype, a.prompt_tokens, a.decode_tokens, a.rounds)
    print(f"{platform.machine()} {platform.system()}, MLX {a.dtype}, prompt {a.prompt_tokens}, "
          f"decode {a.decode_tokens}, best of {a.rounds} interleaved rounds")
    print("| attention | prefill tok/s | decode tok/s |\n| --- | --- | --- |")
    for name, rows in results.items():
        print(f"| {name} | {max(x['prefill_tok_s'] for x in rows):.1f} | {max(x['decode_tok_s'] for x in rows):.2f} |")


if __name__ == "__main__":
    main()
