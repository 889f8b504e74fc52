"""`chat` and `generate`: one request at a time through the engine, in the caller's thread.

The same scheduler, batched backend, sampling and stop rules as the server, with a batch of one; what
the terminal needs on top is printable text pieces and the stats line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Sequence

from ..errors import QwenError
from .text import GenerationStats, check_stop_strings
from ..sampling import SamplingParams
from ..backends.batching import SerialBatch
from .requests import Done, Request, check_prompt_length
from .scheduler import Engine

if TYPE_CHECKING:
    from ..backends.base import Backend, Session
    from .speculative import Speculation
    from ..tokenizer import Tokenizer


def local_engine(backend: Backend, tokenizer: Tokenizer, session: Session | None = None) -> Engine:
    """The engine with a batch of one: the backend's batched implementation, or, given a `session` whose
    cache already holds a prefix (a saved prompt cache), that session as the one sequence's cache."""
    if session is None:
        return Engine.for_backend(backend, tokenizer)
    return Engine(SerialBatch(backend, session), tokenizer)


def stream_generate(engine: Engine, prompt: Sequence[int], params: SamplingParams, max_tokens: int,
                    stop: Sequence[str] = (), stats: GenerationStats | None = None,
                    speculation: Speculation | None = None) -> Iterator[str]:
    """Yield printable text pieces as they are decoded. Ends on an EOS token, a stop string (which is
    not yielded), `max_tokens`, or the end of the context. Fills `stats` when given. `speculation`:
    speculative decoding (qwen_mlx/engine/speculative.py), the same tokens sooner."""
    if max_tokens < 0:
        raise QwenError(f"--max-tokens must be >= 0, got {max_tokens}")
    check_stop_strings(stop)
    check_prompt_length(engine.backend.args, len(prompt))
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt)
    if max_tokens == 0:
        return
    for event in engine.stream(Request(list(prompt), params, max_tokens, tuple(stop), speculation=speculation)):
        if event.text:
            yield event.text
        if isinstance(event, Done):
            stats.prompt_tps = (event.prompt_tokens - event.cached_tokens) / max(event.prefill_seconds, 1e-9)
            stats.generation_tokens = event.completion_tokens
            stats.generation_tps = event.completion_tokens / max(event.decode_seconds, 1e-9) \
                if event.completion_tokens else 0.0
            stats.peak_memory_gb = engine.backend.peak_memory_gb()
            stats.draft_tokens, stats.accepted_tokens = event.draft_tokens, event.accepted_tokens


def generate(engine: Engine, prompt: Sequence[int], params: SamplingParams, max_tokens: int,
             stop: Sequence[str] = (), speculation: Speculation | None = None) -> tuple[str, GenerationStats]:
    """The whole reply at once, for scripts and tests."""
    stats = GenerationStats()
    text = "".join(stream_generate(engine, prompt, params, max_tokens, stop, stats, speculation))
    return text, stats
