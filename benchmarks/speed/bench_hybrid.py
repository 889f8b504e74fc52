"""The hybrid family on MLX: qwen-mlx beside mlx-lm on one random Qwen3.5 (Gated DeltaNet and gated attention),
large enough to be bound by memory bandwidth here, in one process with interleaved rounds.

    python -m benchmarks.speed.bench_hybrid /tmp/q35bench [--rounds 5] [--prompt 512] [--decode 32]

The first run writes the checkpoint (transformers' Qwen3_5ForConditionalGeneration with random weights: hidden
1024, 8 layers (6 linear, 2 full attention), the real 151,936-token vocabulary, tied embeddings; ~1.2 GB in
float32, a minimal vision tower beside it), with `rope_theta` and `partial_rotary_factor` also written where
mlx-lm reads them. Each runner is timed on its own forward path with a fresh cache per run: prefill is the
prompt to the first token's logits; decode feeds greedy tokens one at a time (qwen-mlx's Session, what the
engine drives; mlx-lm's `generate_step` with a greedy sampler). float32, as both run by default on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from benchmarks.common import load_openblas, prog, round_order

load_openblas()  # before mlx, for both runners
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

TEXT = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=2, head_dim=256, linear_num_key_heads=8, linear_num_value_heads=16,
            linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4, full_attention_interval=4,
            max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 10000000.0,
                                                            "partial_rotary_factor": 0.25})


def write_checkpoint(folder: Path, tokenizer: bool = False, **text: object) -> None:
    """Save the random Qwen3.5 (TEXT, with `text` overriding its fields, e.g. vocab_size=512) into `folder`, and
    with `tokenizer` the tiny tokenizer (benchmarks/checkpoints/tiny_tokenizer.py, Qwen2.5's chat template) for
    a vocabulary small enough that it covers every id (cli.py serve, mlx_lm.server)."""
    import torch
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    torch.manual_seed(0)
    text_config = dict(TEXT, **text)
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 4,
              "out_hidden_size": text_config["hidden_size"], "spatial_merge_size": 1, "temporal_patch_size": 1}
    config = Qwen3_5Config(text_config=text_config, vision_config=vision, tie_word_embeddings=True)
    Qwen3_5ForConditionalGeneration(config).to(torch.float32).save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    # where mlx-lm reads them (it takes tied embeddings from text_config)
    saved["text_config"].update(rope_theta=10000000.0, partial_rotary_factor=0.25, tie_word_embeddings=True)
    (folder / "config.json").write_text(json.dumps(saved, indent=2))
    if tokenizer:
        from benchmarks.checkpoints.tiny_tokenizer import write_tiny_tokenizer

        write_tiny_tokenizer(folder, vocab_size=text_config["vocab_size"])


class Ours:
    def __init__(self, folder: Path):
        from qwen_mlx.backends.mlx import MLXBackend
        from qwen_mlx.checkpoint import prepare_model

        self.backend = MLXBackend(prepare_model(str(folder)), "float32")

    def run(self, prompt: list[int], decode: int) -> tuple[float, float]:
        from qwen_mlx.backends.base import Session

        session = Session(self.backend)
        session.reset()
        t0 = time.perf_counter()
        logits = session.prefill(prompt)
        t1 = time.perf_counter()
        for _ in range(decode):
            logits = session.step(int(np.argmax(logits)))
        return t1 - t0, time.perf_counter() - t1


class MlxLm:
    def __init__(self, folder: Path):
        from mlx_lm.utils import load_model

        self.model, _ = load_model(folder)
        self.model.set_dtype(mx.float32)
        mx.eval(self.model.parameters())

    def run(self, prompt: list[int], decode: int) -> tuple[float, float]:
        from mlx_lm.generate import generate_step
        from mlx_lm.sample_utils import make_sampler

        t0 = time.perf_counter()
        times = []
        for _ in generate_step(mx.array(prompt), self.model, max_tokens=decode + 1, sampler=make_sampler(0.0)):
            times.append(time.perf_counter())
        return times[0] - t0, times[-1] - times[0]


def greedy(ours: Ours, theirs: MlxLm, prompt: list[int], n: int) -> int:
    """How many greedy tokens the two runners agree on, from the first (the same weights, float32)."""
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    from qwen_mlx.backends.base import Session, greedy_tokens

    mine = greedy_tokens(Session(ours.backend), prompt, n)
    other = [int(t) for t, _ in generate_step(mx.array(prompt), theirs.model, max_tokens=n, sampler=make_sampler(0.0))]
    return next((i for i, (x, y) in enumerate(zip(mine, other)) if x != y), n)


def main() -> None:
    p = argparse.ArgumentParser(prog=prog(__spec__.name), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="where the random checkpoint is (written on the first run)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    p.add_argument("--decode", type=int, default=32, help="decoded tokens")
    a = p.parse_args()
    if not (a.folder / "config.json").is_file():
        write_checkpoint(a.folder)
    prompt = np.random.default_rng(0).integers(3, TEXT["vocab_size"], size=a.prompt).tolist()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
          f"load average {os.getloadavg()[0]:.1f}; float32; prompt {a.prompt}, decode {a.decode} tokens, median of "
          f"{a.rounds} interleaved rounds", flush=True)
    runners = {"qwen-mlx": Ours(a.folder), "mlx-lm": MlxLm(a.folder)}
    names = list(runners)
    same = greedy(runners["qwen-mlx"], runners["mlx-lm"], prompt, a.decode)
    print(f"greedy tokens after the prompt: {same} of {a.decode} equal before the first difference", flush=True)
    for name in names:  # one warm-up each
        runners[name].run(prompt[:64], 4)
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for r in range(a.rounds):
        for name in round_order(names, r):
            prefill, decode = runners[name].run(prompt, a.decode)
            out[name].append((a.prompt / prefill, a.decode / decode))
        (p0, d0), (p1, d1) = out[names[0]][-1], out[names[1]][-1]
        print(f"round {r + 1}: qwen-mlx {p0:.1f} / {d0:.2f}, mlx-lm {p1:.1f} / {d1:.2f} tok/s (prefill / decode); "
              f"ratio {p0 / p1:.2f}x / {d0 / d1:.2f}x; load average {os.getloadavg()[0]:.1f}", flush=True)
    med = {n: (statistics.median(x for x, _ in v), statistics.median(y for _, y in v)) for n, v in out.items()}
    print("| runner | prefill tok/s | decode tok/s |")
    print("| --- | --- | --- |")
    for name in names:
        print(f"| {name} | {med[name][0]:.1f} | {med[name][1]:.2f} |")
    print(f"qwen-mlx / mlx-lm: prefill {med['qwen-mlx'][0] / med['mlx-lm'][0]:.2f}x, "
          f"decode {med['qwen-mlx'][1] / med['mlx-lm'][1]:.2f}x")


if __name__ == "__main__":
    main()
