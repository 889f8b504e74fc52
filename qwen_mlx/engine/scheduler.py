"""The scheduler: one thread owns the model and serves many requests with continuous batching.

Requests wait in a bounded queue, start when a slot is free (the backend reuses a cached prefix), prefill
in chunks (one chunk per step, so running streams keep flowing), then join the running batch: each step
is one batched forward for every running sequence. A request leaves at the token boundary where it ends
(EOS, a stop string, its grammar's end, max_tokens, the context's end) or is cancelled (its client left).
Sampling, stop strings and detokenizing are the generation loop's own (qwen_mlx.generate, .sampling),
per request; the engine only adds OpenAI's presence/frequency penalties and grammar masks.

Results go out through each request's `emit` callback, from the engine thread: zero or more `Token`s, then
exactly one `Done` or `Failed`. Every accepted request gets its final event, even on shutdown.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import numpy as np

from ..errors import QwenError
from ..generate import PREFILL_CHUNK, TextStream
from ..sampling import Sampler, SamplingParams

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer
    from .batching import BatchBackend


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


@dataclass
class _Live:
    req: Request
    emit: Callable[[Any], None]
    handle: Handle
    max_tokens: int
    sampler: Sampler
    out: TextStream
    seq: Any = None
    cached: int = 0
    fed: int = 0  # prompt tokens in the cache
    tokens: list[int] = field(default_factory=list)  # generated
    history: set[int] = field(default_factory=set)
    counts: collections.Counter = field(default_factory=collections.Counter)
    next_token: int = -1


class Engine:
    def __init__(self, backend: BatchBackend, tokenizer: Tokenizer, max_queue: int = 64,
                 prefill_chunk: int = PREFILL_CHUNK):
        self.backend = backend
        self.tokenizer = tokenizer
        self.context = backend.args.context_length
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self._cv = threading.Condition()
        self._waiting: collections.deque[_Live] = collections.deque()
        self._prefilling: list[_Live] = []
        self._running: list[_Live] = []
        self._closing = False
        self._deadline = 0.0
        self._step_time = 0.05  # moving average, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="qwen-mlx-engine", daemon=True)

    def start(self) -> Engine:
        self._thread.start()
        return self

    # --- called from other threads -----------------------------------------------------------------

    def submit(self, req: Request, emit: Callable[[Any], None]) -> Handle:
        """Queue `req`; its events go to `emit` (called from the engine thread). Raises QwenError for a
        request that cannot run, Overloaded when the queue is full, ShuttingDown after `shutdown`."""
        if not req.prompt:
            raise QwenError("the prompt is empty")
        if len(req.prompt) >= self.context:
            raise QwenError(f"the prompt has {len(req.prompt)} tokens; this model's context holds {self.context}")
        if req.max_tokens < 1:
            raise QwenError(f"max_tokens must be >= 1, got {req.max_tokens}")
        live = _Live(req, emit, Handle(), min(req.max_tokens, self.context - len(req.prompt)),
                     Sampler(req.params), TextStream(self.tokenizer, req.stop), history=set(req.prompt))
        with self._cv:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            busy = len(self._running) + len(self._prefilling) + len(self._waiting)
            if busy >= self.backend.max_batch + self.max_queue:  # every slot taken and the queue full
                raise Overloaded(max(1, round(self._step_time * 64)))
            self._waiting.append(live)
            self._cv.notify()
        return live.handle

    def cancel(self, handle: Handle) -> None:
        handle.cancel()
        with self._cv:
            self._cv.notify()

    @property
    def closing(self) -> bool:
        return self._closing

    def load(self) -> dict[str, int]:
        with self._cv:
            return {"running": len(self._running) + len(self._prefilling), "waiting": len(self._waiting),
                    "max_batch": self.backend.max_batch}

    def shutdown(self, grace: float = 10.0, wait: bool = True) -> None:
        """Refuse new requests; let those in flight finish for `grace` seconds, then end them with a
        clear error. With `wait`, return when the engine thread has stopped."""
        with self._cv:
            if not self._closing:
                self._closing = True
                self._deadline = time.monotonic() + grace
            self._cv.notify()
        if wait and self._thread.is_alive():
            self._thread.join()

    # --- the engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._waiting or self._prefilling or self._running or self._closing):
                    self._cv.wait()
                if self._closing:
                    while self._waiting:
                        self._emit(self._waiting.popleft(), Failed("the server is shutting down", 503))
                    if time.monotonic() >= self._deadline:
                        for live in self._prefilling + self._running:
                            self._finish(live, Failed("the server shut down before this reply finished", 503))
                        self._prefilling, self._running = [], []
                    if not (self._prefilling or self._running):
                        return
                self._drop_cancelled()
                while self._waiting and len(self._running) + len(self._prefilling) < self.backend.max_batch:
                    self._prefilling.append(self._waiting.popleft())
            t0 = time.perf_counter()
            try:
                self._step()
            except Exception as e:  # a failed forward: end everyone in flight, start clean
                for live in self._prefilling + self._running:
                    self._emit(live, Failed(f"generation failed: {type(e).__name__}: {e}"))
                self._prefilling, self._running = [], []
                self.backend.reset()
            self._step_time = 0.9 * self._step_time + 0.1 * (time.perf_counter() - t0)

    def _drop_cancelled(self) -> None:
        self._waiting = collections.deque(live for live in self._waiting if not live.handle.cancelled)
        for group in (self._prefilling, self._running):
            for live in [x for x in group if x.handle.cancelled]:
                group.remove(live)
                if live.seq is not None:
                    self.backend.release(live.seq)

    def _step(self) -> None:
        if self._prefilling:
            self._prefill_chunk(self._prefilling[0])
        if self._running:
            logits = self.backend.decode([x.seq for x in self._running], [x.next_token for x in self._running])
            for live, row in zip(list(self._running), logits):
                if self._advance(live, row):
                    self._running.remove(live)

    def _prefill_chunk(self, live: _Live) -> None:
        prompt = live.req.prompt
        if live.seq is None:
            live.seq, live.cached = self.backend.start(prompt)
            live.fed = live.cached
        chunk = prompt[live.fed:live.fed + self.prefill_chunk]
        logits = self.backend.prefill(live.seq, chunk)
        live.fed += len(chunk)
        if live.fed < len(prompt):
            return
        self._prefilling.remove(live)
        self.backend.remember(live.seq, prompt)  # later requests sharing this prompt's prefix skip it
        if not self._advance(live, logits):
            self._running.append(live)

    def _advance(self, live: _Live, logits: np.ndarray) -> bool:
        try:
            return self._next_token(live, logits)
        except QwenError as e:  # this request's grammar failed: end it alone
            self._finish(live, Failed(str(e)))
            return True

    def _next_token(self, live: _Live, logits: np.ndarray) -> bool:
        """Sample, emit and check the end rules for one token; True when the request is finished."""
        req = live.req
        raw = logits
        if live.counts and (req.presence_penalty or req.frequency_penalty):
            logits = apply_penalties(logits, live.counts, req.presence_penalty, req.frequency_penalty)
        if req.constraint is not None:
            logits = req.constraint.mask(logits)
        token = live.sampler(logits, live.history)
        if req.constraint is not None:
            req.constraint.accept(token)
        if token in self.tokenizer.eos_token_ids:
            self._finish(live, "stop")
            return True
        live.tokens.append(token)
        live.history.add(token)
        live.counts[token] += 1
        event = Token(token, live.out.add(token))
        if req.logprobs is not None:
            logprobs = log_softmax(raw)
            event.logprob = float(logprobs[token])
            if req.logprobs:
                top = np.argpartition(-logprobs, req.logprobs)[:req.logprobs]
                top = top[np.argsort(-logprobs[top], kind="stable")]
                event.top = [(int(i), float(logprobs[i])) for i in top]
        self._emit(live, event)
        if live.out.stopped or (req.constraint is not None and req.constraint.finished()):
            self._finish(live, "stop")
        elif len(live.tokens) >= live.max_tokens:
            self._finish(live, "length")
        else:
            live.next_token = token
            return False
        return True

    def _finish(self, live: _Live, end: str | Failed) -> None:
        if live.seq is not None:
            # The cache holds the prompt and every generated token fed back: keep it for the next turn.
            self.backend.release(live.seq, live.req.prompt + live.tokens if isinstance(end, str) else None)
        if isinstance(end, Failed):
            self._emit(live, end)
        else:
            self._emit(live, Done(end, live.out.finish(), len(live.req.prompt), len(live.tokens), live.cached))

    @staticmethod
    def _emit(live: _Live, event: Any) -> None:
        try:
            live.emit(event)
        except Exception:  # the client's event loop is gone: nothing to tell
            live.handle.cancel()


def apply_penalties(logits: np.ndarray, counts: collections.Counter, presence: float, frequency: float
                    ) -> np.ndarray:
    """OpenAI's rule: logit[t] -= frequency * count[t] + presence * (count[t] > 0), over generated tokens."""
    ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    n = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
    out = logits.copy()
    out[ids] -= frequency * n + presence
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - np.max(x)
    return x - np.log(np.sum(np.exp(x)))


def run_requests(engine: Engine, requests: Sequence[Request], timeout: float = 600.0) -> list[list[Any]]:
    """Submit `requests` together and wait for them all: each one's events (tests and benchmarks)."""
    events: list[list[Any]] = [[] for _ in requests]
    done = threading.Semaphore(0)

    def collector(i: int) -> Callable[[Any], None]:
        def emit(event: Any) -> None:
            events[i].append(event)
            if isinstance(event, (Done, Failed)):
                done.release()
        return emit

    for i, req in enumerate(requests):
        engine.submit(req, collector(i))
    for _ in requests:
        if not done.acquire(timeout=timeout):
            raise TimeoutError("the engine did not finish in time")
    return events
