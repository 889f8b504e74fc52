"""What a user sees of a generation: streamed text cut at stop strings, and the stats line."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Sequence

from ..errors import QwenError

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    draft_tokens: int | None = None     # with speculative decoding: tokens drafted,
    accepted_tokens: int | None = None  # and of those, kept

    def as_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items() if v is not None}


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
