"""What goes into the engine and what comes out: a request, its events, and the errors of admission.

Pure Python: the server (qwen_mlx.serve) builds `Request`s from HTTP bodies and turns the events back
into OpenAI's JSON; `chat` and `generate` read the same events (qwen_mlx.engine.local).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..errors import QwenError
from ..sampling import SamplingParams

if TYPE_CHECKING:
    from ..config import ModelArgs
    from .speculative import Speculation


class Constraint(Protocol):
    """A grammar that decides which tokens may come next (qwen_mlx.serve.grammar)."""

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """`logits` with every token the grammar forbids at -inf."""

    def accept(self, token: int) -> None: ...

    def finished(self) -> bool:
        """The grammar is complete and allows nothing more."""


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: off; k: the chosen token's logprob and the k most likely
    constraint: Constraint | None = None
    speculation: Speculation | None = None  # speculative decoding (qwen_mlx/engine/speculative.py)


@dataclass
class Token:
    id: int
    text: str  # the text this token makes printable ("" while held back)
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class Done:
    finish_reason: str  # "stop" or "length"
    text: str  # the held-back rest of the reply
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    prefill_seconds: float = 0.0  # from its first prefill chunk to the logits of its first token
    decode_seconds: float = 0.0   # from there to its end
    draft_tokens: int | None = None     # with speculative decoding: tokens drafted
    accepted_tokens: int | None = None  # and of those, kept


@dataclass
class Failed:
    message: str
    status: int = 500  # 503 when the server is shutting down


class Overloaded(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the server is at capacity; retry in {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    pass


class Handle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        """The client is gone: the engine frees its slot at the next step."""
        self.cancelled = True


def check_prompt_length(args: ModelArgs, n: int) -> None:
    """A prompt must leave room for at least one generated token; the error names what caps the context."""
    context = args.context_length
    if n >= context:
        caps = [reason for cap, reason in args.context_caps() if cap == context]
        raise QwenError(f"the prompt has {n} tokens; this model's context holds {context}"
                        + (f" (capped by {caps[0]})" if caps else ""))
