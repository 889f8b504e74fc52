"""`export-onnx --attention gqa`: one GroupQueryAttention per layer, run by our backend to the same greedy tokens
as the standard graph and MLX; the genai config it needs; the models it must refuse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.onnx_backend import OnnxBackend
from export.onnx_export import export_onnx
from qwen_mlx.checkpoint import prepare_model
from qwen_mlx.errors import QwenError

PROMPT = np.random.default_rng(3).integers(0, 500, size=19).tolist()
STEPS = 12


@pytest.fixture(scope="module")
def folders(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> dict:
    # mqa-headdim: 4 query heads on 1 kv head, head_dim 32 (the op needs a multiple of 16), untied head.
    ckpt = prepare_model(str(tiny_model("mqa-headdim")))
    root = tmp_path_factory.mktemp("gqa")
    out = {"ckpt": ckpt}
    for attention in ("standard", "gqa"):
        export_onnx(ckpt, root / attention, validate=False, attention=attention)
        out[attention] = root / attention
    return out


def greedy(backend, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    backend.trim(0)
    logits, tokens, history = backend.forward(prompt), [], []
    for _ in range(steps):
        history.append(logits)
        tokens.append(int(np.argmax(logits)))
        logits = backend.forward(tokens[-1:])
    return tokens, history


def test_gqa_graph_shape(folders):
    model = onnx.load(str(folders["gqa"] / "onnx" / "model.onnx"), load_external_data=False)
    layers = folders["ckpt"].args.num_hidden_layers
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == layers and all(n.domain == "com.microsoft" for n in gqa)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa[0].attribute}
    assert attrs["do_rotary"] == 1 and attrs["rotary_interleaved"] == 0 and attrs["num_heads"] == 4
    assert attrs["kv_num_heads"] == 1
    assert list(gqa[0].input[1:3]) == ["", ""]  # q/k/v packed: one fused MatMul feeds the op
    names = [i.name for i in model.graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "past_key_values.0.key"]  # no position_ids
    # Every residual Add + RMSNorm is one node (all but layer 0's input norm, which has no residual before it).
    skip = [n for n in model.graph.node if n.op_type == "SkipSimplifiedLayerNormalization"]
    assert len(skip) == 2 * layers and all(n.domain == "com.microsoft" for n in skip)
    # Nothing of the standard attention is left: no Softmax, no additive mask.
    assert not [n for n in model.graph.node if n.op_type in ("Softmax", "Where", "Concat")]

    config = json.loads((folders["gqa"] / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True
    assert "position_ids" not in config["model"]["decoder"]["inputs"]
    standard = json.loads((folders["standard"] / "genai_config.json").read_text())
    assert standard["search"]["past_present_share_buffer"] is False


def test_gqa_tokens_equal_standard_and_mlx(folders):
    standard_tokens, standard_logits = greedy(OnnxBackend(folders["standard"]), PROMPT, STEPS)
    gqa_backend = OnnxBackend(folders["gqa"])
    assert gqa_backend.fused_attention
    gqa_tokens, gqa_logits = greedy(gqa_backend, PROMPT, STEPS)
    assert gqa_tokens == standard_tokens
    diff = max(float(np.abs(a - b).max()) for a, b in zip(standard_logits, gqa_logits))
    assert diff < 1e-4, diff
    # Trimming the cache (the prompt cache does) then decoding again gives the same continuation.
    gqa_backend.trim(len(PROMPT) + 3)
    logits = gqa_backend.forward(gqa_tokens[3:4])
    assert int(np.argmax(logits)) == gqa_tokens[4]
    mlx_backend = pytest.importorskip("qwen_mlx.mlx_backend")
    mlx_tokens, _ = greedy(mlx_backend.MLXBackend(folders["ckpt"], "float32"), PROMPT, STEPS)
    assert mlx_tokens == gqa_tokens


@pytest.mark.parametrize("name, reason", [("dynamic", "dynamic NTK"), ("gqa2-untied", "multiple of 16")])
def test_gqa_refused_with_reason(tiny_model, tmp_path: Path, name: str, reason: str):
    ckpt = prepare_model(str(tiny_model(name)))
    with pytest.raises(QwenError, match=reason):
        export_onnx(ckpt, tmp_path / "out", attention="gqa")
    assert not (tmp_path / "out").exists()  # refused before any work


def test_unknown_attention_form(tiny_model, tmp_path: Path):
    with pytest.raises(QwenError, match="unknown attention form"):
        export_onnx(prepare_model(str(tiny_model("gqa2-untied"))), tmp_path / "out", attention="flash")
