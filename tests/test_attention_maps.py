"""Attention maps equal HF transformers' eager attentions (output_attentions=True), and the CLI around them."""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.cli import run

CONFIGS = ["gqa2-untied", "mha-tied", "mqa-headdim", "yarn", "qwen3-untied", "qwen3-bias-tied", "qwen3moe-norm"]


def hf_attentions(folder, ids) -> np.ndarray:
    """[layers, heads, T, T] from HF's eager attention."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                              dtype=torch.float32)
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_attentions=True)
    return np.stack([a[0].numpy() for a in out.attentions])


@pytest.mark.parametrize("name", CONFIGS)
def test_attention_maps_equal_hf_eager(tiny_model, name):
    from qwen_mlx.attention_maps import attention_maps, float64_model
    from qwen_mlx.checkpoint import prepare_model
    from qwen_mlx.models.load import load_model

    folder = tiny_model(name)
    ckpt = prepare_model(str(folder))
    ids = [(7 * i + 3) % 500 for i in range(40)]
    ref = hf_attentions(folder, ids)
    model = load_model(ckpt, "float32")
    n_layers, n_heads = ckpt.args.num_hidden_layers, ckpt.args.num_attention_heads
    got = attention_maps(model, ids, list(range(n_layers)), list(range(n_heads)))
    assert got.shape == ref.shape == (n_layers, n_heads, 40, 40) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    # a subset in the order asked; the hooks are gone afterwards
    sub = attention_maps(model, ids, [1], [n_heads - 1, 0])
    np.testing.assert_allclose(sub, ref[[1]][:, [n_heads - 1, 0]], atol=1e-5, rtol=0)
    assert all(layer.self_attn.on_weights is None for layer in model.model.layers)
    # the float64 path (the CLI's default): HF's RoPE angles and RMSNorm, yarn's factor and q/k norms included
    if not ckpt.args.num_experts:  # MoE: MLX's gather_mm has no float64 (float64_model refuses it)
        exact = attention_maps(float64_model(model), ids, list(range(n_layers)), list(range(n_heads)))
        np.testing.assert_allclose(exact, ref, atol=1e-5, rtol=0)


def test_cli_writes_npz_and_png(tiny_model, tmp_path):
    folder = str(tiny_model("gqa2-untied"))
    npz = tmp_path / "a.npz"
    r = run("attention", "--model", folder, "--prompt", "Hello there", "--layers", "1,0", "--heads", "3",
            "--out", str(npz))
    assert r.returncode == 0, r.stderr
    data = np.load(npz)
    from qwen_mlx.tokenizer import Tokenizer
    tok = Tokenizer.from_folder(folder)
    ids = tok.encode_chat([{"role": "user", "content": "Hello there"}])
    T = len(ids)
    assert data["attentions"].shape == (2, 1, T, T) and data["attentions"].dtype == np.float32
    assert list(data["tokens"]) == [tok.decode([i]) for i in ids]
    assert "<|im_start|>" in list(data["tokens"])
    ref = hf_attentions(folder, ids)
    np.testing.assert_allclose(data["attentions"], ref[[1, 0]][:, [3]], atol=1e-5, rtol=0)

    png = tmp_path / "a.png"
    r = run("attention", "--model", folder, "--prompt", "Hi", "--raw", "--out", str(png))
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


@pytest.mark.parametrize("args, message", [
    (["--layers", "2"], "unknown layer 2"),
    (["--heads", "0,4"], "unknown head 4"),
    (["--layers", "a"], "--layers takes comma-separated integers"),
    (["--out", "x.jpg"], "--out must end in .png or .npz"),
])
def test_cli_refuses_bad_input(tiny_model, tmp_path, args, message):
    folder = str(tiny_model("gqa2-untied"))
    base = ["attention", "--model", folder, "--prompt", "Hi", "--out", str(tmp_path / "a.npz")]
    r = run(*base, *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


def hf_attentions_float64(folder, ids) -> np.ndarray:
    """HF's eager attention with the model in float64 and its softmax too.

    HF's eager_attention_forward takes the softmax in float32 whatever the model's dtype, so its float64
    maps carry the rounding of each score to float32: on the real checkpoint, whose first layer has scores
    up to ~1,500 (float32 step ~1.2e-4), that alone moves them 1.7e-5 from the exact maps (measured against
    a float64 numpy computation of layer 0). This wraps HF's own function, changing only that cast."""
    import torch
    import transformers
    from transformers.models.qwen2 import modeling_qwen2

    def eager_float64(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key, value = (modeling_qwen2.repeat_kv(x, module.num_key_value_groups) for x in (key, value))
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = torch.softmax(scores, dim=-1)  # float64: the one change
        return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights

    original = modeling_qwen2.eager_attention_forward
    modeling_qwen2.eager_attention_forward = eager_float64
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                                  dtype=torch.float64)
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_attentions=True)
    finally:
        modeling_qwen2.eager_attention_forward = original
    return np.stack([a[0].numpy() for a in out.attentions])


@pytest.mark.real
def test_real_checkpoint_attention_equals_hf_eager(real_model_dir):
    from qwen_mlx.attention_maps import attention_maps, float64_model
    from qwen_mlx.checkpoint import prepare_model
    from qwen_mlx.models.load import load_model
    from qwen_mlx.tokenizer import Tokenizer

    ckpt = prepare_model(str(real_model_dir))
    ids = Tokenizer.from_folder(real_model_dir).encode_chat([{"role": "user", "content": "What is 2+2?"}])
    got = attention_maps(float64_model(load_model(ckpt, "float32")), ids, list(range(24)), list(range(14)))
    # The float64 maps (the CLI's default) against HF run in float64: every layer to 1e-5.
    np.testing.assert_allclose(got, hf_attentions_float64(real_model_dir, ids), atol=1e-5, rtol=0)
    # HF's float32 eager maps are themselves 5.9e-5 from its float64 ones in layer 0 (scores ~1,500 rounded
    # to float32 in the projections, RoPE and softmax); the float64 maps are as near them as that allows.
    ref = hf_attentions(real_model_dir, ids)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert (np.abs(got - ref) > 1e-5).mean() < 1e-3
