"""Decode speed at a long context, qwen-mlx beside mlx-lm in one process: one prefill each, then interleaved
decode rounds (many samples of the decode step without a prefill per sample, as bench_longctx.py needs).

    python -m benchmarks.speed.decode_longctx MODEL_FOLDER PROMPT_TOKENS ROUNDS DECODE_TOKENS

qwen-mlx runs its engine (what `cli.py generate` runs); each round repeats the prompt, which its prefix cache
holds, so only the last prompt token is fed again. mlx-lm runs `generate_step` on its prompt cache, trimmed back
to the prompt after each round. Float32 on OpenBLAS, greedy, the first N tokens of the stdlib's typing.py.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

from benchmarks.common import load_openblas, prog, round_order
from benchmarks.speed.bench_longctx import prompt_ids, token_times  # its prompt and timing

load_openblas()  # first: OpenBLAS must be loaded before mlx
import mlx.core as mx  # noqa: E402

from qwen_mlx.checkpoint import prepare_model  # noqa: E402
from qwen_mlx.engine import local_engine  # noqa: E402
from qwen_mlx.backends.mlx import MLXBackend  # noqa: E402
from qwen_mlx.tokenizer import Tokenizer  # noqa: E402


def ours(folder: str, ids: list[int], decode: int) -> Callable[[], float]:
    """A round of qwen-mlx's engine: the prompt again (served by its prefix cache), then `decode` tokens/s."""
    tok = Tokenizer.from_folder(folder)
    tok.eos_token_ids = frozenset()
    engine = local_engine(MLXBackend(prepare_model(folder), "float32", None, None), tok)

    def run() -> float:
        times = token_times(engine, ids, decode + 1)
        return decode / (times[-1] - times[0])
    t0 = time.perf_counter()
    run()
    print(f"ours prefill+ {time.perf_counter() - t0:.0f} s", flush=True)
    return run


def mlx_lm(folder: str, ids: list[int], decode: int) -> Callable[[], float]:
    """A round of mlx-lm's generate_step on its prompt cache, trimmed back to the prompt afterwards."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    model, _ = load(folder)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    cache, greedy, keep = make_prompt_cache(model), make_sampler(0.0), len(ids) - 1
    t0 = time.perf_counter()
    for _ in generate_step(mx.array(ids[:-1]), model, max_tokens=1, prompt_cache=cache, sampler=greedy):
        pass
    trim_prompt_cache(cache, cache[0].offset - keep)
    print(f"mlx-lm prefill {time.perf_counter() - t0:.0f} s", flush=True)

    def run() -> float:
        times = [time.perf_counter() for _ in generate_step(mx.array(ids[-1:]), model, max_tokens=decode + 1,
                                                             prompt_cache=cache, sampler=greedy)]
        trim_prompt_cache(cache, cache[0].offset - keep)
        return decode / (times[-1] - times[0])
    return run


def main() -> None:
    p = argparse.ArgumentParser(prog=prog(__spec__.name), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("prompt_tokens", type=int)
    p.add_argument("rounds", type=int)
    p.add_argument("decode_tokens", type=int)
    a = p.parse_args()
    ids = prompt_ids(Tokenizer.from_folder(a.model).encode, a.prompt_tokens)
    runners = {"ours": ours(a.model, ids, a.decode_tokens), "mlx-lm": mlx_lm(a.model, ids, a.decode_tokens)}
    res: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(a.rounds):
        for name in round_order(list(runners), r):
            res[name].append(runners[name]())
        print(f"round {r}: ours {res['ours'][-1]:.2f} mlx-lm {res['mlx-lm'][-1]:.2f} "
              f"ratio {res['ours'][-1] / res['mlx-lm'][-1]:.2f}", flush=True)
    print({k: round(statistics.median(v), 2) for k, v in res.items()})


if __name__ == "__main__":
    main()
