"""The scheduler: the generation loop of the server, `chat` and `generate`, with continuous batching.

Requests wait in a bounded queue, start when a slot is free (the backend reuses a cached prefix), prefill
in chunks (one chunk per step, so running streams keep flowing), then join the running batch: each step
is one batched forward for every running sequence. A request leaves at the token boundary where it ends
(EOS, a stop string, its grammar's end, max_tokens, the context's end) or is cancelled (its client left).
Sampling rules, stop strings and detokenizing are shared with the rest of the package (qwen_mlx.sampling,
qwen_mlx.engine.text.TextStream); the engine adds OpenAI's presence/frequency penalties and grammar masks.

Two ways to run it: the server starts its thread (`start`, `submit`), and results go out through each
request's `emit` callback, from that thread: zero or more `Token`s, then exactly one `Done` or `Failed`;
every accepted request gets its final event, even on shutdown. `chat` and `generate` call `stream`, which
steps the engine in their own thread (a batch of one), so Ctrl-C lands where they can catch it.

Where the backend samples on its device (`samples_on_device`: an MLX GPU), a step whose rows all allow
it never copies logits to the host: the backend samples there, and the next forward is queued from those
tokens before the host reads them (as mlx-lm pipelines with `mx.async_eval`), so detokenizing and
streaming overlap the device's work. A row with a grammar, logprobs or OpenAI penalties needs its logits
on the host: while one runs, steps run unpipelined with numpy sampling, as on a CPU.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import QwenError
from ..backends.base import PREFILL_CHUNK
from ..sampling import Draw, Sampler, apply_penalties, log_softmax
from ..backends.batching import batch_backend
from .speculative import Drafter, PromptLookup, Speculator
from .text import TextStream
from .requests import Done, Failed, Handle, Overloaded, Request, ShuttingDown, Token, check_prompt_length

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..tokenizer import Tokenizer
    from ..backends.batching import BatchBackend


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
    started: float = 0.0    # its first prefill chunk
    prefilled: float = 0.0  # its first logits
    spec: Speculator | None = None  # speculative decoding, when the request asked for it
    holding: bool = False   # a speculative step is emitting: the cache is settled once it has finished
    ended: str | None = None  # how a request that finished while holding ended

    @property
    def on_device(self) -> bool:
        """Its tokens can be sampled where its logits are: nothing needs them on the host."""
        req = self.req
        return req.constraint is None and req.logprobs is None and \
            not (req.presence_penalty or req.frequency_penalty) and self.spec is None


class Engine:
    def __init__(self, backend: BatchBackend, tokenizer: Tokenizer, max_queue: int = 64,
                 prefill_chunk: int = PREFILL_CHUNK):
        self.backend = backend
        self.tokenizer = tokenizer
        self.context = backend.args.context_length
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.cancelled = 0  # requests dropped because their client left
        self._cv = threading.Condition()
        self._waiting: collections.deque[_Live] = collections.deque()
        self._prefilling: list[_Live] = []
        self._running: list[_Live] = []
        # A decode step queued on the device whose sampled tokens the host has not read yet, and its rows.
        self._on_device = getattr(backend, "samples_on_device", None)
        self._pending: Any = None
        self._pending_rows: list[_Live] = []
        self._closing = False
        self._deadline = 0.0
        self._step_time = 0.05  # moving average, for Retry-After
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qwen-mlx-engine", daemon=True)
        # Speculative decoding's drafters by method; a draft model is added by whoever loads one.
        self.drafters: dict[str, Drafter] = {"prompt-lookup": PromptLookup()}

    @classmethod
    def for_backend(cls, backend: Backend, tokenizer: Tokenizer, max_batch: int = 1, **kwargs: Any) -> Engine:
        """An engine over `backend`'s own batched implementation (qwen_mlx.backends.batching.batch_backend)."""
        return cls(batch_backend(backend, max_batch), tokenizer, **kwargs)

    def start(self) -> Engine:
        self._thread.start()
        return self

    # --- called from other threads -----------------------------------------------------------------

    def submit(self, req: Request, emit: Callable[[Any], None]) -> Handle:
        """Queue `req`; its events go to `emit` (called from the engine thread). Raises QwenError for a
        request that cannot run, Overloaded when the queue is full, ShuttingDown after `shutdown`."""
        if not req.prompt:
            raise QwenError("the prompt is empty")
        check_prompt_length(self.backend.args, len(req.prompt))
        if req.max_tokens < 1:
            raise QwenError(f"max_tokens must be >= 1, got {req.max_tokens}")
        live = _Live(req, emit, Handle(), min(req.max_tokens, self.context - len(req.prompt)),
                     Sampler(req.params), TextStream(self.tokenizer, req.stop), history=set(req.prompt),
                     spec=self._speculator(req))
        with self._cv:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            busy = len(self._running) + len(self._prefilling) + len(self._waiting)
            if busy >= self.backend.max_batch + self.max_queue:  # every slot taken and the queue full
                raise Overloaded(max(1, round(self._step_time * 64)))
            self._waiting.append(live)
            self._cv.notify()
        return live.handle

    def _speculator(self, req: Request) -> Speculator | None:
        """The request's speculative decoding, checked: its drafter loaded, the backend able to verify. A
        request bound by a grammar decodes plainly (each drafted token would need the grammar's mask)."""
        method = req.speculation and req.speculation.method
        if method is None or req.constraint is not None:
            return None
        if getattr(self.backend, "verify", None) is None:
            raise QwenError("speculative decoding needs the mlx backend")
        if method not in self.drafters:
            raise QwenError(f"speculative method {method!r} is not available here"
                            + {"draft-model": ": start with --draft-model PATH", "mtp": ": start with --mtp"}.get(
                                method, ""))
        if method == "mtp" and not getattr(self.backend, "keeps_hidden", False):
            # a backend that keeps no hidden states to draft from (its MTP layer attached after it was built)
            raise QwenError("--mtp: this engine keeps no hidden states; load the MTP layer before building it")
        return Speculator(self.drafters[method], req.speculation.k)

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
                    "max_batch": self.backend.max_batch, "cancelled": self.cancelled}

    def shutdown(self, grace: float = 10.0, wait: bool = True) -> None:
        """Refuse new requests; let those in flight finish for `grace` seconds, then end them with a
        clear error. With `wait`, return when the engine thread has stopped."""
        with self._cv:
            if not self._closing:
                self._closing = True
                self._deadline = time.monotonic() + grace
            self._cv.notify()
        if wait and self._thread.ident is not None:
            self._stopped.wait()

    # --- in the caller's thread --------------------------------------------------------------------

    def stream(self, req: Request) -> Iterator[Token | Done]:
        """Run `req` to its end in the calling thread (the engine's own thread must not be started):
        its `Token`s, then its `Done`. An exception inside a step (Ctrl-C, a failed forward) ends the
        request and propagates as is; the engine stays usable, and what its caches hold stays correct."""
        if self._thread.ident is not None:
            raise RuntimeError("this engine runs its own thread: use submit()")
        self._abandon()  # a previous stream whose reader stopped early
        events: collections.deque[Any] = collections.deque()
        self.submit(req, events.append)
        try:
            while True:
                while events:
                    event = events.popleft()
                    if isinstance(event, Failed):
                        raise QwenError(event.message)
                    yield event
                    if isinstance(event, Done):
                        return
                with self._cv:
                    self._admit()
                try:
                    self._step()
                except BaseException:
                    self._abandon(broken=True)
                    raise
        finally:
            self._abandon()  # the reader stopped early (Ctrl-C while it printed): drop the request

    def _abandon(self, broken: bool = False) -> None:
        """Drop every request in flight without an event. `broken`: a step failed part way, so the
        backend's batch state is not trusted either."""
        with self._cv:
            lives = list(self._waiting) + self._prefilling + self._running
            self._waiting.clear()
        self._prefilling, self._running = [], []
        self._drop_pending()
        if broken:
            self.backend.reset()
            return
        for live in lives:
            if live.seq is not None:
                self.backend.release(live.seq)

    # --- the engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._stopped.set()
        # Parked, not ended: a thread that ran MLX and ends while the interpreter shuts down aborts the
        # process (MLX's per-thread destructor takes the GIL from a finalizing interpreter: "terminate
        # called without an active exception", exit status 134, after a clean server shutdown; mlx 0.32
        # on Linux). A parked daemon thread is simply dropped at exit.
        threading.Event().wait()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._waiting or self._prefilling or self._running or self._pending or self._closing):
                    self._cv.wait()
                if self._closing:
                    while self._waiting:
                        self._emit(self._waiting.popleft(), Failed("the server is shutting down", 503))
                    if time.monotonic() >= self._deadline:
                        for live in self._prefilling + self._running:
                            self._finish(live, Failed("the server shut down before this reply finished", 503))
                        self._prefilling, self._running = [], []
                    if not (self._prefilling or self._running):
                        self._drop_pending()
                        return
                self._admit()
            try:
                self._step()
            except Exception as e:  # a failed forward: end everyone in flight, start clean
                for live in self._prefilling + self._running:
                    self._emit(live, Failed(f"generation failed: {type(e).__name__}: {e}"))
                self._prefilling, self._running = [], []
                self._drop_pending()
                self.backend.reset()

    def _drop_pending(self) -> None:
        """Forget the queued step once the device has finished it, so nothing the engine queued runs on
        behind it (after a reply the process may exit; after a failure the backend is reset). Its error,
        if any, is moot: this is called when its rows are gone."""
        pending, self._pending, self._pending_rows = self._pending, None, []
        if pending is not None:
            try:
                self.backend.read(pending)
            except Exception:  # noqa: S110 (the step's rows were already failed or dropped)
                pass

    def _admit(self) -> None:
        """Under the lock: forget cancelled requests, and start waiting ones while there are free slots."""
        if any(live.handle.cancelled for live in self._waiting):
            self.cancelled += sum(live.handle.cancelled for live in self._waiting)
            self._waiting = collections.deque(live for live in self._waiting if not live.handle.cancelled)
        for group in (self._prefilling, self._running):
            for live in [x for x in group if x.handle.cancelled]:
                group.remove(live)
                self.cancelled += 1
                if live.seq is not None:
                    self.backend.release(live.seq)
        while self._waiting and len(self._running) + len(self._prefilling) < self.backend.max_batch:
            self._prefilling.append(self._waiting.popleft())

    def _step(self) -> None:
        t0 = time.perf_counter()
        if self._prefilling:
            self._prefill()
        if self._pending is not None:
            self._decode_pipelined()
        elif self._running:
            self._decode()
        self._step_time = 0.9 * self._step_time + 0.1 * (time.perf_counter() - t0)

    def _prefill(self) -> None:
        """The next chunk of the first prompt waiting to prefill, and with it (where the backend has
        `prefill_batch`) those of the next ones, while the padded batch stays within one chunk's size."""
        group: list[tuple[_Live, list[int]]] = []
        for live in self._prefilling:
            if live.seq is None:
                live.started = time.perf_counter()
                live.seq, live.cached = self.backend.start(live.req.prompt)
                mtp = live.spec is not None and live.req.speculation.method == "mtp"
                if getattr(live.seq, "mtp", None) is not None and not mtp:
                    live.seq.mtp = None  # its hidden states would feed no MTP drafter (qwen_mlx/models/mtp.py)
                live.fed = live.cached
            chunk = live.req.prompt[live.fed:live.fed + self.prefill_chunk]
            if group and (len(group) + 1) * max(len(chunk), *(len(c) for _, c in group)) > self.prefill_chunk:
                break
            group.append((live, chunk))
            if getattr(self.backend, "prefill_batch", None) is None:  # optional in the BatchBackend protocol
                break
        if len(group) > 1:
            logits = self.backend.prefill_batch([x.seq for x, _ in group], [c for _, c in group])
        else:
            logits = [self.backend.prefill(group[0][0].seq, group[0][1])]
        for (live, chunk), row in zip(group, logits):
            live.fed += len(chunk)
            if live.fed < len(live.req.prompt):
                continue
            live.prefilled = time.perf_counter()
            self._prefilling.remove(live)
            self.backend.remember(live.seq, live.req.prompt)  # later requests sharing this prefix skip it
            if not self._advance(live, row):
                self._running.append(live)

    def _decode(self) -> None:
        rows = list(self._running)
        alone = rows[0] if len(rows) == 1 and rows[0].spec is not None else None
        if alone is not None and alone.spec.active():
            self._speculate(alone)
            return
        t0 = time.perf_counter()
        seqs, tokens = [x.seq for x in rows], [x.next_token for x in rows]
        if self._samples_on_device(rows):
            # Queue the forward and the sampling; the tokens are read at the next step, once the step
            # after this one is queued behind them.
            self._pending = self.backend.decode_sampled(seqs, tokens, self._draws(rows))
            self._pending_rows = rows
            return
        logits = self.backend.decode(seqs, tokens)
        for live, row in zip(rows, logits):
            if self._advance(live, row):
                self._running.remove(live)
        if alone is not None:  # what speculation has to beat
            alone.spec.observe_plain(time.perf_counter() - t0)

    def _speculate(self, live: _Live) -> None:
        """One speculative step of a request decoding alone (qwen_mlx/engine/speculative.py): its next token
        and the drafts after it in one forward, the kept ones emitted, the cache rolled back past the rest."""
        spec, t0 = live.spec, time.perf_counter()
        room = live.max_tokens - len(live.tokens) - 1  # the step emits up to one token beyond its drafts
        drafts, probs = spec.drafter.propose(live.req.prompt + live.tokens, min(spec.k, room), live.sampler,
                                             live.history, live.seq) if room > 0 else ([], None)
        if not drafts:  # nothing to guess from: a plain step
            logits = self.backend.decode([live.seq], [live.next_token])
            if self._advance(live, logits[0]):
                self._running.remove(live)
            return
        logits = self.backend.verify(live.seq, [live.next_token, *drafts])
        out = self._judge(live, logits, drafts, probs)
        accepted = next((i for i, (t, d) in enumerate(zip(out, drafts)) if t != d), min(len(out), len(drafts)))
        self.backend.rollback(live.seq, 1 + accepted)  # the cache: what it held, the token fed, the drafts kept
        spec.observe(len(drafts), accepted, len(out), time.perf_counter() - t0)
        before, live.holding = len(live.tokens), True
        try:
            finished = any(self._accept(live, token, row) for token, row in zip(out, logits))
        finally:
            live.holding = False
        if finished:
            self._running.remove(live)
            # the reply ended inside the kept drafts: the cache keeps only what the reply holds
            self.backend.rollback(live.seq, 1 + min(len(live.tokens) - before, accepted))
            self.backend.release(live.seq, live.req.prompt + live.tokens if live.ended else None)

    def _judge(self, live: _Live, logits: np.ndarray, drafts: list[int], probs: np.ndarray | None) -> list[int]:
        """The tokens a speculative step emits: each position decided by `Sampler.verify` as a plain step would
        sample it (penalties from what precedes it), up to the first that differs from its draft, an end of
        text, or, when every draft holds, one more from the last position."""
        req = live.req
        history, counts = set(live.history), collections.Counter(live.counts)
        out: list[int] = []
        for i, row in enumerate(logits):
            if counts and (req.presence_penalty or req.frequency_penalty):
                row = apply_penalties(row, counts, req.presence_penalty, req.frequency_penalty)
            if i < len(drafts):
                token = live.sampler.verify(row, history, drafts[i], None if probs is None else probs[i])
            else:
                token = live.sampler(row, history)
            out.append(token)
            if i >= len(drafts) or token != drafts[i] or token in self.tokenizer.eos_token_ids:
                break
            history.add(token)
            counts[token] += 1
        return out

    def _decode_pipelined(self) -> None:
        pending, rows = self._pending, self._pending_rows
        same = len(rows) == len(self._running) and all(a is b for a, b in zip(rows, self._running))
        goes_on = any(len(x.tokens) + 1 < x.max_tokens for x in rows)  # else every row ends at these tokens
        if same and goes_on and self._samples_on_device(rows):
            # Nobody joined or left: the next step starts from the device's tokens before they are read.
            self._pending = self.backend.decode_sampled([x.seq for x in rows], pending, self._draws(rows))
        else:  # the batch changes: take these tokens, then start again from the host's
            self._pending, self._pending_rows = None, []
        running = {id(x) for x in self._running}
        for live, token in zip(rows, self.backend.read(pending)):
            # a row that finished or was cancelled meanwhile had its token computed for nothing
            if id(live) in running and self._accept(live, token):
                self._running.remove(live)

    def _samples_on_device(self, rows: list[_Live]) -> bool:
        return self._on_device is not None and all(x.on_device for x in rows) and \
            self._on_device([x.req.params for x in rows])

    @staticmethod
    def _draws(rows: list[_Live]) -> list[Draw]:
        # The uniform comes from the request's own seeded generator, so a seed replays on the device too.
        return [Draw(x.req.params, x.history, 0.0 if x.req.params.greedy else float(x.sampler.rng.random()))
                for x in rows]

    def _advance(self, live: _Live, logits: np.ndarray) -> bool:
        try:
            return self._next_token(live, logits)
        except QwenError as e:  # this request's grammar failed: end it alone
            self._finish(live, Failed(str(e)))
            return True

    def _next_token(self, live: _Live, logits: np.ndarray) -> bool:
        """Sample on the host, then `_accept`; True when the request is finished."""
        req = live.req
        raw = logits
        if live.counts and (req.presence_penalty or req.frequency_penalty):
            logits = apply_penalties(logits, live.counts, req.presence_penalty, req.frequency_penalty)
        if req.constraint is not None:
            logits = req.constraint.mask(logits)
        token = live.sampler(logits, live.history)
        if req.constraint is not None:
            req.constraint.accept(token)
        return self._accept(live, token, raw)

    def _accept(self, live: _Live, token: int, logits: np.ndarray | None = None) -> bool:
        """Emit `token` and check the end rules; True when the request is finished."""
        req = live.req
        if token in self.tokenizer.eos_token_ids:
            self._finish(live, "stop")
            return True
        live.tokens.append(token)
        live.history.add(token)
        live.counts[token] += 1
        event = Token(token, live.out.add(token))
        if req.logprobs is not None and logits is not None:
            logprobs = log_softmax(logits)
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
        if live.holding:  # a speculative step settles the cache first, then releases (_speculate)
            live.ended = end if isinstance(end, str) else None
        elif live.seq is not None:
            # The cache holds the prompt and every generated token fed back: keep it for the next turn.
            self.backend.release(live.seq, live.req.prompt + live.tokens if isinstance(end, str) else None)
        if isinstance(end, Failed):
            self._emit(live, end)
        else:
            now = time.perf_counter()
            spec = live.spec
            self._emit(live, Done(end, live.out.finish(), len(live.req.prompt), len(live.tokens), live.cached,
                                  live.prefilled - live.started, now - live.prefilled,
                                  spec and spec.drafted, spec and spec.accepted))

    @staticmethod
    def _emit(live: _Live, event: Any) -> None:
        try:
            live.emit(event)
        except Exception:  # the client's event loop is gone: nothing to tell
            live.handle.cancel()


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
