"""Quantized KV cache (--kv-bits): attention over the stored codes equals attention over their dequantized
values, the logits stay within a measured distance of the float cache, greedy runs, and what cannot work
is refused."""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.cli import run

DOC = [(7 * i + 3) % 500 for i in range(300)]  # crosses the cache's 256-position growth step


def _loaded(folder, **kw):
    from qwen_mlx.backends import load
    return load("mlx", str(folder), "float32", **kw)


class FakeQuantKVCache:
    """The reference: a float KVCache holding dequantize(quantize(x)) (mx.quantize's own rounding), so the
    fused float kernel attends to exactly the values the quantized cache stores."""

    def __init__(self, bits, group_size):
        from qwen_mlx.models.cache import KVCache
        self.inner, self.bits, self.group_size = KVCache(), bits, group_size

    @property
    def offset(self):
        return self.inner.offset

    def update(self, k, v):
        import mlx.core as mx

        def rt(x):
            return mx.dequantize(*mx.quantize(x, self.group_size, self.bits), group_size=self.group_size,
                                 bits=self.bits)
        return self.inner.update(rt(k), rt(v))


def _steps(model, cache, chunks):
    import mlx.core as mx
    return [np.array(model(mx.array([c], dtype=mx.int32), cache, last_only=False)[0]) for c in chunks]


@pytest.mark.parametrize("name,bits,group", [("kv-head64", 8, 64), ("kv-head64", 4, 64), ("qwen3-untied", 4, 32)])
def test_quantized_attention_equals_attention_over_dequantized_values(tiny_model, name, bits, group):
    """Prefill in a long chunk (dequantize + fused kernel on a CPU), short chunks (the quantized matmuls on
    a GPU, dequantize on a CPU) and single-token steps (quantized matmuls, query heads folded per kv head)."""
    from qwen_mlx.models.cache import QuantizedKVCache

    model = _loaded(tiny_model(name)).backend.model
    chunks = [DOC[:260], DOC[260:263], *[[t] for t in DOC[263:300]]]
    got = _steps(model, model.make_cache(bits, group), chunks)
    assert isinstance(model.make_cache(bits, group)[0], QuantizedKVCache)
    ref = _steps(model, [FakeQuantKVCache(bits, group) for _ in model.model.layers], chunks)
    for g, r in zip(got, ref):
        # 1e-3, not 1e-5: a last-bit difference upstream can move a value across a rounding boundary of
        # the codes in a later layer (one step of its group's scale); the float cache differs by ~0.1 here
        np.testing.assert_allclose(g, r, atol=1e-3, rtol=0)


def test_masked_rows_match_the_fused_kernel():
    """quantized_attention with an array mask (B 1 L T bool, left padding) and an additive one, on both
    paths, against the fused kernel over the dequantized keys and values."""
    import mlx.core as mx

    from qwen_mlx.models.base import quantized_attention

    mx.random.seed(0)
    B, H, K, T, D = 2, 4, 2, 40, 64
    k, v = mx.random.normal((B, K, T, D)), mx.random.normal((B, K, T, D))
    qk, qv = mx.quantize(k, 64, 8), mx.quantize(v, 64, 8)
    dk, dv = (mx.dequantize(*x, group_size=64, bits=8) for x in (qk, qv))
    for L in (1, 5):
        q = mx.random.normal((B, H, L, D))
        left = mx.array([0, 7])[:, None, None, None]
        pos = mx.arange(T)[None, None, None, :]
        boolean = (pos >= left) & (pos <= mx.arange(T - L, T)[None, None, :, None])   # B 1 L T
        additive = mx.where(boolean, 0.0, -1e9)
        for mask in (boolean, additive, "causal" if L > 1 else None):
            got = quantized_attention(q, qk, qv, 0.125, mask, 64, 8)
            ref = mx.fast.scaled_dot_product_attention(q, dk, dv, scale=0.125, mask=mask)
            np.testing.assert_allclose(np.array(got), np.array(ref), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bits,bound", [(8, 0.3), (4, 3.0)])
def test_logits_stay_close_to_the_float_cache(tiny_model, bits, bound):
    """Measured on the random tiny model (logits up to ~4.4): max |diff| 0.12 at 8 bits, 1.5 at 4 bits over a
    300-token prefill and 3 steps; bounds at ~2x. Random weights make attention far less peaked than a
    trained model's, so these say the error scales with the bits, not what a real model loses (that is
    docs/BENCHMARKS.md's perplexity)."""
    from qwen_mlx.backends.base import Session

    folder = tiny_model("kv-head64")
    ref, got = Session(_loaded(folder).backend), Session(_loaded(folder, kv_bits=bits).backend)
    diffs = [np.abs(ref.prefill(DOC) - got.prefill(DOC)).max()]
    diffs += [np.abs(ref.step(t) - got.step(t)).max() for t in (5, 9, 11)]
    assert max(diffs) < bound
    assert bits == 4 or max(diffs) < 0.3  # and 8-bit is the tighter of the two


def test_kv_memory_per_token(tiny_model):
    from qwen_mlx.backends.base import Session

    backend = _loaded(tiny_model("kv-head64"), kv_bits=4).backend
    Session(backend).prefill(DOC)
    K, D, layers = backend.args.num_key_value_heads, backend.args.head_dim, backend.args.num_hidden_layers
    # 4-bit codes plus a float32 scale and bias per 64 features, keys and values: 40 bytes per 64 features
    assert sum(c.nbytes for c in backend.cache) == layers * 2 * len(DOC) * K * (D // 2 + 8 * D // 64)


def test_cli_greedy_generate_and_trim(tiny_model):
    """Greedy through the CLI with an 8-bit KV cache, and the same tokens from a Session that trims (the next
    turn of a chat re-uses the common prefix of a quantized cache)."""
    from qwen_mlx.backends.base import Session, greedy_tokens

    folder = tiny_model("kv-head64")
    r = run("generate", "--model", str(folder), "--prompt", "hello there", "--raw", "--temperature", "0",
            "--max-tokens", "6", "--kv-bits", "8")
    assert r.returncode == 0, r.stderr
    backend = _loaded(folder, kv_bits=8).backend
    assert "8-bit KV cache" in backend.device
    session = Session(backend)
    first = greedy_tokens(session, DOC[:40], 6)
    greedy_tokens(session, DOC[:20] + [1, 2, 3], 4)  # shares 20 tokens: the cache is trimmed to them
    assert greedy_tokens(session, DOC[:40], 6) == first


def test_prompt_cache_is_quantized_on_load(tiny_model, tmp_path):
    from qwen_mlx.backends.base import Session
    from qwen_mlx.prompt_cache import load_prompt_cache, save_prompt_cache

    folder = tiny_model("kv-head64")
    path = tmp_path / "doc.safetensors"
    save_prompt_cache(path, _loaded(folder), DOC)
    loaded = _loaded(folder, kv_bits=8)
    cached = load_prompt_cache(path, loaded)
    session = Session(loaded.backend, tokens=list(cached.tokens))
    got = session.prefill(DOC + [7, 8])
    assert session.prefilled == 2
    ref = Session(_loaded(folder).backend).prefill(DOC + [7, 8])
    assert np.abs(got - ref).max() < 0.3  # the float keys rounded to 8 bits: the bound above
    from qwen_mlx.errors import QwenError
    with pytest.raises(QwenError, match="saved in float"):
        save_prompt_cache(tmp_path / "q.safetensors", loaded, DOC)


@pytest.mark.parametrize("args,message", [
    (["generate", "--backend", "torch", "--kv-bits", "8", "--prompt", "hi"], "--kv-bits works with the mlx backend only"),
    (["generate", "--kv-bits", "8", "--kv-group-size", "128", "--prompt", "hi"], "does not divide this model's head_dim 64"),
    (["generate", "--kv-group-size", "32", "--prompt", "hi"], "--kv-group-size needs --kv-bits"),
    (["generate", "--kv-bits", "3", "--prompt", "hi"], "'3' is not one of '4', '8'"),
    (["serve", "--kv-bits", "8"], "serve --kv-bits needs --max-batch 1"),
])
def test_refusals(tiny_model, args, message):
    r = run(*args, "--model", str(tiny_model("kv-head64")))
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_serve_with_kv_bits_runs_one_sequence_at_a_time(tiny_model):
    from qwen_mlx.backends.batching import SerialBatch, batch_backend

    backend = _loaded(tiny_model("kv-head64"), kv_bits=4).backend
    assert isinstance(batch_backend(backend, 1), SerialBatch)
