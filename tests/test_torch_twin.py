"""The PyTorch twin (export/models/qwen2.py) against HF transformers and the MLX model, on every tiny config.

The reference is HF's own incremental decode (DynamicCache): for dynamic rope that is what matters, since
HF grows the base step by step and keeps keys already rotated with the old one.
"""

from __future__ import annotations

import numpy as np
import pytest

from export.backends.torch import TorchBackend
from qwen_mlx.checkpoint import prepare_model
from qwen_mlx.errors import QwenError
from qwen_mlx.backends.base import Session, greedy_tokens
from benchmarks.quality.reference import backend_logits, load_reference, reference_greedy, reference_logits
from benchmarks.checkpoints.tiny_models import TINY_CONFIGS

PROMPT = np.random.default_rng(0).integers(0, 512, size=20).tolist()
STEPS = np.random.default_rng(1).integers(0, 512, size=24).tolist()  # 44 tokens: past dynamic's 16


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_twin_matches_transformers(tiny_model, name: str) -> None:
    folder = tiny_model(name)
    reference = reference_logits(load_reference(folder), PROMPT, STEPS)
    ours = backend_logits(Session(TorchBackend(prepare_model(str(folder)))), PROMPT, STEPS)
    for i, (r, o) in enumerate(zip(reference, ours)):
        np.testing.assert_allclose(o, r, atol=1e-4, rtol=0, err_msg=f"{name}: step {i}")
    assert reference.argmax(-1).tolist() == ours.argmax(-1).tolist()


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_twin_greedy_equals_transformers_and_mlx(tiny_model, name: str) -> None:
    folder = tiny_model(name)
    ckpt = prepare_model(str(folder))
    ours = greedy_tokens(Session(TorchBackend(ckpt)), PROMPT, 12)
    assert ours == reference_greedy(load_reference(folder), PROMPT, 12)
    mlx_backend = pytest.importorskip("qwen_mlx.backends.mlx")
    assert greedy_tokens(Session(mlx_backend.MLXBackend(ckpt, "float32")), PROMPT, 12) == ours


def test_float16_twin_close_and_cache_trim(tiny_model) -> None:
    """float16 keeps norms and softmax in float32: close to float32; trim re-runs a suffix identically."""
    ckpt = prepare_model(str(tiny_model("gqa2-untied")))
    full, half = TorchBackend(ckpt), TorchBackend(ckpt, "float16")
    assert half.device.endswith("float16")
    a, b = full.forward(PROMPT), half.forward(PROMPT)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    first = full.forward(STEPS[:3])
    full.trim(len(PROMPT))
    assert full.cache_length == len(PROMPT)
    np.testing.assert_allclose(full.forward(STEPS[:3]), first, atol=1e-5)


def test_bad_dtype(tiny_model) -> None:
    with pytest.raises(QwenError, match="dtype"):
        TorchBackend(prepare_model(str(tiny_model("mha-tied"))), "int3")
