"""The shared generation loop on a real (tiny) model: streaming, EOS, stop strings, limits."""

from __future__ import annotations

import numpy as np
import pytest

from qwen_mlx.backends import load
from qwen_mlx.errors import QwenError
from qwen_mlx.generate import GenerationStats, Session, generate, greedy_tokens, stream_generate
from qwen_mlx.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load("mlx", str(tiny_model("gqa2-untied")), "float32")


@pytest.fixture(scope="module")
def prompt(loaded):
    return loaded.tokenizer.encode_chat([{"role": "user", "content": "Tell me a story about a cat."}])


def test_stream_joins_to_the_greedy_decode(loaded, prompt):
    tok = loaded.tokenizer
    tok_ids = greedy_tokens(Session(loaded.backend), prompt, 24)
    eos = [i for i, t in enumerate(tok_ids) if t in tok.eos_token_ids]
    tok_ids = tok_ids[:eos[0]] if eos else tok_ids
    stats = GenerationStats()
    pieces = list(stream_generate(Session(loaded.backend), tok, prompt, GREEDY, 24, (), stats))
    assert "".join(pieces) == tok.decode(tok_ids)
    assert stats.generation_tokens == len(tok_ids) and stats.prompt_tokens == len(prompt)
    assert stats.prompt_tps > 0 and stats.peak_memory_gb > 0


def test_eos_stops_without_printing_it(loaded, prompt):
    tok = loaded.tokenizer
    ids = greedy_tokens(Session(loaded.backend), prompt, 10)
    saved = tok.eos_token_ids
    tok.eos_token_ids = frozenset({ids[4]})  # pretend the fifth greedy token ends the turn
    try:
        text, stats = generate(Session(loaded.backend), tok, prompt, GREEDY, 10)
    finally:
        tok.eos_token_ids = saved
    first = ids.index(ids[4])
    assert stats.generation_tokens == first and text == tok.decode(ids[:first])


def test_stop_string_is_cut_and_never_streamed(loaded, prompt):
    tok = loaded.tokenizer
    full, _ = generate(Session(loaded.backend), tok, prompt, GREEDY, 30)
    assert len(full) > 12, "the tiny model should say something"
    stop = full[8:12]
    pieces = list(stream_generate(Session(loaded.backend), tok, prompt, GREEDY, 30, (stop, "never there")))
    assert "".join(pieces) == full[:full.index(stop)]


def test_max_tokens_and_context_limits(loaded, prompt):
    tok = loaded.tokenizer
    text, stats = generate(Session(loaded.backend), tok, prompt, GREEDY, 0)
    assert text == "" and stats.generation_tokens == 0
    context = loaded.backend.args.context_length
    with pytest.raises(QwenError, match=f"context holds {context}"):
        generate(Session(loaded.backend), tok, [5] * context, GREEDY, 4)
    with pytest.raises(QwenError, match="--max-tokens"):
        generate(Session(loaded.backend), tok, prompt, GREEDY, -1)
    # A prompt near the end of the context gets only the room that is left.
    _, stats = generate(Session(loaded.backend), tok, [5] * (context - 3), SamplingParams(temperature=0.0), 50)
    assert stats.generation_tokens <= 3


def test_sampling_with_a_seed_is_reproducible(loaded, prompt):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=3)
    a, _ = generate(Session(loaded.backend), loaded.tokenizer, prompt, p, 12)
    b, _ = generate(Session(loaded.backend), loaded.tokenizer, prompt, p, 12)
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
        generate(Session(loaded.backend), loaded.tokenizer, prompt, GREEDY, 8, ("",))
