"""Continuous batching on the exported ONNX graph (export/backends/onnx_batch.py), on a tiny float32 model: joining,
leaving, prefilling together and reusing a prefix must not change a token, on ONNX or against MLX."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from qwen_mlx.backends import load
from qwen_mlx.engine import Done, Engine, Request, Token, run_requests
from qwen_mlx.backends.batching import batch_backend
from qwen_mlx.backends.base import Session, greedy_tokens
from qwen_mlx.sampling import SamplingParams
from tests.support.engine import PrefillRecorder, prompts, tokens

pytest.importorskip("onnxruntime")

GREEDY = SamplingParams(temperature=0)
NAME = "gqa2-untied"


@pytest.fixture(scope="module")
def onnx(tiny_onnx):
    loaded = load("onnx", str(tiny_onnx(NAME)))
    saved = loaded.tokenizer.eos_token_ids
    loaded.tokenizer.eos_token_ids = frozenset()  # fixed-length greedy runs: the random model must not stop
    yield loaded
    loaded.tokenizer.eos_token_ids = saved


@pytest.fixture(scope="module")
def mlx_alone(tiny_model, onnx):
    """MLX on the same checkpoint, each prompt alone: 20 greedy tokens."""
    mlx = load("mlx", str(tiny_model(NAME)), "float32")
    return [greedy_tokens(Session(mlx.backend), p, 20) for p in prompts(onnx.tokenizer)]


def test_the_onnx_backend_batches_through_the_engine(onnx, mlx_alone):
    from export.backends.onnx_batch import OnnxBatch

    ps = prompts(onnx.tokenizer)
    assert len({len(p) for p in ps}) == 8
    alone = [greedy_tokens(Session(onnx.backend), p, 20) for p in ps]  # the serial ONNX path
    assert alone == mlx_alone
    backend = PrefillRecorder(batch_backend(onnx.backend, 8))
    assert isinstance(backend.inner, OnnxBatch)
    engine = Engine(backend, onnx.tokenizer, prefill_chunk=64)
    events: list[list] = [[] for _ in ps]
    counts = [threading.Semaphore(0) for _ in ps]  # one release per token
    done = threading.Semaphore(0)

    def submit(i: int, max_tokens: int):
        def emit(ev):
            events[i].append(ev)
            counts[i].release() if isinstance(ev, Token) else done.release()
        return engine.submit(Request(ps[i], GREEDY, max_tokens), emit)

    engine.start()
    try:
        with engine._cv:  # three arrive within one step: they prefill together
            for i in range(3):
                submit(i, 20 - i)
        for _ in range(3):
            assert counts[0].acquire(timeout=60)
        submit(3, 20)
        victim = submit(4, 200)  # leaves mid-batch, cancelled
        for _ in range(3):
            assert counts[4].acquire(timeout=60)
        for i in range(5, 8):  # the rest join later, one step apart at least
            submit(i, 20 - i)
            assert counts[i].acquire(timeout=60)
        engine.cancel(victim)  # a cancelled request gets no final event: its client is gone
        for _ in range(7):
            assert done.acquire(timeout=120)
        # the next turn of a conversation: its prompt and first reply tokens come from the prefix cache
        follow = ps[3] + tokens(events[3])[:4]
        (again,) = run_requests(engine, [Request(follow, GREEDY, 4)])
    finally:
        engine.shutdown(0)
    assert max(backend.sizes) == 8
    assert max(backend.prefills) > 1  # some rows prefilled together (prefill_batch)
    for i in (0, 1, 2, 3, 5, 6, 7):
        want = 20 if i == 3 else 20 - i
        assert tokens(events[i]) == alone[i][:want], i
        assert isinstance(events[i][-1], Done) and events[i][-1].finish_reason == "length"
    got = tokens(events[4])
    assert 3 <= len(got) < 200 and got == greedy_tokens(Session(onnx.backend), ps[4], len(got))
    assert engine.cancelled == 1
    assert again[-1].cached_tokens == len(ps[3]) + 3
    assert tokens(again) == greedy_tokens(Session(onnx.backend), follow, 4)


def test_prefill_batch_gives_each_row_its_logits_alone(onnx):
    """Rows with and without a cached prefix and chunks of different lengths, in one forward."""
    batch = batch_backend(onnx.backend, 4)
    ps = prompts(onnx.tokenizer, 3)
    seqs = []
    for p, cached in zip(ps, (0, 5, 9)):
        seq, _ = batch.start(p)
        if cached:
            batch.prefill(seq, p[:cached])
        seqs.append((seq, p[cached:]))
    got = batch.prefill_batch([s for s, _ in seqs], [c for _, c in seqs])
    for row, p in zip(got, ps):
        want = Session(onnx.backend).prefill(p)
        np.testing.assert_allclose(row, want, atol=1e-5, rtol=1e-5)
    # their caches go on: one decode step, batched, gives each row what it would alone
    step = batch.decode([s for s, _ in seqs], [int(np.argmax(r)) for r in got])
    for row, p, r in zip(step, ps, got):
        session = Session(onnx.backend)
        session.prefill(p)
        np.testing.assert_allclose(row, session.step(int(np.argmax(r))), atol=1e-5, rtol=1e-5)
