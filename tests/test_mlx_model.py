"""The MLX model against HF transformers' Qwen2ForCausalLM on tiny random checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

from qwen_mlx.checkpoint import prepare_model
from qwen_mlx.backends.base import Session, greedy_tokens
from qwen_mlx.backends.mlx import MLXBackend
from benchmarks.quality.reference import (PROMPT, STEPS, backend_logits, load_reference, reference_greedy,
                                          reference_logits)
from benchmarks.checkpoints.tiny_models import TINY_CONFIGS


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_float32_logits_match_transformers(tiny_model, name):
    folder = tiny_model(name)
    ref = load_reference(folder)
    want = reference_logits(ref, PROMPT, STEPS)
    got = backend_logits(Session(MLXBackend(prepare_model(str(folder)), "float32")), PROMPT, STEPS)
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("name", ["gqa2-untied", "gqa4-tied", "yarn"])
def test_greedy_continuation_matches_transformers(tiny_model, name):
    folder = tiny_model(name)
    want = reference_greedy(load_reference(folder), PROMPT, 20)
    got = greedy_tokens(Session(MLXBackend(prepare_model(str(folder)), "float32")), PROMPT, 20)
    assert got == want


def test_long_dynamic_rope_past_trained_length(tiny_model):
    """The dynamic config trains on 16 positions: 21 + 12 tokens run past it, where the base grows."""
    folder = tiny_model("dynamic")
    long_prompt = (PROMPT * 3)[:40]
    want = reference_logits(load_reference(folder), long_prompt, STEPS)
    got = backend_logits(Session(MLXBackend(prepare_model(str(folder)), "float32")), long_prompt, STEPS)
    assert np.abs(got - want).max() < 1e-4


def test_chunked_prefill_and_cache_growth(tiny_model, monkeypatch):
    """A prompt longer than a prefill chunk and a cache that grows past its first allocation."""
    import qwen_mlx.backends.base as gen
    from qwen_mlx.models.cache import KVCache

    monkeypatch.setattr(gen, "PREFILL_CHUNK", 7)
    monkeypatch.setattr(KVCache, "step", 8)
    folder = tiny_model("gqa2-untied")
    want = reference_logits(load_reference(folder), PROMPT, STEPS)
    got = backend_logits(Session(MLXBackend(prepare_model(str(folder)), "float32")), PROMPT, STEPS)
    assert np.abs(got - want).max() < 1e-4


def test_session_reuses_the_cached_prefix(tiny_model):
    folder = tiny_model("gqa2-untied")
    session = Session(MLXBackend(prepare_model(str(folder)), "float32"))
    session.prefill(PROMPT)
    longer = PROMPT + STEPS
    logits = session.prefill(longer)
    assert session.prefilled == len(STEPS)
    assert session.backend.cache_length == len(longer)
    want = reference_logits(load_reference(folder), longer, [])[0]
    assert np.abs(logits - want).max() < 1e-4
    # A prompt that diverges early is trimmed back to the shared prefix, not appended.
    other = PROMPT[:5] + STEPS
    logits = session.prefill(other)
    assert session.prefilled == len(STEPS) and session.backend.cache_length == len(other)
    assert np.abs(logits - reference_logits(load_reference(folder), other, [])[0]).max() < 1e-4


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 0.25), ("float16", 0.1)])
def test_half_precision_close_to_float32(tiny_model, dtype, tol):
    folder = tiny_model("gqa2-untied")
    ckpt = prepare_model(str(folder))
    full = backend_logits(Session(MLXBackend(ckpt, "float32")), PROMPT, STEPS)
    half = backend_logits(Session(MLXBackend(ckpt, dtype)), PROMPT, STEPS)
    assert np.abs(half - full).max() < tol * np.abs(full).max()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("name", ["gqa4-tied", "mqa-headdim"])
def test_quantized_weights(tiny_model, name, bits):
    """Affine quantization, group size 64, of every Linear and the embedding (hence a tied lm_head).
    The quantized model must compute exactly what a float32 model holding the dequantized weights
    computes; how much quality the rounding costs is measured on the real checkpoint."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    folder = tiny_model(name)
    ckpt = prepare_model(str(folder))
    quant = MLXBackend(ckpt, "float32", bits)
    modules = dict(quant.model.named_modules())
    linears = [m for m in modules.values() if isinstance(m, (nn.Linear, nn.Embedding))]
    assert not linears, "every matrix of these configs splits into groups of 64"
    assert all(m.bits == bits and m.group_size == 64 for m in modules.values()
               if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)))

    dequant = MLXBackend(ckpt, "float32")
    weights = {}
    for path, m in modules.items():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            weights[path + ".weight"] = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
    params = dict(tree_flatten(dequant.model.parameters()))
    assert set(weights) <= set(params)
    dequant.model.load_weights(list(weights.items()), strict=False)
    got = backend_logits(Session(quant), PROMPT, STEPS)
    want = backend_logits(Session(dequant), PROMPT, STEPS)
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("first", [3, 9])
def test_cache_grows_by_what_a_turn_needs_after_reset(tiny_model, monkeypatch, first):
    """Regression (issue 7): a turn longer than the cache's free room after /reset (offset 0, capacity 8)
    or after a short turn used to allocate from the old capacity and crash on broadcast_shapes."""
    from qwen_mlx.models.cache import KVCache

    monkeypatch.setattr(KVCache, "step", 8)
    folder = tiny_model("gqa2-untied")
    session = Session(MLXBackend(prepare_model(str(folder)), "float32"))
    session.prefill(PROMPT[:first])
    session.reset()
    want = reference_logits(load_reference(folder), PROMPT + PROMPT, STEPS)
    got = backend_logits(session, PROMPT + PROMPT, STEPS)  # 42 tokens into an 8- or 16-slot buffer
    assert np.abs(got - want).max() < 1e-4
    # Without reset: a later turn adds more tokens than the buffer grows by.
    session = Session(MLXBackend(prepare_model(str(folder)), "float32"))
    session.prefill(PROMPT[:first])
    got = backend_logits(session, PROMPT[:first] + PROMPT * 2, STEPS)
    want = reference_logits(load_reference(folder), PROMPT[:first] + PROMPT * 2, STEPS)
    assert np.abs(got - want).max() < 1e-4
