"""The batched backend interface the engine drives, and its serial fallback for one-sequence backends.

A `BatchBackend` owns the KV caches of many sequences. The engine starts a sequence (the backend reuses
the longest prefix it has cached), prefills it in chunks on its own, then hands it to `decode`, which runs
one forward for every running sequence: the backend notices who joined and who left since the last call
and reshapes its batch at that token boundary. Pure Python: MLX's implementation is qwen_mlx/backends/mlx_batch.py.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import numpy as np

from ..config import ModelArgs
from .base import Backend, Session
from ..sampling import Draw, SamplingParams


class BatchBackend(Protocol):
    args: ModelArgs
    device: str
    max_batch: int

    def start(self, prompt: Sequence[int]) -> tuple[Any, int]:
        """A new sequence whose cache already holds the longest cached prefix of `prompt` (at most
        len(prompt) - 1 tokens, so the last one is fed and gives logits); returns (sequence, cached)."""

    def prefill(self, seq: Any, tokens: Sequence[int]) -> np.ndarray:
        """Feed `tokens` after the sequence's cache, alone; float32 logits of the last position [vocab]."""

    def decode(self, seqs: Sequence[Any], tokens: Sequence[int]) -> np.ndarray:
        """One token per sequence, one batched forward; float32 logits [len(seqs), vocab]."""

    def prefill_batch(self, seqs: Sequence[Any], chunks: Sequence[Sequence[int]]) -> np.ndarray:
        """`prefill` for several sequences in one forward: float32 logits [len(seqs), vocab]. Optional."""

    def samples_on_device(self, params: Sequence[SamplingParams]) -> bool:
        """Whether sampling rows with these parameters on the device beats copying their logits to numpy
        (always on an MLX GPU). Where it does, the engine calls `decode_sampled` and `read` instead of
        `decode` for steps in which no row needs its logits on the host. Optional."""

    def decode_sampled(self, seqs: Sequence[Any], tokens: Sequence[int] | Any, draws: Sequence[Draw]) -> Any:
        """Like `decode`, then each row's next token sampled on the device by `draws`; returns at once,
        the work queued. `tokens` may be the previous call's result (same sequences, same order): the
        step then starts from tokens the host has not seen."""

    def read(self, pending: Any) -> list[int]:
        """The tokens a `decode_sampled` call picked (waits for them)."""

    def remember(self, seq: Any, tokens: Sequence[int]) -> None:
        """Keep what `seq`'s cache holds (`tokens`) as a prefix for later requests; `seq` goes on."""

    def release(self, seq: Any, tokens: Sequence[int] | None = None) -> None:
        """Forget `seq`. With `tokens` (what its cache holds), keep them as a prefix for later requests."""

    def reset(self) -> None:
        """Drop every sequence (after a failed forward: the caches may be half written)."""

    def peak_memory_gb(self) -> float: ...


class SerialSeq:
    def __init__(self, prompt: Sequence[int]):
        self.tokens: list[int] = []
        self.prompt = list(prompt)


class SerialBatch:
    """Any `Backend` (one KV cache) as a BatchBackend of at most one sequence.

    The single cache is a `Session`, which already reuses the prefix shared with the previous request
    (the next turn of a chat): `start` reports it as cached, and the first `prefill` feeds only the rest.
    The Session rolls its cache back when a forward fails or is interrupted, so what it holds is always
    known: it is kept across released, cancelled and failed sequences alike."""

    max_batch = 1

    def __init__(self, backend: Backend, session: Session | None = None):
        self.backend = backend
        self.args = backend.args
        self.device = backend.device
        self.session = session or Session(backend)  # one may come with its cache filled (a saved prompt)
        # Speculative decoding where the backend can feed several tokens for all their logits and go back.
        self.verify = self._verify if hasattr(backend, "forward_all") else None
        # An MTP drafter reads the one cache's hidden states (MLXBackend.mtp, set when the layer is attached).
        self.keeps_hidden = getattr(backend, "mtp", None) is not None
        self._verified: tuple[int, Any, list[int]] | None = None

    def start(self, prompt: Sequence[int]) -> tuple[SerialSeq, int]:
        seq = SerialSeq(prompt)
        common = self.session.reuse(prompt)
        seq.tokens = list(prompt[:common])
        seq.mtp = getattr(self.backend, "mtp", None)  # the one cache's: it lives across sequences, as the Session
        return seq, common

    def prefill(self, seq: SerialSeq, tokens: Sequence[int]) -> np.ndarray:
        seq.tokens.extend(tokens)
        return self.session.prefill(seq.tokens)  # feeds only what the cache lacks

    def decode(self, seqs: Sequence[SerialSeq], tokens: Sequence[int]) -> np.ndarray:
        assert len(seqs) == 1, "a serial backend runs one sequence at a time"
        seqs[0].tokens.append(tokens[0])
        return self.session.step(tokens[0])[None]

    def _verify(self, seq: SerialSeq, tokens: Sequence[int]) -> np.ndarray:
        """BatchBackend.verify on the one cache: logits of every position; `rollback` goes back from it."""
        snapshot = self.backend.snapshot()
        try:
            logits = self.backend.forward_all(tokens)
        except BaseException:  # as Session._feed: a forward cut short leaves the cache as it was
            self.backend.rewind(snapshot)
            raise
        self._verified = (len(self.session.tokens), snapshot, list(tokens))
        self.session.tokens.extend(tokens)
        seq.tokens.extend(tokens)
        return logits

    def rollback(self, seq: SerialSeq, kept: int) -> None:
        """Keep the first `kept` of the tokens the last `verify` fed (MLXBackend.rewind)."""
        start, snapshot, fed = self._verified
        dropped = len(self.session.tokens) - start - kept
        if dropped <= 0:
            return
        del seq.tokens[len(seq.tokens) - dropped:]
        del self.session.tokens[start:]
        try:
            self.backend.rewind(snapshot, fed, kept)
        except BaseException:
            self.backend.rewind(snapshot)
            raise
        self.session.tokens.extend(fed[:kept])

    def remember(self, seq: SerialSeq, tokens: Sequence[int]) -> None:
        pass  # the one cache is the Session's: it keeps the last sequence anyway

    def release(self, seq: SerialSeq, tokens: Sequence[int] | None = None) -> None:
        pass  # the Session's tokens say what its cache holds, whatever became of the sequence

    def reset(self) -> None:
        pass  # likewise: a failed or interrupted forward was rolled back by the Session

    def peak_memory_gb(self) -> float:
        return self.backend.peak_memory_gb()


def batch_backend(backend: Backend, max_batch: int) -> BatchBackend:
    """The backend's own batched implementation when it has one (a batch of one included: `chat` and
    `generate` then run exactly as the server does), else the serial fallback."""
    batched = getattr(backend, "batched", None)
    impl = batched(max_batch) if batched is not None else None
    return impl if impl is not None else SerialBatch(backend)


Layers = list[tuple[Any, Any]]


def regroup(rows: Sequence[Any], seqs: Sequence[Any], joined: Callable[[Any], bool]) -> tuple[list[int], list[Any]]:
    """A batch's next rows: (indices of the current `rows` kept, in order; the sequences of `seqs` that join, whose
    prefilled state `joined` says they carry). Kept rows keep their order and joining ones come last, the layout
    every batch's reshape relies on; anything else is a ValueError."""
    wanted = {id(s) for s in seqs}
    keep = [i for i, r in enumerate(rows) if id(r) in wanted]
    joining = [s for s in seqs if joined(s)]
    if [rows[i] for i in keep] + joining != list(seqs):
        raise ValueError("sequences must keep their order and new ones come last")
    return keep, joining


def _first(layers: Layers, n: int) -> Layers:
    return [(k[..., :n, :], v[..., :n, :]) for k, v in layers]


class PrefixCache:
    """An LRU of cached sequences (token ids and each layer's (keys, values) B=1 K T D), for reuse by
    requests that share a prefix. Framework-neutral: `cut(layers, n)` keeps the first n positions (by default
    `[..., :n, :]` slicing); `own` turns a slice into an array that holds its own memory (not a view pinning a
    larger buffer). With `whole`, an entry is reused only whole (a recurrent state is valid at its own length
    and no shorter one)."""

    def __init__(self, budget: int, own: Callable[[Layers], Layers], cut: Callable[[Layers, int], Layers] = _first,
                 whole: bool = False):
        self.budget = budget  # cached positions, over all entries
        self.own, self.cut, self.whole = own, cut, whole
        self.entries: list[tuple[np.ndarray, Layers]] = []  # most recently used last

    def lookup(self, prompt: Sequence[int]) -> tuple[list[tuple[Any, Any]] | None, int]:
        """The layers of the longest cached prefix of `prompt`, cut to it (at most len - 1 positions)."""
        ids = np.asarray(prompt, dtype=np.int64)
        best, best_len = None, 0
        for i, (tokens, _) in enumerate(self.entries):
            n = min(len(tokens), len(ids) - 1)
            diff = np.flatnonzero(tokens[:n] != ids[:n])
            common = int(diff[0]) if diff.size else n
            if self.whole and common < len(tokens):
                continue
            if common > best_len:
                best, best_len = i, common
        if best is None:
            return None, 0
        entry = self.entries.pop(best)
        self.entries.append(entry)
        return self.cut(entry[1], best_len), best_len

    def store(self, tokens: Sequence[int], layers: list[tuple[Any, Any]]) -> None:
        ids = np.asarray(tokens, dtype=np.int64)
        if not 0 < len(ids) <= self.budget:
            return
        layers = self.own(self.cut(layers, len(ids)))
        # An entry that is a prefix of the new one is superseded by it, unless entries are only reused whole:
        # then only the same tokens are (a chat's prompt stays beside its finished conversation, for a reply
        # that the next turn keeps only in part).
        self.entries = [(t, kv) for t, kv in self.entries
                        if not (len(t) <= len(ids) and np.array_equal(t, ids[:len(t)]))
                        or (self.whole and len(t) < len(ids))]
        self.entries.append((ids, layers))
        while sum(len(t) for t, _ in self.entries) > self.budget:
            self.entries.pop(0)
