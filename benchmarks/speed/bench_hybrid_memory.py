"""Memory at long context: a random Qwen3.5 (Gated DeltaNet + full attention) beside a random dense Qwen3 of
the same hidden size, layers and MLP, both in qwen-mlx, after prefilling N tokens.

    python -m benchmarks.speed.bench_hybrid_memory /tmp/hybrid_memory [--contexts 4096,16384] [--mlx-lm 4096]

The first run writes both checkpoints under the folder (float32, random weights, the tiny 512-id tokenizer so
the vocabulary costs nothing): `qwen3_5` is benchmarks/speed/bench_hybrid.py's model (hidden 1024, 8 layers of
which 6 Gated DeltaNet and 2 full attention with 2 KV heads x 256); `qwen3` is a dense Qwen3 with Qwen3-0.6B's
attention (16 heads, 8 KV heads x 128) in all 8 layers. Each (model, context) point runs in a fresh subprocess:
load the model in float32, prefill N random token ids the way `generate` and `chat` do (qwen-mlx's Session
over MLXBackend: chunks of 512, a recurrent layer's state marked after each chunk), then read

- KV: the attention layers' keys and values for the N positions (what grows with the context), and the bytes
  their buffers hold (allocated in steps of 256 positions);
- state: the Gated DeltaNet layers' conv windows and delta-rule matrices, and the extra bytes their marks
  (earlier states kept for going back to a chunk boundary, at most 4) pin beyond the current state;
- MLX holds: MLX's active memory after the prefill minus after loading (what the cache really keeps alive), as
  the prefill left it, after evaluating the last chunk's state, and after copying each conv window out of the
  chunk buffer it is a view of (what the cache would hold if its arrays owned their memory);
- peak MLX: `mx.get_peak_memory()` from after loading through the prefill (weights, cache and the largest
  chunk's transient activations); max RSS: the process's peak resident memory (numpy's attention softmax
  buffers included, qwen_mlx/models/base.py).

`predicted` is `cli.py info`'s figure for the same folder: its KV KiB per token in 16-bit, doubled for
float32, times N, plus its recurrent state in float32. `--mlx-lm CONTEXTS` adds mlx-lm 0.32's figures for the
Qwen3.5 folder at those contexts (its `generate_step` prefill in steps of 2048 tokens and one decode step, so its
cache holds N + 1 positions; its caches' `nbytes`, a KV buffer grown in steps of 256 positions).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import time
from pathlib import Path

from benchmarks.common import load_openblas, module_command, module_env, prog

VOCAB = 512
DENSE = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": VOCAB, "hidden_size": 1024,
         "intermediate_size": 3072, "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 8,
         "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 40960,
         "tie_word_embeddings": True, "bos_token_id": VOCAB - 5, "eos_token_id": VOCAB - 3, "torch_dtype": "float32"}
MODELS = ("qwen3_5", "qwen3")


def write_models(root: Path) -> None:
    if not (root / "qwen3_5" / "config.json").is_file():
        from benchmarks.speed.bench_hybrid import write_checkpoint

        write_checkpoint(root / "qwen3_5", tokenizer=True, vocab_size=VOCAB, max_position_embeddings=40960)
    if not (root / "qwen3" / "config.json").is_file():
        from benchmarks.checkpoints.make_bench_model import write_model

        write_model(root / "qwen3", {**DENSE})


def info(folder: Path) -> dict:
    """`cli.py info`'s KV cache per token (16-bit) and recurrent state (float32), and the parameter count."""
    from benchmarks.common import REPO

    out = subprocess.run(module_command("cli", "info", "--model", str(folder)), cwd=REPO, env=module_env(),
                         capture_output=True, text=True, check=True).stdout
    kv = re.search(r"KV cache\s+([\d.]+) KiB per token in 16-bit", out)
    state = re.search(r"state\s+([\d.]+) MiB in float32", out)
    total = re.search(r"total\s+([\d,]+)", out)
    return {"kv_kib_16bit": float(kv.group(1)), "state_mib": float(state.group(1)) if state else 0.0,
            "params": int(total.group(1).replace(",", ""))}


def random_prompt(n: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(0).integers(3, VOCAB - 8, size=n).tolist()  # below the tokenizer's added tokens


def measure_ours(folder: Path, n: int) -> dict:
    load_openblas()  # before mlx
    import mlx.core as mx

    from qwen_mlx.backends.base import Session
    from qwen_mlx.backends.mlx import MLXBackend
    from qwen_mlx.checkpoint import prepare_model
    from qwen_mlx.models.cache import KVCache, RecurrentCache

    backend = MLXBackend(prepare_model(str(folder)), "float32")
    loaded = mx.get_active_memory()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    Session(backend).prefill(random_prompt(n))
    seconds = time.perf_counter() - t0
    mx.synchronize()
    kv_valid = kv_alloc = state = marks = 0
    for c in backend.cache:
        if isinstance(c, KVCache):
            kv_valid += c.keys[..., :c.offset, :].nbytes + c.values[..., :c.offset, :].nbytes
            kv_alloc += c.keys.nbytes + c.values.nbytes
        elif isinstance(c, RecurrentCache):
            state += c.nbytes
            current = {id(x) for x in c.state}
            pinned = {id(x): x.nbytes for _, *arrays in c.marks for x in arrays if x is not None}
            marks += sum(size for key, size in pinned.items() if key not in current)
    assert backend.cache_length == n
    peak, rss = mx.get_peak_memory(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    held = mx.get_active_memory() - loaded
    # What the cache would hold if each of its arrays owned its memory: the last chunk's state evaluated, and
    # each conv window (a view of the last K-1 rows of its chunk's conv input) copied out.
    recurrent = [c for c in backend.cache if isinstance(c, RecurrentCache)]
    mx.eval([c.state for c in recurrent], [x for c in recurrent for _, *arrays in c.marks for x in arrays])
    evaluated = mx.get_active_memory() - loaded
    copies: dict[int, mx.array] = {}

    def own(x: mx.array | None) -> mx.array | None:
        return None if x is None else copies.setdefault(id(x), mx.contiguous(x))

    for c in recurrent:
        c.conv = own(c.conv)
        c.marks = [(at, own(conv), recurrent_) for at, conv, recurrent_ in c.marks]
    mx.eval(list(copies.values()))
    owned = mx.get_active_memory() - loaded
    return {"kv_valid": kv_valid, "kv_alloc": kv_alloc, "state": state, "marks": marks, "cache_mlx": held,
            "cache_evaluated": evaluated, "cache_owned": owned, "weights": loaded, "peak": peak, "rss": rss,
            "seconds": seconds}


def measure_mlx_lm(folder: Path, n: int) -> dict:
    load_openblas()  # the same OpenBLAS, before mlx
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    model, _ = load_model(folder)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    loaded = mx.get_active_memory()
    mx.reset_peak_memory()
    cache = make_prompt_cache(model)
    t0 = time.perf_counter()
    for _ in generate_step(mx.array(random_prompt(n)), model, max_tokens=1, prompt_cache=cache):
        pass  # the prompt, then one token (its step adds a position to the cache)
    seconds = time.perf_counter() - t0
    mx.synchronize()
    kv = [c for c in cache if hasattr(c, "keys")]  # its KVCache (the full-attention layers), the rest ArraysCache
    kv_valid = sum(c.keys[..., :c.offset, :].nbytes + c.values[..., :c.offset, :].nbytes for c in kv)
    state = sum(c.nbytes for c in cache if not hasattr(c, "keys"))
    held = mx.get_active_memory() - loaded
    return {"kv_valid": kv_valid, "kv_alloc": sum(c.nbytes for c in kv), "state": state, "marks": 0,
            "positions": kv[0].offset, "cache_mlx": held, "cache_evaluated": held, "cache_owned": held,
            "weights": loaded, "peak": mx.get_peak_memory(),
            "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "seconds": seconds}


def worker(runner: str, folder: Path, n: int) -> None:
    out = (measure_mlx_lm if runner == "mlx-lm" else measure_ours)(folder, n)
    print("RESULT " + json.dumps(out), flush=True)


def point(runner: str, folder: Path, n: int) -> dict:
    """One (runner, model, context) in a fresh process."""
    from benchmarks.common import REPO

    cmd = module_command(__spec__.name, "--worker", runner, str(folder), str(n))
    done = subprocess.run(cmd, cwd=REPO, env=module_env(), capture_output=True, text=True, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode or line is None:
        raise RuntimeError(f"{runner} {folder.name} {n}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def mib(x: float) -> str:
    return f"{x / 2**20:,.1f}"


def main() -> None:
    p = argparse.ArgumentParser(prog=prog(__spec__.name), description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, nargs="?", help="where the two random checkpoints are (written on the first run)")
    p.add_argument("--contexts", default="4096,16384", help="prompt tokens per point, comma-separated")
    p.add_argument("--mlx-lm", default="", metavar="CONTEXTS",
                   help="also mlx-lm's figures for the Qwen3.5 folder at these contexts (comma-separated)")
    p.add_argument("--worker", nargs=3, metavar=("RUNNER", "FOLDER", "N"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a.worker[0], Path(a.worker[1]), int(a.worker[2]))
        return
    if a.folder is None:
        p.error("the folder is required")
    write_models(a.folder)
    contexts = [int(x) for x in a.contexts.split(",")]
    infos = {m: info(a.folder / m) for m in MODELS}
    loads = [os.getloadavg()[0]]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
          "float32; a fresh process per point", flush=True)
    for m in MODELS:
        i = infos[m]
        print(f"{m}: {i['params']:,} parameters; info: KV {i['kv_kib_16bit']} KiB/token in 16-bit "
              f"({2 * i['kv_kib_16bit']} float32), state {i['state_mib']} MiB", flush=True)
    theirs = {int(x) for x in a.mlx_lm.split(",") if x}
    rows = []
    for n in sorted(set(contexts) | theirs):
        for runner, m in [("qwen-mlx", m) for m in MODELS if n in contexts] + [("mlx-lm", "qwen3_5")] * (n in theirs):
            r = point(runner, a.folder / m, n)
            i = infos[m]
            predicted = 2 * i["kv_kib_16bit"] * 1024 * n + i["state_mib"] * 2**20
            rows.append((runner, m, n, r, predicted))
            loads.append(os.getloadavg()[0])
            print(f"{runner} {m} {n}: prefill {r['seconds']:.1f} s ({n / r['seconds']:.0f} tok/s), "
                  f"cache {mib(r['kv_valid'] + r['state'])} MiB, peak {r['peak'] / 1e9:.2f} GB; "
                  f"load average {loads[-1]:.1f}", flush=True)
    print(f"\nload average {min(loads):.1f}-{max(loads):.1f}\n")
    print("| runner | model | context | KV MiB (buffers) | state MiB (+ marks) | KV + state MiB | predicted MiB (info) "
          "| MLX holds MiB: as left / evaluated / owned | peak MLX GB | max RSS GB | prefill tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for runner, m, n, r, predicted in rows:
        print(f"| {runner} | {m} | {n} | {mib(r['kv_valid'])} ({mib(r['kv_alloc'])}) | {mib(r['state'])} "
              f"(+{mib(r['marks'])}) | {mib(r['kv_valid'] + r['state'])} | {mib(predicted)} | {mib(r['cache_mlx'])} / "
              f"{mib(r['cache_evaluated'])} / {mib(r['cache_owned'])} | {r['peak'] / 1e9:.2f} | {r['rss'] / 1e9:.2f} "
              f"| {n / r['seconds']:.0f} |")
    print("\nweights (MLX active after loading): " + ", ".join(
        f"{m} {next(r['weights'] for _, mm, _, r, _ in rows if mm == m) / 1e9:.2f} GB" for m in MODELS))

if __name__ == "__main__":
    main()
