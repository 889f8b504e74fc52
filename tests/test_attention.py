"""qwen_mlx/models/base.py: the numpy softmax taken for long float32 chunks on a CPU gives the fused kernel's
attention, for every mask form the model passes, and the whole model through it still matches transformers
and batches without changing a token."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import qwen_mlx.models.base as attn
from qwen_mlx.checkpoint import prepare_model
from qwen_mlx.backends.base import Session
from qwen_mlx.backends.mlx import MLXBackend
from benchmarks.quality.reference import PROMPT, STEPS, backend_logits, load_reference, reference_logits
from benchmarks.checkpoints.tiny_models import TINY_CONFIGS


@pytest.fixture
def numpy_path(monkeypatch) -> list[int]:
    """Every chunk of two or more tokens through the numpy softmax; the list counts the calls taken."""
    calls = []
    inner = attn._numpy_softmax_attention

    def counted(*a, **kw):
        calls.append(1)
        return inner(*a, **kw)

    monkeypatch.setattr(attn, "NUMPY_SOFTMAX_FROM", 2)
    monkeypatch.setattr(attn, "ROW_BLOCK", 5)  # several row blocks per head, a ragged last one
    monkeypatch.setattr(attn, "_numpy_softmax_attention", counted)
    return calls


def _masks(B: int, H: int, L: int, T: int) -> dict:
    left = mx.array([0, 3, T - 2][:B])[:, None, None, None]  # left padding; the last row sees 2 keys
    pos = mx.arange(T)[None, None, None, :]
    boolean = (pos >= left) & (pos <= mx.arange(T - L, T)[None, None, :, None])    # B 1 L T
    all_masked = mx.concatenate([boolean[:, :, :1] & False, boolean[:, :, 1:]], axis=2)
    return {"causal": "causal", "none": None, "bool B1LT": boolean, "bool B1LT, a row all masked": all_masked,
            "bool BHLT": mx.broadcast_to(boolean, (B, H, L, T)), "additive": mx.where(boolean, 0.0, -1e9)}


@pytest.mark.parametrize("B,H,K,L,T", [(1, 14, 2, 9, 40), (2, 4, 4, 7, 7), (3, 6, 1, 12, 30)])
def test_numpy_softmax_equals_the_fused_kernel(numpy_path, B, H, K, L, T):
    mx.random.seed(B * 100 + T)
    q, k, v = mx.random.normal((B, H, L, 64)), mx.random.normal((B, K, T, 64)), mx.random.normal((B, K, T, 64))
    for name, mask in _masks(B, H, L, T).items():
        got = attn.attention(q, k, v, 0.125, mask)
        want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
        if name.startswith("bool B1LT, a row"):
            # the fused kernel gives NaN for a row that attends to nothing; ours stays finite (uniform weights,
            # as quantized_attention's), so only the other rows are compared
            assert bool(mx.isfinite(got).all())
            got, want = got[:, :, 1:], want[:, :, 1:]
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5, rtol=0, err_msg=name)
    assert len(numpy_path) == len(_masks(B, H, L, T))


def test_single_tokens_and_half_precision_keep_the_fused_kernel(numpy_path):
    q, k = mx.random.normal((1, 4, 1, 64)), mx.random.normal((1, 2, 50, 64))
    attn.attention(q, k, k, 0.125, None)
    q = mx.random.normal((1, 4, 8, 64)).astype(mx.bfloat16)
    attn.attention(q, k.astype(mx.bfloat16), k.astype(mx.bfloat16), 0.125, "causal")
    assert numpy_path == []


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_model_through_the_numpy_softmax_matches_transformers(tiny_model, numpy_path, name):
    folder = tiny_model(name)
    want = reference_logits(load_reference(folder), PROMPT, STEPS)
    got = backend_logits(Session(MLXBackend(prepare_model(str(folder)), "float32")), PROMPT, STEPS)
    assert np.abs(got - want).max() < 1e-4
    assert numpy_path  # the prompt's prefill took it


def test_batched_engine_through_the_numpy_softmax_keeps_every_token(tiny_model, numpy_path, monkeypatch):
    """Left-padded rows prefilled together in chunks (boolean B 1 L T masks) give each request its tokens
    alone: tests/test_engine.py's check, run with the numpy softmax on every chunk."""
    from qwen_mlx.backends import load
    from tests.support.engine import assert_batch_of_8_gives_each_request_its_tokens_alone

    loaded = load("mlx", str(tiny_model("gqa2-untied")), "float32")
    monkeypatch.setattr(loaded.tokenizer, "eos_token_ids", frozenset())
    assert_batch_of_8_gives_each_request_its_tokens_alone(loaded)
    assert numpy_path
