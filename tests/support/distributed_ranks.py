"""Run alone or under `mlx.launch`: greedy float32 tokens of a few requests through the engine, as JSON on
rank 0's stdout. Three prompts share a prefix and decode together (the batch and its padding), one runs
with prompt-lookup drafts (verify and rollback), one reuses a cached prefix, so every call the engine makes on
the backend is replayed on the other ranks (tests/test_distributed.py).

    python -m tests.support.distributed_ranks MODEL tensor|pipeline [KV_BITS]
"""

from __future__ import annotations

import json
import sys

from qwen_mlx.backends import load
from qwen_mlx.backends.distributed import set_parallel
from qwen_mlx.engine.requests import Done, Failed, Request, Token
from qwen_mlx.engine.scheduler import Engine, run_requests
from qwen_mlx.engine.speculative import Speculation
from qwen_mlx.sampling import SamplingParams

PROMPTS = [[5, 17, 33, 9, 41, 7, 23], [5, 17, 33, 9, 41, 100, 3, 12, 8], [5, 17, 60]]
REPEATING = [30, 31, 32, 33, 30, 31, 32, 33, 30, 31]  # prompt lookup finds drafts in it
MAX_TOKENS = 12


def main(model: str, mode: str, kv_bits: str | None = None) -> None:
    set_parallel(mode)
    loaded = load("mlx", model, "float32", None, kv_bits=int(kv_bits) if kv_bits else None)
    greedy = SamplingParams(temperature=0.0)
    engine = Engine.for_backend(loaded.backend, loaded.tokenizer, max_batch=4).start()
    batch = run_requests(engine, [Request(p, greedy, MAX_TOKENS) for p in PROMPTS])
    drafted = run_requests(engine, [Request(REPEATING, greedy, MAX_TOKENS, speculation=Speculation("prompt-lookup"))])
    again = run_requests(engine, [Request(PROMPTS[1] + [44, 45], greedy, MAX_TOKENS)])  # its prefix is cached
    engine.shutdown()
    events = batch + drafted + again
    print(json.dumps({"tokens": [[e.id for e in ev if isinstance(e, Token)] for ev in events],
                      "failed": [e.message for ev in events for e in ev if isinstance(e, Failed)],
                      "cached": [e.cached_tokens for ev in events for e in ev if isinstance(e, Done)],
                      "device": loaded.backend.device}))


if __name__ == "__main__":
    main(*sys.argv[1:])
