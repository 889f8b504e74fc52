"""The continuous-batching engine in process, on a tiny float32 model: batching must not change a token."""

from __future__ import annotations

import threading
import time

import pytest

from qwen_mlx.backends import load
from qwen_mlx.backends.batching import SerialBatch, batch_backend
from qwen_mlx.engine import Done, Engine, Failed, Overloaded, Request, ShuttingDown, Token, run_requests
from qwen_mlx.errors import QwenError
from qwen_mlx.backends.base import Session, greedy_tokens
from qwen_mlx.backends.mlx_batch import MLXBatch
from qwen_mlx.sampling import SamplingParams
from tests.support.engine import (GREEDY, PrefillRecorder, Recorder,
                                  assert_batch_of_8_gives_each_request_its_tokens_alone, prompts, tokens)


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load("mlx", str(tiny_model("gqa2-untied")), "float32")


def test_batch_of_8_gives_each_request_its_tokens_alone(loaded, no_eos):
    assert_batch_of_8_gives_each_request_its_tokens_alone(loaded)


def test_a_batch_of_one_gives_the_same_tokens(loaded, no_eos):
    ps = prompts(loaded.tokenizer, 3)
    alone = [greedy_tokens(Session(loaded.backend), p, 12) for p in ps]
    engine = Engine(batch_backend(loaded.backend, 1), loaded.tokenizer).start()
    assert isinstance(engine.backend, MLXBatch) and engine.backend.max_batch == 1  # as `chat` runs
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
        assert engine.load() == {"running": 0, "waiting": 0, "max_batch": 2, "cancelled": 1}
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
        self._maybe_fail()
        return self.inner.decode(seqs, toks)

    def decode_sampled(self, seqs, toks, draws):
        self._maybe_fail()
        return self.inner.decode_sampled(seqs, toks, draws)

    def _maybe_fail(self):
        if self.fail:
            self.fail = False
            raise RuntimeError("device lost")


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
    from export.backends.torch_batch import TorchBatch

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


# --- sampling on the device, pipelined steps (what an MLX GPU runs; forced on here, on the CPU) ---------

class Counting:
    """Wraps a BatchBackend to count which decode path each step took (observes, changes nothing)."""

    def __init__(self, inner):
        self.inner, self.host, self.device = inner, 0, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, seqs, toks):
        self.host += 1
        return self.inner.decode(seqs, toks)

    def decode_sampled(self, seqs, toks, draws):
        self.device += 1
        return self.inner.decode_sampled(seqs, toks, draws)


def run_on(loaded, device_sampling, requests, max_batch=8):
    backend = Counting(MLXBatch(loaded.backend.model, loaded.backend.args, loaded.backend.device, max_batch,
                               device_sampling=device_sampling))
    assert backend.inner.device_sampling == device_sampling
    engine = Engine(backend, loaded.tokenizer, prefill_chunk=16).start()
    try:
        return run_requests(engine, requests), backend
    finally:
        engine.shutdown(0)


def test_device_sampling_gives_the_same_greedy_tokens_batched_and_pipelined(loaded, no_eos):
    ps = prompts(loaded.tokenizer)
    alone = [greedy_tokens(Session(loaded.backend), p, 20) for p in ps]
    events, backend = run_on(loaded, "always", [Request(p, GREEDY, 20 - i) for i, p in enumerate(ps)])
    assert backend.host == 0 and backend.device >= 19  # the longest: 1 token from its prefill, 19 steps
    assert [tokens(ev) for ev in events] == [a[:20 - i] for i, a in enumerate(alone)]
    assert all(ev[-1].finish_reason == "length" for ev in events)


def test_device_repetition_penalty_and_mixed_batches_match_the_host(loaded, no_eos):
    ps = prompts(loaded.tokenizer, 6)
    rep = SamplingParams(temperature=0, repetition_penalty=1.3)
    reqs = lambda: [Request(p, rep, 16) for p in ps[:4]] + [  # noqa: E731
        Request(ps[4], GREEDY, 16, logprobs=2),  # needs its logits on the host: those steps run unpipelined
        Request(ps[5], GREEDY, 6, presence_penalty=0.5)]
    host, hb = run_on(loaded, "never", reqs())
    device, db = run_on(loaded, "always", reqs())
    assert hb.device == 0 and db.device > 0 and db.host > 0
    assert [tokens(ev) for ev in device] == [tokens(ev) for ev in host]
    assert tokens(host[0]) != greedy_tokens(Session(loaded.backend), ps[0], 16)  # the penalty did something


def test_device_sampling_replays_a_seed(loaded, no_eos):
    ps = prompts(loaded.tokenizer, 3)
    p = [SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=7), SamplingParams(temperature=1.2, seed=8),
         SamplingParams(temperature=0.7, top_p=0.8, min_p=0.05, repetition_penalty=1.1, seed=9)]
    first, _ = run_on(loaded, "always", [Request(x, q, 12) for x, q in zip(ps, p)])
    again, _ = run_on(loaded, "always", [Request(x, q, 12) for x, q in zip(ps, p)])
    assert [tokens(ev) for ev in first] == [tokens(ev) for ev in again]
    assert len({tuple(tokens(ev)) for ev in first}) == 3


DEVICE_CASES = [
    SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05),  # Qwen's defaults
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=0.8),
    SamplingParams(temperature=0.7, top_p=0.95, min_p=0.05),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=1.0, min_p=0.2, repetition_penalty=1.5),
    SamplingParams(temperature=0),
]


@pytest.mark.parametrize("together", [False, True], ids=["own-batch", "mixed-batch"])
def test_device_distribution_is_the_numpy_samplers(together):
    """The tokens in play and their probabilities, row by row, against qwen_mlx.sampling (HF's rules)."""
    import mlx.core as mx
    import numpy as np

    from qwen_mlx.sampling import Draw
    from qwen_mlx.sampling.device import distribution, seen_mask
    from qwen_mlx.sampling import Sampler

    rng = np.random.default_rng(0)
    V = 3000
    logits = (rng.standard_normal((len(DEVICE_CASES), V)) * 3).astype(np.float32)
    histories = [set(rng.integers(0, V, 50).tolist()) for _ in DEVICE_CASES]
    draws = [Draw(p, h, 0.5) for p, h in zip(DEVICE_CASES, histories)]
    groups = [list(range(len(draws)))] if together else [[i] for i in range(len(draws))]
    for rows in groups:
        seen = seen_mask([histories[i] for i in rows], V)
        ids, w = distribution(mx.array(logits[rows]), [draws[i] for i in rows], seen)
        ids = np.arange(V)[None].repeat(len(rows), 0) if ids is None else np.array(ids)
        w = np.array(w)
        for r, i in enumerate(rows):
            if DEVICE_CASES[i].greedy:
                continue
            want_ids, want_w = Sampler(DEVICE_CASES[i]).distribution(logits[i], histories[i])
            want = dict(zip(range(V) if want_ids is None else want_ids.tolist(), want_w / want_w.sum()))
            want = {k: v for k, v in want.items() if v > 0}
            got = {int(k): float(v) for k, v in zip(ids[r], w[r] / w[r].sum()) if v > 0}
            assert set(got) == set(want), DEVICE_CASES[i]
            assert max(abs(got[k] - want[k]) for k in want) < 1e-5


def test_device_draw_is_the_inverse_cdf_of_its_distribution():
    import mlx.core as mx
    import numpy as np

    from qwen_mlx.sampling import Draw
    from qwen_mlx.sampling.device import distribution, sample

    rng = np.random.default_rng(1)
    logits = mx.array((rng.standard_normal((len(DEVICE_CASES), 1000)) * 2).astype(np.float32))
    for u in (0.0, 0.1234, 0.5, 0.9, 0.999999):
        draws = [Draw(p, set(), u) for p in DEVICE_CASES]
        ids, w = distribution(logits, draws, None)
        got = np.array(sample(logits, draws, None)).tolist()
        w = np.array(w, dtype=np.float64)
        ids = np.arange(w.shape[1])[None].repeat(len(draws), 0) if ids is None else np.array(ids)
        for r, p in enumerate(DEVICE_CASES):
            if p.greedy:
                assert got[r] == int(np.argmax(np.array(logits[r])))
                continue
            cdf = np.cumsum(w[r])
            j = min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), int(np.flatnonzero(w[r])[-1]))
            assert got[r] == ids[r, j], (p, u)


def test_on_a_cpu_greedy_rows_are_sampled_on_the_device_and_others_on_the_host(loaded, no_eos):
    """The measured choice (docs/BENCHMARKS.md): MLX's argmax beats numpy there, numpy's top-k/top-p
    beat MLX's CPU sort."""
    import mlx.core as mx

    if mx.default_device() == mx.gpu:
        pytest.skip("a GPU samples every row on the device")
    ps = prompts(loaded.tokenizer, 2)
    sampled = SamplingParams(temperature=0.8, top_k=20, seed=1)
    (greedy,), g = run_on(loaded, "greedy", [Request(ps[0], GREEDY, 8)])
    (_,), s = run_on(loaded, "greedy", [Request(ps[1], sampled, 8)])
    assert MLXBatch(loaded.backend.model, loaded.backend.args, loaded.backend.device, 2).device_sampling == "greedy"
    assert (g.host, s.device) == (0, 0) and g.device > 0 and s.host > 0
    assert tokens(greedy) == greedy_tokens(Session(loaded.backend), ps[0], 8)


def test_a_process_whose_engine_thread_stopped_exits_cleanly(tiny_model):
    """Regression: after a clean shutdown the process aborted at exit (status 134, "terminate called
    without an active exception"): MLX's per-thread destructor ran in a finalizing interpreter."""
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
from qwen_mlx.backends import load
from qwen_mlx.engine import Engine, Request, run_requests
from qwen_mlx.sampling import SamplingParams
loaded = load("mlx", {str(tiny_model("gqa2-untied"))!r}, "float32")
engine = Engine.for_backend(loaded.backend, loaded.tokenizer, 4).start()
run_requests(engine, [Request(loaded.tokenizer.encode("hello world"), SamplingParams(temperature=0), 20)])
engine.shutdown(0)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr[-2000:]


def test_prompts_waiting_together_prefill_in_one_forward(loaded, no_eos):
    """Rows with and without a cached prefix, of different lengths, one forward: the same tokens."""
    tok = loaded.tokenizer
    ps = prompts(tok, 6)
    ps = [ps[0] + tok.encode(" and then"), ps[1] + tok.encode(" more"), *ps[2:]]
    alone = [greedy_tokens(Session(loaded.backend), p, 10) for p in ps]
    backend = PrefillRecorder(batch_backend(loaded.backend, 8))
    engine = Engine(backend, tok)
    warm = threading.Semaphore(0)
    for p in prompts(tok, 2):  # cache two prompts the first two requests extend
        engine.submit(Request(p, GREEDY, 1), lambda ev: warm.release() if isinstance(ev, Done) else None)
    events: list[list] = [[] for _ in ps]
    done = threading.Semaphore(0)
    engine.start()
    try:
        assert warm.acquire(timeout=60) and warm.acquire(timeout=60)
        backend.prefills.clear()
        with engine._cv:  # all six arrive within one step
            for i, p in enumerate(ps):
                engine.submit(Request(p, GREEDY, 10), lambda ev, i=i: (events[i].append(ev), isinstance(
                    ev, (Done, Failed)) and done.release()))
        for _ in ps:
            assert done.acquire(timeout=60)
    finally:
        engine.shutdown(0)
    assert max(backend.prefills) > 2, backend.prefills
    assert [tokens(ev) for ev in events] == alone
    cached = [ev[-1].cached_tokens for ev in events]
    assert cached[:2] == [len(p) for p in prompts(tok, 2)] and len(set(cached)) > 2, cached
