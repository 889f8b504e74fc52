"""The generation loop `chat` and `generate` run (the engine, a batch of one) on a real (tiny) model:
streaming, EOS, stop strings, limits; and the Session under the serial fallback."""

from __future__ import annotations

import numpy as np
import pytest

from qwen_mlx.backends import load
from qwen_mlx.engine import Engine, generate, stream_generate
from qwen_mlx.backends.batching import SerialBatch
from qwen_mlx.errors import QwenError
from qwen_mlx.backends.base import Session, greedy_tokens
from qwen_mlx.engine.text import GenerationStats
from qwen_mlx.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load("mlx", str(tiny_model("gqa2-untied")), "float32")


def one(loaded):
    return Engine.for_backend(loaded.backend, loaded.tokenizer)


@pytest.fixture(scope="module")
def prompt(loaded):
    return loaded.tokenizer.encode_chat([{"role": "user", "content": "Tell me a story about a cat."}])


def test_stream_joins_to_the_greedy_decode(loaded, prompt):
    tok = loaded.tokenizer
    tok_ids = greedy_tokens(Session(loaded.backend), prompt, 24)
    eos = [i for i, t in enumerate(tok_ids) if t in tok.eos_token_ids]
    tok_ids = tok_ids[:eos[0]] if eos else tok_ids
    stats = GenerationStats()
    pieces = list(stream_generate(one(loaded), prompt, GREEDY, 24, (), stats))
    assert "".join(pieces) == tok.decode(tok_ids)
    assert stats.generation_tokens == len(tok_ids) and stats.prompt_tokens == len(prompt)
    assert stats.prompt_tps > 0 and stats.peak_memory_gb > 0


def test_eos_stops_without_printing_it(loaded, prompt):
    tok = loaded.tokenizer
    ids = greedy_tokens(Session(loaded.backend), prompt, 10)
    saved = tok.eos_token_ids
    tok.eos_token_ids = frozenset({ids[4]})  # pretend the fifth greedy token ends the turn
    try:
        text, stats = generate(one(loaded), prompt, GREEDY, 10)
    finally:
        tok.eos_token_ids = saved
    first = ids.index(ids[4])
    assert stats.generation_tokens == first and text == tok.decode(ids[:first])


def test_stop_string_is_cut_and_never_streamed(loaded, prompt):
    full, _ = generate(one(loaded), prompt, GREEDY, 30)
    assert len(full) > 12, "the tiny model should say something"
    stop = full[8:12]
    pieces = list(stream_generate(one(loaded), prompt, GREEDY, 30, (stop, "never there")))
    assert "".join(pieces) == full[:full.index(stop)]


def test_max_tokens_and_context_limits(loaded, prompt):
    text, stats = generate(one(loaded), prompt, GREEDY, 0)
    assert text == "" and stats.generation_tokens == 0
    context = loaded.backend.args.context_length
    with pytest.raises(QwenError, match=f"context holds {context}"):
        generate(one(loaded), [5] * context, GREEDY, 4)
    with pytest.raises(QwenError, match="--max-tokens"):
        generate(one(loaded), prompt, GREEDY, -1)
    # A prompt near the end of the context gets only the room that is left.
    _, stats = generate(one(loaded), [5] * (context - 3), SamplingParams(temperature=0.0), 50)
    assert stats.generation_tokens <= 3


def test_sampling_with_a_seed_is_reproducible(loaded, prompt):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=3)
    a, _ = generate(one(loaded), prompt, p, 12)
    b, _ = generate(one(loaded), prompt, p, 12)
    assert a == b


def test_interrupted_forward_leaves_a_consistent_cache(loaded, prompt):
    session = Session(loaded.backend)
    session.prefill(prompt)
    real_forward = loaded.backend.forward

    def interrupted(tokens):
        real_forward(tokens)  # the layers have appended to their caches...
        raise KeyboardInterrupt  # ...when Ctrl-C lands

    loaded.backend.forward = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            session.step(7)
    finally:
        del loaded.backend.forward
    assert loaded.backend.cache_length == len(session.tokens) == len(prompt)
    logits = session.step(7)
    fresh = load("mlx", str(loaded.folder), "float32")
    np.testing.assert_allclose(logits, Session(fresh.backend).prefill(prompt + [7]), atol=1e-4)


def test_empty_stop_string_is_refused_not_a_truncated_reply(loaded, prompt):
    with pytest.raises(QwenError, match="--stop"):
        generate(one(loaded), prompt, GREEDY, 8, ("",))


class Interrupting:
    """Wraps a BatchBackend: its n-th decode runs (the caches are written), then Ctrl-C lands."""

    def __init__(self, inner, at):
        self.inner, self.at, self.calls = inner, at, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, seqs, tokens):
        return self._count(self.inner.decode(seqs, tokens))

    def decode_sampled(self, seqs, tokens, draws):  # greedy on MLX: sampled on the device, pipelined
        return self._count(self.inner.decode_sampled(seqs, tokens, draws))

    def _count(self, out):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return out


@pytest.mark.parametrize("serial", [False, True], ids=["batched", "serial"])
def test_ctrl_c_mid_reply_leaves_the_engine_usable(loaded, prompt, no_eos, serial):
    """`chat` catches the KeyboardInterrupt; the next turn on the same engine must be exact."""
    from qwen_mlx.backends.batching import batch_backend

    inner = SerialBatch(loaded.backend) if serial else batch_backend(loaded.backend, 1)
    engine = Engine(Interrupting(inner, 3), loaded.tokenizer)
    pieces = []
    with pytest.raises(KeyboardInterrupt):
        for piece in stream_generate(engine, prompt, GREEDY, 20):
            pieces.append(piece)
    want, _ = generate(one(loaded), prompt + [7], GREEDY, 12)
    assert generate(engine, prompt + [7], GREEDY, 12)[0] == want
    # a reader that stops early (Ctrl-C while it prints) drops its request too
    for _ in stream_generate(engine, prompt, GREEDY, 20):
        break
    assert engine.load()["running"] == 0
    assert generate(engine, prompt + [7], GREEDY, 12)[0] == want


def test_the_serial_fallback_streams_the_same_reply(loaded, prompt):
    serial_text, serial = generate(Engine(SerialBatch(loaded.backend), loaded.tokenizer), prompt, GREEDY, 16)
    text, stats = generate(one(loaded), prompt, GREEDY, 16)
    assert (serial_text, serial.generation_tokens) == (text, stats.generation_tokens)
