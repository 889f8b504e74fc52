"""The continuous-batching engine in process, on a tiny float32 model: batching must not change a token."""

from __future__ import annotations

import threading
import time

import pytest

from qwen_mlx.backends import load
from qwen_mlx.engine import SerialBatch, batch_backend
from qwen_mlx.engine import Done, Engine, Failed, Overloaded, Request, ShuttingDown, Token, run_requests
from qwen_mlx.errors import QwenError
from qwen_mlx.generate import Session, greedy_tokens
from qwen_mlx.engine.mlx_batch import MLXBatch
from qwen_mlx.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load("mlx", str(tiny_model("gqa2-untied")), "float32")


@pytest.fixture
def no_eos(loaded):
    """Greedy runs of a fixed length: the random tiny model must not end a reply early."""
    saved = loaded.tokenizer.eos_token_ids
    loaded.tokenizer.eos_token_ids = frozenset()
    yield
    loaded.tokenizer.eos_token_ids = saved


def prompts(tok, n=8):
    return [tok.encode("hello world " * (3 * i + 1) + f"tell story number {i}") for i in range(n)]


def tokens(events):
    return [e.id for e in events if isinstance(e, Token)]


class Recorder:
    """Wraps a BatchBackend to record the batch size of every decode step (observes, changes nothing)."""

    def __init__(self, inner):
        self.inner, self.sizes = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, seqs, toks):
        self.sizes.append(len(seqs))
        return self.inner.decode(seqs, toks)


def test_batch_of_8_gives_each_request_its_tokens_alone(loaded, no_eos):
    ps = prompts(loaded.tokenizer)
    assert len({len(p) for p in ps}) == 8
    alone = [greedy_tokens(Session(loaded.backend), p, 24) for p in ps]
    backend = Recorder(batch_backend(loaded.backend, 8))
    assert isinstance(backend.inner, MLXBatch)
    engine = Engine(backend, loaded.tokenizer, prefill_chunk=16).start()
    try:
        # different max_tokens: rows leave the batch at different steps while the others go on
        events = run_requests(engine, [Request(p, GREEDY, 24 - i) for i, p in enumerate(ps)])
    finally:
        engine.shutdown(0)
    assert max(backend.sizes) == 8
    for i, ev in enumerate(events):
        assert tokens(ev) == alone[i][:24 - i]
        assert isinstance(ev[-1], Done) and ev[-1].finish_reason == "length"


def test_serial_backend_gives_the_same_tokens(loaded, no_eos):
    ps = prompts(loaded.tokenizer, 3)
    alone = [greedy_tokens(Session(loaded.backend), p, 12) for p in ps]
    engine = Engine(batch_backend(loaded.backend, 1), loaded.tokenizer).start()
    assert isinstance(engine.backend, SerialBatch)
    try:
        events = run_requests(engine, [Request(p, GREEDY, 12) for p in ps])
    finally:
        engine.shutdown(0)
    assert [tokens(ev) for ev in events] == alone


def test_prefix_cache_reuses_a_shared_prompt(loaded, no_eos):
    tok = loaded.tokenizer
    system = [{"role": "system", "content": "You are Qwen, a helpful assistant. " * 6}]
    first = tok.encode_chat(system + [{"role": "user", "content": "Hello there"}])
    second = tok.encode_chat(system + [{"role": "user", "content": "Write a story"}])
    engine = Engine(batch_backend(loaded.backend, 4), tok).start()
    try:
        (a,) = run_requests(engine, [Request(first, GREEDY, 8)])
        (b,) = run_requests(engine, [Request(second, GREEDY, 8)])
        (c,) = run_requests(engine, [Request(first + tokens(a)[:5], GREEDY, 3)])  # the next turn
    finally:
        engine.shutdown(0)
    common = next(i for i, (x, y) in enumerate(zip(first, second)) if x != y)
    assert a[-1].cached_tokens == 0
    assert b[-1].cached_tokens == common > 20
    assert c[-1].cached_tokens == len(first) + 4  # the prompt and the 4 reply tokens fed back
    assert tokens(b) == greedy_tokens(Session(loaded.backend), second, 8)
    assert tokens(c) == greedy_tokens(Session(loaded.backend), first + tokens(a)[:5], 3)


def test_long_prefill_is_chunked_between_decode_steps(loaded, no_eos):
    tok = loaded.tokenizer
    order: list[str] = []
    first_token = threading.Event()
    done = threading.Semaphore(0)

    def emit(name):
        def f(ev):
            order.append(name if isinstance(ev, Token) else name + "-end")
            first_token.set() if name == "a" else None
            done.release() if isinstance(ev, (Done, Failed)) else None
        return f

    engine = Engine(batch_backend(loaded.backend, 4), tok, prefill_chunk=8).start()
    try:
        engine.submit(Request(tok.encode("hi"), GREEDY, 120), emit("a"))
        assert first_token.wait(60)
        long_prompt = tok.encode("hello world " * 60)[:160]
        engine.submit(Request(long_prompt, GREEDY, 4), emit("b"))
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
    finally:
        engine.shutdown(0)
    b_first = order.index("b")
    a_during = order[order.index("a", 0):b_first].count("a")
    assert a_during >= 160 // 8 - 1, "the running stream must keep decoding while the long prompt prefills"


def test_cancel_frees_the_slot_and_others_go_on(loaded, no_eos):
    tok = loaded.tokenizer
    engine = Engine(batch_backend(loaded.backend, 2), tok).start()
    got = threading.Semaphore(0)
    try:
        handle = engine.submit(Request(tok.encode("hello"), GREEDY, 200), lambda ev: got.release())
        assert got.acquire(timeout=60)
        engine.cancel(handle)
        deadline = time.monotonic() + 30
        while engine.load()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.load() == {"running": 0, "waiting": 0, "max_batch": 2}
        (ev,) = run_requests(engine, [Request(tok.encode("hello"), GREEDY, 5)])
        assert len(tokens(ev)) == 5
    finally:
        engine.shutdown(0)


def test_overload_invalid_input_and_shutdown(loaded, no_eos):
    tok = loaded.tokenizer
    engine = Engine(batch_backend(loaded.backend, 1), tok, max_queue=1).start()
    events: list = []
    try:
        with pytest.raises(QwenError, match="context holds"):
            engine.submit(Request([5] * engine.context, GREEDY, 1), events.append)
        engine.submit(Request(tok.encode("hello"), GREEDY, 250), events.append)
        engine.submit(Request(tok.encode("hello"), GREEDY, 250), events.append)
        with pytest.raises(Overloaded) as e:
            engine.submit(Request(tok.encode("hello"), GREEDY, 250), events.append)
        assert e.value.retry_after >= 1
    finally:
        engine.shutdown(0)  # the grace is over at once: both accepted requests end with an error
    ends = [e for e in events if isinstance(e, (Done, Failed))]
    assert len(ends) == 2 and all(isinstance(e, Failed) and e.status == 503 for e in ends)
    with pytest.raises(ShuttingDown):
        engine.submit(Request(tok.encode("hello"), GREEDY, 5), events.append)


class Broken:
    """A backend whose next decode fails once (a device error mid-batch)."""

    def __init__(self, inner):
        self.inner, self.fail = inner, True

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, seqs, toks):
        if self.fail:
            self.fail = False
            raise RuntimeError("device lost")
        return self.inner.decode(seqs, toks)


def test_a_failed_forward_ends_requests_with_an_error_and_the_engine_goes_on(loaded, no_eos):
    tok = loaded.tokenizer
    engine = Engine(Broken(batch_backend(loaded.backend, 4)), tok).start()
    try:
        first = run_requests(engine, [Request(tok.encode("hello"), GREEDY, 5) for _ in range(2)])
        (after,) = run_requests(engine, [Request(tok.encode("hello"), GREEDY, 5)])
    finally:
        engine.shutdown(0)
    failed = [ev[-1] for ev in first if isinstance(ev[-1], Failed)]
    assert failed and all("device lost" in f.message and f.status == 500 for f in failed)
    assert all(len(tokens(ev)) == 5 for ev in first if isinstance(ev[-1], Done))
    assert tokens(after) == greedy_tokens(Session(loaded.backend), tok.encode("hello"), 5)


def test_the_torch_backend_batches_through_the_same_engine(loaded, tiny_model, no_eos):
    pytest.importorskip("torch")
    import export  # noqa: F401  (registers the torch and onnx backends)
    from export.torch_batch import TorchBatch

    twin = load("torch", str(tiny_model("gqa2-untied")), "float32")
    ps = prompts(loaded.tokenizer, 8)
    alone = [greedy_tokens(Session(loaded.backend), p, 16) for p in ps]  # MLX alone: the same tokens
    backend = Recorder(batch_backend(twin.backend, 8))
    assert isinstance(backend.inner, TorchBatch)
    engine = Engine(backend, loaded.tokenizer, prefill_chunk=16).start()
    try:
        events = run_requests(engine, [Request(p, GREEDY, 16 - i) for i, p in enumerate(ps)])
        (again,) = run_requests(engine, [Request(ps[3] + tokens(events[3])[:4], GREEDY, 4)])
    finally:
        engine.shutdown(0)
    assert max(backend.sizes) == 8
    assert [tokens(ev) for ev in events] == [a[:16 - i] for i, a in enumerate(alone)]
    assert again[-1].cached_tokens == len(ps[3]) + 3
    assert tokens(again) == greedy_tokens(Session(loaded.backend), ps[3] + tokens(events[3])[:4], 4)


def test_the_serial_fallback_serves_any_backend(loaded, no_eos):
    ps = prompts(loaded.tokenizer, 2)
    engine = Engine(SerialBatch(loaded.backend), loaded.tokenizer).start()
    try:
        events = run_requests(engine, [Request(p, GREEDY, 10) for p in ps])
    finally:
        engine.shutdown(0)
    assert [tokens(ev) for ev in events] == [greedy_tokens(Session(loaded.backend), p, 10) for p in ps]
