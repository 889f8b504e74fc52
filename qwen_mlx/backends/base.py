"""What every backend shares: the backend interface and the Session over its KV cache.

A backend only runs the model: it feeds tokens after those already in its KV cache and returns the
logits of the last position. Everything a user can observe (which token comes next, when to stop, what
is printed, the stats line) is decided once, above the backends, so MLX, PyTorch and ONNX cannot drift
apart: here and in the engine (qwen_mlx.engine), which runs the loop for the server, `chat` and `generate`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from ..config import ModelArgs
from ..errors import QwenError

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
        """Keep at most the first `length` cached positions (fewer where the cache cannot go back exactly
        there: `cache_length` then says what it kept)."""

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
        common = self.reuse(prompt)
        self.prefilled = len(prompt) - common
        logits = None
        for start in range(common, len(prompt), PREFILL_CHUNK):
            logits = self._feed(list(prompt[start:start + PREFILL_CHUNK]))
        return logits

    def reuse(self, prompt: Sequence[int]) -> int:
        """Keep the longest prefix of `prompt` (at most all but its last token, which is fed for logits) that
        the cache holds and can go back to; returns its length. A KV cache goes back anywhere; a recurrent
        state only to a position the backend marked, so the kept prefix may be shorter than the shared one."""
        common, limit = 0, min(len(self.tokens), len(prompt) - 1)
        while common < limit and self.tokens[common] == prompt[common]:
            common += 1
        self.backend.trim(common)
        self.tokens = list(prompt[:self.backend.cache_length])
        return len(self.tokens)

    def step(self, token: int) -> np.ndarray:
        return self._feed([token])

    def _feed(self, tokens: list[int]) -> np.ndarray:
        try:
            logits = self.backend.forward(tokens)
        except BaseException:
            # Ctrl-C can land mid-forward, after some layers appended to their cache: roll them back so
            # the cache and `self.tokens` agree and the session stays usable.
            self.backend.trim(len(self.tokens))
            del self.tokens[self.backend.cache_length:]
            raise
        self.tokens.extend(tokens)
        return logits

    def reset(self) -> None:
        self.backend.trim(0)
        self.tokens = []


def greedy_tokens(session: Session, prompt: Sequence[int], n: int) -> list[int]:
    """n greedy token ids with no EOS rule: the cross-backend parity check."""
    logits = session.prefill(prompt)
    out: list[int] = []
    for i in range(n):
        out.append(int(np.argmax(logits)))
        if i + 1 < n:
            logits = session.step(out[-1])
    return out
