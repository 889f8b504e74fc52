"""qwen_mlx/models/ as a package: every supported model_type finds its family (MLX and the torch twin), every
cache kind keeps the one protocol, and attention goes through the one entry point whatever the cache."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from qwen_mlx.config import SUPPORTED_MODEL_TYPES
from qwen_mlx.models import FAMILIES, model_class
from qwen_mlx.models.base import attention, quantized_attention, scaled_dot_product_attention
from qwen_mlx.models.cache import BatchKVCache, KVCache, QuantizedKVCache, make_cache


def test_every_supported_model_type_has_a_family_on_both_sides():
    from export.models import model_class as twin_class

    assert set(FAMILIES) == set(SUPPORTED_MODEL_TYPES)
    for model_type in SUPPORTED_MODEL_TYPES:
        mlx_cls = model_class(model_type)
        assert callable(getattr(mlx_cls, "sanitize")) and callable(getattr(mlx_cls, "make_cache"))
        torch_cls = twin_class(model_type)
        assert mlx_cls.__name__ == torch_cls.__name__  # twins pair by name as well as by path
        assert callable(getattr(torch_cls, "sanitize"))


def _kv(rng: np.random.Generator, L: int) -> tuple[mx.array, mx.array]:
    return (mx.array(rng.standard_normal((1, 2, L, 64)).astype(np.float32)),
            mx.array(rng.standard_normal((1, 2, L, 64)).astype(np.float32)))


@pytest.mark.parametrize("kind", ["float", "quantized"])
def test_cache_protocol_update_trim_fill(kind):
    rng = np.random.default_rng(0)
    cache = make_cache(1, kv_bits=8 if kind == "quantized" else None)[0]
    assert isinstance(cache, QuantizedKVCache if kind == "quantized" else KVCache) and cache.trimmable
    k, v = _kv(rng, 5)
    cache.update(k, v)
    cache.update(*_kv(rng, 3))
    assert cache.offset == 8
    cache.trim(5)  # O(1): the first 5 positions stay, the next update overwrites the rest
    assert cache.offset == 5
    keys, _ = cache.update(*_kv(rng, 1))
    assert cache.offset == 6 and (keys[0] if kind == "quantized" else keys).shape[2] == 6
    cache.fill(k, v)
    assert cache.offset == 5 and len(cache.state) == (6 if kind == "quantized" else 2)


def test_batch_cache_is_not_trimmable_and_keeps_per_row_positions():
    rng = np.random.default_rng(1)
    k, v = _kv(rng, 4)
    batch = BatchKVCache(mx.concatenate([k, k]), mx.concatenate([v, v]), left=[0, 2])
    assert not batch.trimmable
    assert batch.offset.tolist() == [4, 2]  # row 1 is left-padded by 2
    batch.update(*(mx.concatenate([x, x]) for x in _kv(rng, 1)))
    assert batch.offset.tolist() == [5, 3] and len(batch.state) == 2


def test_attention_entry_point_dispatches_on_the_cache():
    rng = np.random.default_rng(2)
    q = mx.array(rng.standard_normal((1, 4, 3, 64)).astype(np.float32))
    k, v = _kv(rng, 3)
    plain = KVCache()
    got = scaled_dot_product_attention(q, *plain.update(k, v), plain, 0.125, "causal")
    assert np.allclose(np.array(got), np.array(attention(q, k, v, 0.125, "causal")), atol=1e-6)
    quant = QuantizedKVCache(8)
    qk, qv = quant.update(k, v)
    got = scaled_dot_product_attention(q, qk, qv, quant, 0.125, "causal")
    want = quantized_attention(q, qk, qv, 0.125, "causal", quant.group_size, quant.bits)
    assert np.array_equal(np.array(got), np.array(want))
