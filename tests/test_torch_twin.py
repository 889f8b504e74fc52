"""The PyTorch twin (export/model.py) against HF transformers and the MLX model, on every tiny config.

The reference is HF's own incremental decode (DynamicCache): for dynamic rope that is what matters, since
HF grows the base step by step and keeps keys already rotated with the old one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qwen_mlx.checkpoint import prepare_model
from qwen_mlx.generate import Session, greedy_tokens
from tests.tiny_models import TINY_CONFIGS, write_tiny_model

from export.torch_backend import TorchBackend

PROMPT = np.random.default_rng(0).integers(0, 512, size=20).tolist()
STEPS = np.random.default_rng(1).integers(0, 512, size=24).tolist()  # 44 tokens: past dynamic's 16


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("twin")
    return {name: write_tiny_model(root / name, name, with_tokenizer=False) for name in TINY_CONFIGS}


def hf_logits(folder: Path) -> list[np.ndarray]:
    from transformers import DynamicCache, Qwen2ForCausalLM

    ref = Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref(torch.tensor([PROMPT]), past_key_values=DynamicCache(config=ref.config), use_cache=True)
        logits = [out.logits[0, -1].numpy()]
        for t in STEPS:
            out = ref(torch.tensor([[t]]), past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[0, -1].numpy())
    return logits


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_twin_matches_transformers(folders: dict[str, Path], name: str) -> None:
    reference = hf_logits(folders[name])
    session = Session(TorchBackend(prepare_model(str(folders[name]))))
    ours = [session.prefill(PROMPT)] + [session.step(t) for t in STEPS]
    for i, (r, o) in enumerate(zip(reference, ours)):
        np.testing.assert_allclose(o, r, atol=1e-4, rtol=0, err_msg=f"{name}: step {i}")
    assert [int(np.argmax(r)) for r in reference] == [int(np.argmax(o)) for o in ours]


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_twin_greedy_equals_transformers_and_mlx(folders: dict[str, Path], name: str) -> None:
    from transformers import Qwen2ForCausalLM

    ckpt = prepare_model(str(folders[name]))
    ours = greedy_tokens(Session(TorchBackend(ckpt)), PROMPT, 12)
    ref = Qwen2ForCausalLM.from_pretrained(folders[name], dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, repetition_penalty=1.0,
                           eos_token_id=None, pad_token_id=0)
    assert ours == out[0, len(PROMPT):].tolist()
    mlx_backend = pytest.importorskip("qwen_mlx.mlx_backend")
    assert greedy_tokens(Session(mlx_backend.MLXBackend(ckpt, "float32")), PROMPT, 12) == ours


def test_float16_twin_close_and_cache_trim(folders: dict[str, Path]) -> None:
    """float16 keeps norms and softmax in float32: close to float32; trim re-runs a suffix identically."""
    ckpt = prepare_model(str(folders["gqa2-untied"]))
    full, half = TorchBackend(ckpt), TorchBackend(ckpt, "float16")
    assert half.device.endswith("float16")
    a, b = full.forward(PROMPT), half.forward(PROMPT)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    first = full.forward(STEPS[:3])
    full.trim(len(PROMPT))
    assert full.cache_length == len(PROMPT)
    np.testing.assert_allclose(full.forward(STEPS[:3]), first, atol=1e-5)


def test_bad_dtype(folders: dict[str, Path]) -> None:
    from qwen_mlx.errors import QwenError

    with pytest.raises(QwenError, match="dtype"):
        TorchBackend(prepare_model(str(folders["mha-tied"])), "int3")
