"""Decode speed at a long context, qwen-mlx beside mlx-lm in one process: one prefill each, then interleaved
decode rounds (many samples of the decode step without a prefill per sample, as bench_longctx.py needs).

    python benchmarks/decode_longctx.py MODEL_FOLDER PROMPT_TOKENS ROUNDS DECODE_TOKENS

qwen-mlx runs its engine (what `cli.py generate` runs); each round repeats the prompt, which its prefix cache
holds, so only the last prompt token is fed again. mlx-lm runs `generate_step` on its prompt cache, trimmed back
to the prompt after each round. Float32 on OpenBLAS, greedy, the first N tokens of the stdlib's typing.py.
"""
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_longctx import prompt_ids, token_times  # noqa: E402  its prompt and timing (this folder is sys.path[0])
from qwen_mlx import _blas  # noqa: E402,F401  first: OpenBLAS must be loaded before mlx
import mlx.core as mx
from qwen_mlx.checkpoint import prepare_model
from qwen_mlx.engine import local_engine
from qwen_mlx.mlx_backend import MLXBackend
from qwen_mlx.tokenizer import Tokenizer
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_sampler

M = sys.argv[1]; N = int(sys.argv[2]); ROUNDS = int(sys.argv[3]); DEC = int(sys.argv[4])
tok = Tokenizer.from_folder(M); tok.eos_token_ids = frozenset()
ids = prompt_ids(tok.encode, N)
backend = MLXBackend(prepare_model(M), "float32", None, None)
engine = local_engine(backend, tok)
def ours():
    times = token_times(engine, ids, DEC + 1)
    return DEC / (times[-1] - times[0])
model, _ = load(M); model.set_dtype(mx.float32); mx.eval(model.parameters())
cache = make_prompt_cache(model)
greedy = make_sampler(0.0)
t0 = time.perf_counter()
for _ in generate_step(mx.array(ids[:-1]), model, max_tokens=1, prompt_cache=cache, sampler=greedy):
    pass
trim_prompt_cache(cache, cache[0].offset - (N - 1))
print(f"mlx-lm prefill {time.perf_counter() - t0:.0f} s", flush=True)
def theirs():
    times = []
    for _ in generate_step(mx.array(ids[-1:]), model, max_tokens=DEC + 1, prompt_cache=cache, sampler=greedy):
        times.append(time.perf_counter())
    trim_prompt_cache(cache, cache[0].offset - (N - 1))
    return DEC / (times[-1] - times[0])
t0 = time.perf_counter(); ours(); print(f"ours prefill+ {time.perf_counter() - t0:.0f} s", flush=True)
res = {"ours": [], "mlx-lm": []}
for r in range(ROUNDS):
    for name, f in ([("ours", ours), ("mlx-lm", theirs)] if r % 2 == 0 else [("mlx-lm", theirs), ("ours", ours)]):
        res[name].append(f())
    print(f"round {r}: ours {res['ours'][-1]:.2f} mlx-lm {res['mlx-lm'][-1]:.2f} ratio {res['ours'][-1]/res['mlx-lm'][-1]:.2f}", flush=True)
print({k: round(statistics.median(v), 2) for k, v in res.items()})
