"""`export-onnx --attention gqa`: one GroupQueryAttention per layer, run by our backend to the same greedy tokens
as the standard graph and MLX; the genai config it needs; the models it must refuse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.backends.onnx import OnnxBackend
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
    assert gqa_backend.batched(4) is None  # the engine's left-padded batches would break the op: serial path
    gqa_tokens, gqa_logits = greedy(gqa_backend, PROMPT, STEPS)
    assert gqa_tokens == standard_tokens
    diff = max(float(np.abs(a - b).max()) for a, b in zip(standard_logits, gqa_logits))
    assert diff < 1e-4, diff
    # Trimming the cache (the prompt cache does) then decoding again gives the same continuation.
    gqa_backend.trim(len(PROMPT) + 3)
    logits = gqa_backend.forward(gqa_tokens[3:4])
    assert int(np.argmax(logits)) == gqa_tokens[4]
    mlx_backend = pytest.importorskip("qwen_mlx.backends.mlx")
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


def _run(session, ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    names = [i.name for i in session.get_inputs()]
    logits, *present = session.run(None, {"input_ids": ids, "attention_mask": mask, **dict(zip(names[2:], past))})
    return logits, present


def test_gqa_right_padded_batch_is_exact(folders):
    """What the op assumes (export/gqa.py): a right-padded row computes what it computes alone, prompt and a
    decode step after it (each row's new token goes right after its own valid keys)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(folders["gqa"] / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    args = folders["ckpt"].args
    empty = [np.zeros((1, args.num_key_value_heads, 0, args.head_dim), np.float32)] * (2 * args.num_hidden_layers)
    long, short = PROMPT, PROMPT[:-4]
    ids = np.array([long, short + [0] * 4], np.int64)
    mask = np.array([[1] * len(long), [1] * len(short) + [0] * 4], np.int64)
    logits, past = _run(session, ids, mask, [np.concatenate([e, e]) for e in empty])
    alone, alone_past = _run(session, np.array([short]), np.ones((1, len(short)), np.int64), empty)
    np.testing.assert_allclose(logits[1, len(short) - 1], alone[0, -1], atol=1e-4)
    step = np.array([[7], [9]], np.int64)
    mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    mask[1, len(short)] = 1  # row 1's new token takes the first padded slot...
    mask[1, -1] = 0  # ...so the row still counts len(short) + 1 valid tokens
    logits, _ = _run(session, step, mask, past)
    alone, _ = _run(session, np.array([[9]]), np.ones((1, len(short) + 1), np.int64), alone_past)
    np.testing.assert_allclose(logits[1, 0], alone[0, 0], atol=1e-4)


def test_eager_op_matches_the_twin(folders):
    """The custom op's torch reference (what tracing sees) computes the twin's attention."""
    import torch

    from export.gqa import GQAForCausalLM
    from export.models.load import load_model

    ckpt = folders["ckpt"]
    twin = load_model(ckpt)
    ids = torch.tensor([PROMPT])
    T = len(PROMPT)
    expected, _ = twin(ids, torch.ones(1, T, dtype=torch.int64), torch.arange(T)[None], twin.empty_cache())
    fused = GQAForCausalLM(load_model(ckpt))
    got, presents = fused(ids, torch.ones(1, T, dtype=torch.int64), load_model(ckpt).empty_cache())
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    step, _ = fused(torch.tensor([[5]]), torch.ones(1, T + 1, dtype=torch.int64), presents)
    want, _ = twin(torch.tensor([[5]]), torch.ones(1, T + 1, dtype=torch.int64), torch.tensor([[T]]),
                   twin(ids, torch.ones(1, T, dtype=torch.int64), torch.arange(T)[None], twin.empty_cache())[1])
    torch.testing.assert_close(step, want, atol=1e-4, rtol=1e-4)
