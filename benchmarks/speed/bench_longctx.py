"""Long prompts, float and quantized KV cache: qwen-mlx beside mlx-lm in one run, interleaved rounds.

    python -m benchmarks.speed.bench_longctx --model FOLDER [--prompt-tokens 4096,16384] [--kv-bits 0,8]
        [--decode-tokens 16] [--rounds 1]

Per case (prompt length, KV bits) and round, each runner runs in a fresh subprocess (its own peak memory,
nothing warm): greedy, no EOS stop, the same prompt ids (the first N tokens of the stdlib typing.py, which
ships with Python). Prefill = prompt tokens / time to the first token; decode = the following tokens / their
time. Both sides are float32 on OpenBLAS (qwen-mlx's default on a CPU). mlx-lm runs `stream_generate` with
`kv_bits`, `kv_group_size=64` and `quantized_kv_start=0`, so its cache is quantized from the start as ours
is (its default, 5000, would leave a 4K prompt's cache in float); `--mlx-lm-float-prefill` sets it to the prompt
length instead (mlx-lm's fastest way to reach a quantized decode: a float prefill, then the cache quantized).
Rounds alternate the runners' order.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
import typing
from pathlib import Path

from benchmarks.common import load_openblas, module_command, module_env, prog, round_order

TEXT = Path(typing.__file__).read_text(encoding="utf-8")  # ~27.7K tokens with Qwen2.5's tokenizer


def prompt_ids(encode, n: int) -> list[int]:
    ids = encode(TEXT)
    assert len(ids) >= n, f"the prompt text has only {len(ids)} tokens"
    return ids[:n]


def token_times(engine, ids: list[int], n: int) -> list[float]:
    """perf_counter() at each of the n greedy tokens qwen-mlx's engine streams after `ids`."""
    from qwen_mlx.engine import Request, Token
    from qwen_mlx.sampling import SamplingParams

    return [time.perf_counter() for event in engine.stream(Request(ids, SamplingParams(temperature=0.0), n))
            if isinstance(event, Token)]


def run_ours(model: str, n_prompt: int, n_decode: int, kv_bits: int) -> dict:
    """Through the engine, as `cli.py generate` runs (greedy, the backend's own decode loop)."""
    load_openblas()  # first: OpenBLAS must be loaded before mlx
    import mlx.core as mx

    from qwen_mlx.checkpoint import prepare_model
    from qwen_mlx.engine import local_engine
    from qwen_mlx.backends.mlx import MLXBackend
    from qwen_mlx.tokenizer import Tokenizer

    backend = MLXBackend(prepare_model(model), "float32", None, kv_bits or None)
    tokenizer = Tokenizer.from_folder(model)
    tokenizer.eos_token_ids = frozenset()  # decode exactly n_decode tokens
    ids = prompt_ids(tokenizer.encode, n_prompt)
    engine = local_engine(backend, tokenizer)
    mx.reset_peak_memory()  # the weights are loaded: peak memory counts them plus the run
    t0 = time.perf_counter()
    times = token_times(engine, ids, n_decode)
    return dict(prefill_s=times[0] - t0, decode_s=times[-1] - times[0], peak_gb=mx.get_peak_memory() / 1e9)


def run_mlx_lm(model: str, n_prompt: int, n_decode: int, kv_bits: int, kv_start: int = 0) -> dict:
    load_openblas()  # the same OpenBLAS qwen-mlx loads, before mlx
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    model_, tok = load(model)
    model_.set_dtype(mx.float32)
    mx.eval(model_.parameters())
    tok.eos_token_ids = set()  # decode exactly n_decode tokens
    ids = prompt_ids(lambda s: tok.encode(s, add_special_tokens=False), n_prompt)
    kv = dict(kv_bits=kv_bits, kv_group_size=64, quantized_kv_start=kv_start) if kv_bits else {}
    mx.reset_peak_memory()
    times = []
    t0 = time.perf_counter()
    for _ in stream_generate(model_, tok, ids, max_tokens=n_decode, sampler=make_sampler(0.0), **kv):
        times.append(time.perf_counter())
    return dict(prefill_s=times[0] - t0, decode_s=times[-1] - times[0], peak_gb=mx.get_peak_memory() / 1e9)


def worker(a: argparse.Namespace) -> None:
    if a.worker == "ours":
        r = run_ours(a.model, a.n, a.decode_tokens, a.bits)
    else:
        r = run_mlx_lm(a.model, a.n, a.decode_tokens, a.bits, a.n if a.mlx_lm_float_prefill else 0)
    r.update(prefill_tps=a.n / r["prefill_s"], decode_tps=(a.decode_tokens - 1) / r["decode_s"])
    print(json.dumps(r))


def main() -> None:
    p = argparse.ArgumentParser(prog=prog(__spec__.name), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompt-tokens", default="4096,16384")
    p.add_argument("--kv-bits", default="0,8", help="0 is the float cache")
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--mlx-lm-float-prefill", action="store_true",
                   help="mlx-lm's quantized_kv_start = the prompt length: it prefills into a float cache and quantizes "
                        "it before decoding (its quantized-cache prefill runs the CPU's quantized matmul, hours at 16K)")
    p.add_argument("--runners", default="ours,mlx-lm", help="which to run (one alone: to set a changed side "
                   "beside the other's row from an earlier run on the same machine)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--bits", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
          f"python {platform.python_version()}; load average {os.getloadavg()[0]:.1f} at start; "
          f"decode {a.decode_tokens} tokens; float32 weights and activations, OpenBLAS", flush=True)
    print("| prompt | KV | round | runner | prefill tok/s | decode tok/s | peak MLX GB | load avg |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    env = module_env(dict(os.environ, QWEN_MLX_QUIET="1"))
    runners = a.runners.split(",")
    for n in map(int, a.prompt_tokens.split(",")):
        for bits in map(int, a.kv_bits.split(",")):
            for r in range(a.rounds):
                for runner in round_order(runners, r):
                    cmd = module_command(__spec__.name, "--worker", runner, "--model", a.model, "--n", str(n),
                                         "--bits", str(bits), "--decode-tokens", str(a.decode_tokens)) + \
                        (["--mlx-lm-float-prefill"] if a.mlx_lm_float_prefill else [])
                    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    kv = f"{bits}-bit" if bits else "float"
                    if out.returncode:
                        print(f"| {n} | {kv} | {r} | {runner} | failed: {out.stderr.strip().splitlines()[-1]} |")
                        continue
                    x = json.loads(out.stdout.strip().splitlines()[-1])
                    print(f"| {n} | {kv} | {r} | {runner} | {x['prefill_tps']:.1f} | {x['decode_tps']:.2f} | "
                          f"{x['peak_gb']:.2f} | {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
