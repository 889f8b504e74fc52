"""Dual Chunk Attention (qwen_mlx/dual_chunk.py) on MLX and the torch twin against a reference written here.

The reference is a whole Qwen2 forward in float64 numpy, straight from the checkpoint's tensors, with dense
attention over the sequence where each (query, key) pair's rotary positions come from explicit matrices
built from DCA's definitions (HF transformers has no DCA). The tiny "dca" config cuts chunks of 12 tokens
(chunk_size 16, local_size 4) and sharpens logits past 32 tokens, so a 60-token prompt and 32 decoded tokens
cross seven chunk boundaries and take every kind of attention.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from export.backends.torch import TorchBackend
from qwen_mlx.checkpoint import prepare_model
from qwen_mlx.backends.base import Session, greedy_tokens
from benchmarks.quality.reference import backend_logits

PROMPT = np.random.default_rng(7).integers(0, 512, size=60).tolist()


# ---- the reference ------------------------------------------------------------------------------------
def dca_positions(n: int, chunk_size: int, local_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(query positions [n, n], key positions [n]) for every query i and key j <= i, from the definitions:
    chunks of c = chunk_size - local_size tokens; a key sits at j mod c; a query at i mod c against its
    own chunk, at min(i mod c + c, chunk_size) against the chunk before, and at min(2c - 1, chunk_size)
    against every earlier chunk."""
    c = chunk_size - local_size
    qpos = np.zeros((n, n), dtype=np.int64)
    for i in range(n):
        for j in range(i + 1):
            if i // c == j // c:
                qpos[i, j] = i % c
            elif i // c - j // c == 1:
                qpos[i, j] = min(i % c + c, chunk_size)
            else:
                qpos[i, j] = min(2 * c - 1, chunk_size)
    return qpos, np.arange(n) % c


def rotary(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """x [..., D] rotated at positions [...] (split-half RoPE, as Qwen2)."""
    D = x.shape[-1]
    angles = positions[..., None] * theta ** (-np.arange(0, D, 2) / D)               # ... D/2
    cos, sin = np.cos(angles), np.sin(angles)
    a, b = x[..., :D // 2], x[..., D // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def reference_logits(folder: Path, ids: list[int], dca: bool = True) -> np.ndarray:
    """float64 logits [n, V] at every position of `ids`, recomputed from scratch."""
    cfg = json.loads((folder / "config.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(str(folder / "model.safetensors")).items()}
    n, H, K = len(ids), cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg["hidden_size"] // H
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]  # transformers 5 nests it
    if dca:
        dc = cfg["dual_chunk_attention_config"]
        qpos, kpos = dca_positions(n, dc["chunk_size"], dc["local_size"])
        orig = dc["original_max_position_embeddings"]
        m = np.maximum(1.0, 0.1 * np.log(np.arange(1, n + 1) / orig) + 1.0)            # per position
    else:
        qpos, kpos, m = np.tile(np.arange(n)[:, None], (1, n)), np.arange(n), np.ones(n)  # plain: at i, at j

    def norm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg["rms_norm_eps"]) * weight

    x = w["model.embed_tokens.weight"][ids]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = norm(x, w[p + "input_layernorm.weight"])
        proj = {name: h @ w[f"{p}self_attn.{name}_proj.weight"].T + w[f"{p}self_attn.{name}_proj.bias"]
                for name in "qkv"}
        q = proj["q"].reshape(n, H, D) * m[:, None, None]
        k = rotary(proj["k"].reshape(n, K, D) * m[:, None, None], kpos[:, None], theta)
        v = proj["v"].reshape(n, K, D)
        out = np.zeros((n, H, D))
        for head in range(H):
            g = head // (H // K)
            # query i rotated at qpos[i, j] for each key j: [n, n, D]
            qi = rotary(np.broadcast_to(q[:, None, head], (n, n, D)), qpos, theta)
            scores = np.einsum("ijd,jd->ij", qi, k[:, g]) / np.sqrt(D)
            scores[np.triu_indices(n, 1)] = -np.inf
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            out[:, head] = (probs / probs.sum(-1, keepdims=True)) @ v[:, g]
        x = x + out.reshape(n, H * D) @ w[p + "self_attn.o_proj.weight"].T
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    return norm(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


def reference_greedy(folder: Path, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):  # no cache: the whole sequence each time
        ids.append(int(reference_logits(folder, ids)[-1].argmax()))
    return ids[len(prompt):]


# ---- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dca_model(tiny_model):
    folder = tiny_model("dca")
    return folder, prepare_model(str(folder))


@pytest.fixture(scope="module")
def greedy_reference(dca_model):
    folder, _ = dca_model
    tokens = reference_greedy(folder, PROMPT, 32)
    return tokens, reference_logits(folder, PROMPT + tokens)


def backends(ckpt):
    mlx_backend = pytest.importorskip("qwen_mlx.backends.mlx")
    return {"mlx": mlx_backend.MLXBackend(ckpt, "float32"), "torch": TorchBackend(ckpt)}


# ---- the tests ----------------------------------------------------------------------------------------
def test_reference_definitions_on_a_small_case():
    """The position matrices for chunk_size 6, local_size 2 (c = 4), written out by hand."""
    qpos, kpos = dca_positions(10, 6, 2)
    assert kpos.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert qpos[3, :4].tolist() == [3, 3, 3, 3]                 # chunk 0: plain
    assert qpos[5, :6].tolist() == [5, 5, 5, 5, 1, 1]           # succ 1 + 4 = 5 (exact), intra 1
    assert qpos[7, :8].tolist() == [6, 6, 6, 6, 3, 3, 3, 3]     # succ 3 + 4 = 7 clamped to 6
    assert qpos[9, :10].tolist() == [6, 6, 6, 6, 5, 5, 5, 5, 1, 1]  # inter min(7, 6), succ 5, intra 1


@pytest.mark.parametrize("name", ["mlx", "torch"])
def test_every_position_matches_the_reference(dca_model, greedy_reference, name):
    """One prefill of 92 tokens (every kind of attention, scaling past 32): logits at all positions."""
    folder, ckpt = dca_model
    tokens, want = greedy_reference
    ids = PROMPT + tokens
    backend = backends(ckpt)[name]
    if name == "mlx":
        import mlx.core as mx
        got = np.array(backend.model(mx.array([ids]), backend.model.make_cache(), last_only=False)[0])
    else:
        import torch
        model = backend.model
        model.last_only = False
        with torch.no_grad():
            got = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.int64),
                        torch.arange(len(ids))[None], model.empty_cache())[0][0].numpy()
        model.last_only = True
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["mlx", "torch"])
def test_greedy_with_kv_cache_across_boundaries(dca_model, greedy_reference, name, monkeypatch):
    """Prefill (in chunks of 7, so chunks of prefill straddle DCA chunks) then 32 cached decode steps:
    the tokens and every step's logits equal the reference's full recompute."""
    import qwen_mlx.backends.base as gen

    _, ckpt = dca_model
    tokens, want = greedy_reference
    backend = backends(ckpt)[name]
    assert greedy_tokens(Session(backend), PROMPT, 32) == tokens
    monkeypatch.setattr(gen, "PREFILL_CHUNK", 7)
    got = backend_logits(Session(backend), PROMPT, tokens[:-1])
    np.testing.assert_allclose(got, want[len(PROMPT) - 1:-1], atol=1e-4, rtol=0)


def test_plain_attention_below_the_first_boundary(dca_model, tmp_path):
    """Up to min(chunk_size, 2c, original) = 16 tokens DCA is plain attention (queries 12..15 already take
    the successive-chunk path); one token further it is not."""
    folder, ckpt = dca_model
    assert np.abs(reference_logits(folder, PROMPT[:16]) - reference_logits(folder, PROMPT[:16], dca=False)).max() < 1e-9
    assert np.abs(reference_logits(folder, PROMPT[:18])[-1] - reference_logits(folder, PROMPT[:18], dca=False)[-1]).max() > 1e-3
    plain_folder = tmp_path / "plain"
    plain_folder.mkdir()
    for f in folder.iterdir():
        (plain_folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    del config["dual_chunk_attention_config"]
    (plain_folder / "config.json").write_text(json.dumps(config))
    plain = backends(prepare_model(str(plain_folder)))
    for name, backend in backends(ckpt).items():
        for n in (12, 16):
            np.testing.assert_allclose(backend.forward(PROMPT[:n]), plain[name].forward(PROMPT[:n]), atol=1e-5,
                                       rtol=0, err_msg=f"{name} at {n} tokens")
            backend.trim(0), plain[name].trim(0)


def test_yarn_composes_with_dca_alike_on_both_backends(dca_model, tmp_path):
    """A YaRN rope_scaling beside the DCA config sets the rotation DCA applies at its positions: MLX and
    the twin agree on it at every position, and it changes the result (it is not dropped)."""
    import mlx.core as mx
    import torch

    folder, ckpt = dca_model
    yarn = tmp_path / "yarn"
    yarn.mkdir()
    for f in folder.iterdir():
        (yarn / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}
    (yarn / "config.json").write_text(json.dumps(config))
    b = backends(prepare_model(str(yarn)))
    ids = PROMPT[:50]
    got = np.array(b["mlx"].model(mx.array([ids]), b["mlx"].model.make_cache(), last_only=False)[0])
    twin = b["torch"].model
    twin.last_only = False
    with torch.no_grad():
        want = twin(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.int64), torch.arange(len(ids))[None],
                    twin.empty_cache())[0][0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(got - reference_logits(folder, ids)).max() > 1e-2


def test_mlx_key_blocks_merge_by_log_sum_exp(dca_model, greedy_reference, monkeypatch):
    """Long contexts take key blocks merged by their log-sum-exp: forced here with blocks of 5 keys (rows
    whose every key in a block is masked included), prefill and decode equal the reference."""
    import qwen_mlx.models.dual_chunk as dca

    monkeypatch.setattr(dca, "SCORES_BUDGET", 0)
    monkeypatch.setattr(dca, "KEY_BLOCK_MIN", 5)
    _, ckpt = dca_model
    tokens, want = greedy_reference
    got = backend_logits(Session(backends(ckpt)["mlx"]), PROMPT, tokens[:8])
    np.testing.assert_allclose(got, want[len(PROMPT) - 1:len(PROMPT) + 8], atol=1e-4, rtol=0)
