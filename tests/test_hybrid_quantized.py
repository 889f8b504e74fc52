"""The hybrid family's MLX-quantized folders (Qwen3-Next, Qwen3.5, Qwen3.5-MoE / Qwen3.6), both ways, against
mlx-lm itself: folders `mlx_lm.convert -q` writes (as mlx-community publishes them: mlx-lm's sanitized layout,
conv weight C K 1, zero-centred norms stored as 1 + w, Qwen3.5 under `language_model.`) load here as stored and
give mlx-lm's greedy tokens; `convert --quantize` writes that same layout, which `mlx_lm.load` runs to the tokens
this project reads back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from qwen_mlx.backends.mlx import MLXBackend
from qwen_mlx.checkpoint import Checkpoint, prepare_model
from qwen_mlx.config import ModelArgs
from qwen_mlx.errors import QwenError
from qwen_mlx.formats.affine import QuantParams, module_params
from qwen_mlx.models.load import load_model
from tests.support.hybrid_models import HYBRID_CONFIGS, fuse_experts

pytest.importorskip("mlx_lm")
pytest.importorskip("transformers")

PROMPT = [1, 5, 9, 33, 100, 7, 250, 17, 400, 3]
STEPS = 24
# (tiny model, bits, group size) of mlx-lm's folders: group 32 quantizes the 96-wide MLP down_proj and the 32-wide
# expert down_proj, group 64 leaves them float (folders mixing float and quantized modules). mlx-lm keeps the MoE
# router and shared-expert gate at 8 bits, group 64: per-module overrides under its own module paths.
IN_CASES = [("next-moe", 4, 32), ("q35-tied", 8, 64), ("q35-moe", 4, 64)]
OUT_CASES = [("next-moe", 8, 64), ("q35-tied", 4, 32), ("q35-moe", 4, 32)]


@pytest.fixture(scope="module")
def hybrid(hybrid_model):
    """The session's tiny hybrid checkpoints (tests/conftest.py), built once for every module that reads them."""
    return hybrid_model


def _as_released(src: Path, dst: Path) -> Path:
    """A copy of a tiny transformers-5 folder with what the released checkpoints hold and mlx-lm 0.32 needs:
    Qwen3-Next's rope_theta, partial_rotary_factor and full_attention_interval at the top level of config.json,
    Qwen3.5's tie_word_embeddings in text_config too, and Qwen3.5-MoE's experts fused (its only layout there)."""
    config = json.loads((src / "config.json").read_text())
    if config["model_type"] == "qwen3_5_moe":
        fuse_experts(src, dst)
    else:
        shutil.copytree(src, dst)
    text = config.get("text_config", config)
    if config["model_type"] == "qwen3_next":
        config.update(rope_theta=text["rope_parameters"]["rope_theta"],
                      partial_rotary_factor=text["rope_parameters"]["partial_rotary_factor"],
                      full_attention_interval=config["layer_types"].index("full_attention") + 1)
    else:
        text["tie_word_embeddings"] = config["tie_word_embeddings"]
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def mlx_lm_quantized(hybrid, tmp_path_factory: pytest.TempPathFactory):
    """mlx_lm_quantized(name, bits, group) -> a folder mlx_lm.convert -q wrote (built once)."""
    from mlx_lm import convert

    built: dict[tuple, Path] = {}

    def get(name: str, bits: int, group: int) -> Path:
        if (name, bits, group) not in built:
            root = tmp_path_factory.mktemp(f"{name}-mlx-lm-q{bits}")
            src = _as_released(hybrid(name), root / "hf")
            convert(str(src), str(root / "q"), quantize=True, q_bits=bits, q_group_size=group)
            built[name, bits, group] = root / "q"
        return built[name, bits, group]

    return get


def _mlx_lm_greedy(folder: Path) -> tuple[np.ndarray, list[int]]:
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(folder))
    logits = np.array(model(mx.array([PROMPT]))[0, -1])
    return logits, [int(t) for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=STEPS)]  # argmax


def _greedy(backend: MLXBackend) -> tuple[np.ndarray, list[int]]:
    first = logits = backend.forward(PROMPT)
    tokens = []
    for _ in range(STEPS):
        tokens.append(int(np.argmax(logits)))
        logits = backend.forward([tokens[-1]])
    return first, tokens


def _close(got: np.ndarray, want: np.ndarray) -> None:
    """Two implementations' float32 logits: the delta rule, experts and quantized matmuls summed in other orders."""
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(want).max()), rtol=0)


def _logits(model) -> np.ndarray:
    return np.array(model(mx.array([PROMPT]), model.make_cache(), last_only=False))


def _packed(backend: MLXBackend) -> int:
    """How many uint32-packed weight tensors the loaded model holds (quantized as stored, not dequantized)."""
    return sum(v.dtype == mx.uint32 for _, v in tree_flatten(backend.model.parameters()))


@pytest.mark.parametrize("name,bits,group", IN_CASES)
def test_mlx_lm_folder_gives_mlx_lm_tokens(mlx_lm_quantized, name, bits, group):
    folder = mlx_lm_quantized(name, bits, group)
    ckpt = prepare_model(str(folder))
    assert ckpt.quantization["bits"] == bits
    if HYBRID_CONFIGS[name].get("num_experts"):  # mlx-lm's override, named as this project names the router
        assert module_params(ckpt.quantization, "model.layers.0.mlp.gate") == QuantParams(64, 8)
    ours = MLXBackend(ckpt, "float32")
    assert f"{bits}-bit as stored" in ours.device and _packed(ours) > 0
    ref_logits, ref_tokens = _mlx_lm_greedy(folder)
    logits, tokens = _greedy(ours)
    _close(logits, ref_logits)
    assert tokens == ref_tokens


@pytest.mark.parametrize("name,bits,group", OUT_CASES)
def test_convert_quantize_runs_in_mlx_lm(hybrid, mlx_lm_quantized, tmp_path, name, bits, group):
    """Our folder from the unmodified transformers-5 folder: mlx_lm.load runs it as written (its loader is strict:
    every name and shape must be its own) to the tokens this project reads back, which are those of quantizing at
    load time; its tensor names and float shapes are those mlx-lm's own convert writes."""
    from qwen_mlx.convert import quantize_folder

    out = quantize_folder(prepare_model(str(hybrid(name))), tmp_path / "q", bits, group)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"] == {"group_size": group, "bits": bits,
                                                                        "mode": "affine"}
    ours = MLXBackend(prepare_model(str(out)), "float32")
    assert _packed(ours) > 0
    ref_logits, ref_tokens = _mlx_lm_greedy(out)
    logits, tokens = _greedy(ours)
    _close(logits, ref_logits)
    assert tokens == ref_tokens
    at_load = load_model(prepare_model(str(hybrid(name))), "float32", quantize=bits, group_size=group)
    np.testing.assert_allclose(_logits(ours.model), _logits(at_load), atol=1e-6, rtol=0)
    written = mx.load(str(out / "model.safetensors"))
    reference = mx.load(str(mlx_lm_quantized(*next(c for c in IN_CASES if c[0] == name)) / "model.safetensors"))
    assert {k.rsplit(".", 1)[0] for k in written} == {k.rsplit(".", 1)[0] for k in reference}  # modules
    assert {k: v.shape for k, v in written.items() if v.ndim < 2 or "conv1d" in k} == \
        {k: v.shape for k, v in reference.items() if v.ndim < 2 or "conv1d" in k}  # norms, decay, conv as mlx-lm's


def test_convert_command_writes_a_folder_mlx_lm_runs(hybrid, tmp_path):
    """The command a user runs: its folder gives the same greedy tokens in mlx-lm as here."""
    from tests.support.cli import run

    out = tmp_path / "q"
    r = run("convert", "--model", str(hybrid("q35-moe")), "--quantize", "8", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert _greedy(MLXBackend(prepare_model(str(out)), "float32"))[1] == _mlx_lm_greedy(out)[1]


def _text_only(src: Path, dst: Path) -> Path:
    """Qwen3.5's text model as the text-only class saves it (`Qwen3_5MoeForCausalLM`: model_type
    `qwen3_5_moe_text`, a flat config, `model.layers...`), from the multimodal folder."""
    shutil.copytree(src, dst)
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config["text_config"], "tie_word_embeddings": False}))
    weights = mx.load(str(src / "model.safetensors"))
    mx.save_safetensors(str(dst / "model.safetensors"), {k.replace("model.language_model.", "model."): v
                                                         for k, v in weights.items() if "visual" not in k})
    return dst


def test_a_text_only_qwen35_converts_to_a_type_mlx_lm_has(hybrid, tmp_path):
    """mlx-lm has no qwen3_5_moe_text module: the folder says qwen3_5_moe, whose class takes a flat config."""
    from qwen_mlx.convert import quantize_folder

    src = _text_only(hybrid("q35-moe"), tmp_path / "text")
    out = quantize_folder(prepare_model(str(src)), tmp_path / "q", 8, 64)
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3_5_moe"
    assert _greedy(MLXBackend(prepare_model(str(out)), "float32"))[1] == _mlx_lm_greedy(out)[1]


@pytest.mark.parametrize("change,message", [
    ({"layer_types": ["linear_attention", "full_attention", "full_attention", "full_attention"]},
     "not every n-th layer full attention"),
    ({"shared_expert_intermediate_size": 0}, "no shared expert"),
    ({"mlp_only_layers": [1]}, "not every layer is MoE"),
])
def test_convert_refuses_what_mlx_lm_would_run_otherwise(tmp_path, change, message):
    from qwen_mlx.convert import quantize_folder

    config = {**HYBRID_CONFIGS["q35-moe"], **change}
    ckpt = Checkpoint(tmp_path, ModelArgs.from_dict(config), {})
    with pytest.raises(QwenError, match=message):
        quantize_folder(ckpt, tmp_path / "q", 4)
    assert not (tmp_path / "q").exists()


def test_a_folder_mixing_conv_layouts_is_one_error(mlx_lm_quantized, tmp_path):
    from tests.support.cli import run

    folder = tmp_path / "mixed"
    shutil.copytree(mlx_lm_quantized(*IN_CASES[0]), folder)
    weights = mx.load(str(folder / "model.safetensors"))
    key = "model.layers.0.linear_attn.conv1d.weight"
    weights[key] = weights[key].swapaxes(1, 2)  # HF's C 1 K beside mlx-lm's C K 1 in layer 2
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    r = run("generate", "--model", str(folder), "--prompt", "hi", "--max-tokens", "2")
    assert r.returncode != 0 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert "both HF's C 1 K and mlx-lm's C K 1" in r.stderr
