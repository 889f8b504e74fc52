"""The generation loop every backend shares: prefill, decode, sampling, stop rules, streaming, stats.

A backend only runs the model: it feeds tokens after those already in its KV cache and returns the
logits of the last position. Everything a user can observe (which token comes next, when to stop, what
is printed, the stats line) is decided here, once, so MLX, PyTorch and ONNX cannot drift apart.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence

import numpy as np

from .config import ModelArgs
from .errors import QwenError
from .sampling import Sampler, SamplingParams

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

PREFILL_CHUNK = 512  # bounds the attention scores and activations of a long prompt


class Backend(Protocol):
    name: str
    args: ModelArgs
    device: str  # said to the user: "mlx cpu", "onnxruntime CUDAExecutionProvider", ...

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        """Feed `tokens` after the cached ones; return float32 logits of the last position [vocab]."""

    @property
    def cache_length(self) -> int:
        """How many positions the KV cache holds."""

    def trim(self, length: int) -> None:
        """Keep only the first `length` cached positions."""

    def peak_memory_gb(self) -> float: ...


def process_peak_rss_gb() -> float:
    """The whole process's peak resident memory, for backends whose framework keeps no count of its own."""
    try:
        import resource  # POSIX only
    except ImportError:
        return 0.0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (1e9 if sys.platform == "darwin" else 1e6)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0

    def as_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass
class Session:
    """A backend plus the token ids its KV cache holds, so that a new prompt sharing a prefix with the
    last one (the next turn of a chat) prefills only what is new."""

    backend: Backend
    tokens: list[int] = field(default_factory=list)
    prefilled: int = 0  # tokens the last prefill actually ran (the rest came from the cache)

    def prefill(self, prompt: Sequence[int]) -> np.ndarray:
        """Make the cache hold exactly `prompt`; return the logits after its last token."""
        if not prompt:
            raise QwenError("the prompt is empty")
        common = 0
        limit = min(len(self.tokens), len(prompt) - 1)  # re-feed at least one token to get logits
        while common < limit and self.tokens[common] == prompt[common]:
            common += 1
        self.backend.trim(common)
        self.tokens = list(prompt[:common])
        self.prefilled = len(prompt) - common
        logits = None
        for start in range(common, len(prompt), PREFILL_CHUNK):
            logits = self._feed(list(prompt[start:start + PREFILL_CHUNK]))
        return logits

    def step(self, token: int) -> np.ndarray:
        return self._feed([token])

    def _feed(self, tokens: list[int]) -> np.ndarray:
        try:
            logits = self.backend.forward(tokens)
        except BaseException:
            # Ctrl-C can land mid-forward, after some layers appended to their cache: roll them back so
            # the cache and `self.tokens` agree and the session stays usable.
            self.backend.trim(len(self.tokens))
            raise
        self.tokens.extend(tokens)
        return logits

    def reset(self) -> None:
        self.backend.trim(0)
        self.tokens = []


def stream_generate(session: Session, tokenizer: Tokenizer, prompt: Sequence[int], params: SamplingParams,
                    max_tokens: int, stop: Sequence[str] = (), stats: GenerationStats | None = None,
                    ) -> Iterator[str]:
    """Yield printable text pieces as they are decoded. Ends on an EOS token, a stop string (which is
    not yielded), `max_tokens`, or the end of the context. Fills `stats` when given."""
    if max_tokens < 0:
        raise QwenError(f"--max-tokens must be >= 0, got {max_tokens}")
    check_stop_strings(stop)
    context = session.backend.args.context_length
    if len(prompt) >= context:
        caps = [reason for cap, reason in session.backend.args.context_caps() if cap == context]
        raise QwenError(f"the prompt has {len(prompt)} tokens; this model's context holds {context}"
                        + (f" (capped by {caps[0]})" if caps else ""))
    max_tokens = min(max_tokens, context - len(prompt))
    stats = stats if stats is not None else GenerationStats()
    sampler = Sampler(params)
    history = set(prompt)
    out = TextStream(tokenizer, stop)

    t0 = time.perf_counter()
    logits = session.prefill(prompt) if max_tokens else None
    t1 = time.perf_counter()
    stats.prompt_tokens = len(prompt)
    stats.prompt_tps = session.prefilled / max(t1 - t0, 1e-9) if max_tokens else 0.0
    n = 0
    while n < max_tokens:
        token = sampler(logits, history)
        if token in tokenizer.eos_token_ids:
            break
        n += 1
        history.add(token)
        piece = out.add(token)
        if piece:
            yield piece
        if out.stopped or n == max_tokens:
            break
        logits = session.step(token)
    piece = out.finish()
    if piece:
        yield piece
    t2 = time.perf_counter()
    stats.generation_tokens = n
    stats.generation_tps = n / max(t2 - t1, 1e-9) if n else 0.0
    stats.peak_memory_gb = session.backend.peak_memory_gb()


class TextStream:
    """Generated token ids -> printable text pieces, cut at the first stop string.

    Text that could be the start of a stop string is held back until it is known not to be one, so a
    stop string is never printed; `stopped` says one was hit. Joined pieces plus `finish()` are the
    reply. The server's engine shares it, so the CLI and the API stop identically."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.stop = [s for s in stop if s]
        self.detok = tokenizer.detokenizer()
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text, self.printed, self.stopped = "", 0, False

    def add(self, token: int) -> str:
        self.text += self.detok.add_token(token)
        hit = _find_stop(self.text, self.stop)
        if hit is not None:
            self.text, self.stopped = self.text[:hit], True
            return ""  # finish() prints the rest up to the stop string
        if len(self.text) - self.holdback > self.printed:
            piece = self.text[self.printed:len(self.text) - self.holdback]
            self.printed += len(piece)
            return piece
        return ""

    def finish(self) -> str:
        """The held-back rest of the reply (the detokenizer flushed, stop strings cut)."""
        if not self.stopped:
            self.text += self.detok.finalize()
            hit = _find_stop(self.text, self.stop)
            self.text = self.text if hit is None else self.text[:hit]
        piece = self.text[self.printed:]
        self.printed = len(self.text)
        return piece


def check_stop_strings(stop: Sequence[str]) -> None:
    """An empty stop string matches before the first token (and would make the print hold-back negative):
    it is a mistake in the caller's input, so it is refused rather than guessed at."""
    if any(not isinstance(s, str) or s == "" for s in stop):
        raise QwenError("--stop: a stop string must be non-empty text")


def _find_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else None


def generate(session: Session, tokenizer: Tokenizer, prompt: Sequence[int], params: SamplingParams,
             max_tokens: int, stop: Sequence[str] = ()) -> tuple[str, GenerationStats]:
    """The whole reply at once, for scripts and tests."""
    stats = GenerationStats()
    text = "".join(stream_generate(session, tokenizer, prompt, params, max_tokens, stop, stats))
    return text, stats


def greedy_tokens(session: Session, prompt: Sequence[int], n: int) -> list[int]:
    """n greedy token ids with no EOS rule: the cross-backend parity check."""
    logits = session.prefill(prompt)
    out: list[int] = []
    for i in range(n):
        out.append(int(np.argmax(logits)))
        if i + 1 < n:
            logits = session.step(out[-1])
    return out
