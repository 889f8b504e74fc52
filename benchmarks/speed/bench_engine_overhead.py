"""Per-token overhead of the serving engine beside mlx-lm, where the forward costs almost nothing.

A 2-layer, hidden-64 Qwen2 with the real 151,936-token vocabulary and tokenizer (random weights): decode
speed is then sampling, detokenizing and bookkeeping. Both sides use Qwen's sampling (temperature 0.7,
top-k 20, top-p 0.8, repetition penalty 1.05), float32, on MLX's default device, in interleaved rounds:

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python -m benchmarks.speed.bench_engine_overhead

Rows: our engine with one request, our engine with 8 concurrent requests (aggregate), each with logits
sampled on the host (numpy) and on the MLX device with pipelined steps (what the engine picks on a GPU),
and mlx-lm's `stream_generate` with one request. `--greedy` runs all of it greedy instead.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import prog, real_checkpoint

QWEN_SAMPLING = dict(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05)


def build_model(out: Path) -> Path:
    """Random 2-layer hidden-64 Qwen2 with the real checkpoint's vocabulary and tokenizer files."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    real = real_checkpoint("float32", progress=False)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, eos_token_id=151645)
    Qwen2ForCausalLM(config).to(torch.float32).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(real / name, out / name)
    return out


def run_ours(folder: Path, n_tokens: int, clients: int, sampling: dict, on_device: bool) -> float:
    from qwen_mlx.backends import load
    from qwen_mlx.engine import Engine, Request, Token, run_requests
    from qwen_mlx.backends.batching import batch_backend
    from qwen_mlx.sampling import SamplingParams

    loaded = load("mlx", str(folder), "float32")
    backend = batch_backend(loaded.backend, max(clients, 2))
    backend.device_sampling = "always" if on_device else "never"
    engine = Engine(backend, loaded.tokenizer).start()
    try:
        prompt = loaded.tokenizer.encode_chat([{"role": "user", "content": "Write a story about a robot."}])
        reqs = [Request(prompt, SamplingParams(seed=i, **sampling), n_tokens) for i in range(clients)]
        run_requests(engine, reqs[:1])  # warm up
        t0 = time.perf_counter()
        events = run_requests(engine, reqs)
        dt = time.perf_counter() - t0
    finally:
        engine.shutdown(0)
    return sum(1 for ev in events for e in ev if isinstance(e, Token)) / dt


def run_mlx_lm(folder: Path, n_tokens: int, sampling: dict) -> float:
    from mlx_lm import load as lm_load
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    model, tokenizer = lm_load(str(folder))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Write a story about a robot."}],
                                           add_generation_prompt=True)
    sampler = make_sampler(temp=sampling["temperature"], top_p=sampling.get("top_p", 1.0),
                           top_k=sampling.get("top_k", 0))
    processors = make_logits_processors(repetition_penalty=sampling.get("repetition_penalty"))
    last = None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=n_tokens, sampler=sampler,
                                logits_processors=processors):
        pass
    return last.generation_tps


def main() -> None:
    p = argparse.ArgumentParser(prog=prog(__spec__.name), description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--greedy", action="store_true", help="temperature 0 instead of Qwen's sampling")
    a = p.parse_args()
    sampling = {"temperature": 0.0} if a.greedy else QWEN_SAMPLING
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model(Path(tmp))
        for _ in range(a.rounds):  # interleaved: each round runs every side once
            for clients in (1, 8):
                for on_device in (False, True):
                    name = (f"qwen-mlx engine, {clients} request{'s (aggregate)' if clients > 1 else ''}, "
                            f"{'device sampling, pipelined' if on_device else 'numpy sampling'}")
                    rows.setdefault(name, []).append(run_ours(folder, a.tokens, clients, sampling, on_device))
            rows.setdefault("mlx-lm stream_generate, 1 request", []).append(run_mlx_lm(folder, a.tokens, sampling))
    print(f"{'greedy' if a.greedy else 'Qwen sampling'}, load average {os.getloadavg()[0]:.1f}\n")
    print(f"| decode tok/s, {a.tokens} tokens, median of {a.rounds} rounds | tok/s |")
    print("| --- | --- |")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values):.1f} |")


if __name__ == "__main__":
    main()
