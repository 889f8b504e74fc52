"""mlx_lm.convert -q folders through `export-onnx --quantize int4`: the stored codes carried as MatMulNBits and
GatherBlockQuantized (export/stored_quant.py), checked against the folder itself (decoded by MLX, not by us),
against MLX's logits, and run by onnxruntime-genai and transformers.js.

The main folder is tied gqa4-tied, 4-bit, group 32, with bfloat16 scales and biases (mlx-lm converts a bf16
model so, as the mlx-community folders are). MatMulNBits gets no zero points (its default 8), so the
per-group correction c = b + 8 s carries the biases, and a test fails without it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qwen_mlx.checkpoint import prepare_model
from qwen_mlx.backends.mlx import MLXBackend
from tests.support.cli import run
from tests.support.needs import er, needs_peer
from benchmarks.checkpoints.tiny_models import mlx_lm_readable

PROMPT = [1, 5, 9, 33, 100, 7, 250]
STEPS = 8


def _convert(tiny_model, root: Path, name: str, bits: int, group: int, dtype: str | None, **kw) -> Path:
    from mlx_lm import convert

    src = mlx_lm_readable(tiny_model(name), root / "hf")
    convert(str(src), str(root / "q"), quantize=True, q_bits=bits, q_group_size=group, dtype=dtype, **kw)
    return root / "q"


@pytest.fixture(scope="module")
def bf16_export(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    """(the mlx_lm.convert -q folder, its `export-onnx --quantize int4` folder), made once."""
    root = tmp_path_factory.mktemp("mlx-q4-bf16")
    folder = _convert(tiny_model, root, "gqa4-tied", 4, 32, "bfloat16")
    r = run("export-onnx", "--model", str(folder), "--quantize", "int4", "--out", str(root / "onnx"))
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr  # every stored module carried
    return folder, root / "onnx"


def _initializers(folder: Path) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    proto = onnx.load(str(folder / "onnx" / "model_q4.onnx"))
    return proto, {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def _unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """onnxruntime's packing read back: low bits first within each byte."""
    per = 8 // bits
    values = (packed[..., None] >> (np.arange(per) * bits).astype(np.uint8)) & ((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], -1)[..., :n]


def _stored_by_mlx(folder: Path, module: str, group: int, bits: int) -> tuple[np.ndarray, ...]:
    """(codes, scales, biases, weights) of a stored module, decoded by MLX itself (in float32, as the twin)."""
    t = mx.load(str(folder / "model.safetensors"))
    w, s, b = t[f"{module}.weight"], t[f"{module}.scales"].astype(mx.float32), t[f"{module}.biases"].astype(mx.float32)
    codes = mx.dequantize(w, mx.ones(s.shape), mx.zeros(b.shape), group, bits)  # scale 1, bias 0: the codes
    return np.array(codes).astype(np.uint8), np.array(s), np.array(b), np.array(mx.dequantize(w, s, b, group, bits))


def test_matmulnbits_hold_the_stored_codes(bf16_export):
    folder, out = bf16_export
    proto, inits = _initializers(out)
    nodes = {n.name: n for n in proto.graph.node}
    mnb = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    # 2 layers x (qkv, o, gate_up, down) + the tied lm_head; no float MatMul weight is left anywhere
    assert len(mnb) == 9 and not any(n.endswith(".weight.T") for n in inits)
    assert "model.embed_tokens.weight" not in inits
    for node in mnb:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (4, 32, 4)
        name = node.name.removesuffix(".MatMulNBits")
        N, K = attrs["N"], attrs["K"]
        codes = _unpack(inits[node.input[1]], 4, 32).reshape(N, K)
        scales = inits[node.input[2]]
        assert len(node.input) == 3  # no zero points: MatMulNBits' symmetric default 8, the rest in c
        zeros = 8
        corr = inits[f"{name}.correction"]
        corr = corr if corr.shape == (N, K // 32) else corr.T  # the tied head keeps the gathered rows' layout
        leaf = name.rsplit(".", 1)
        modules = ([f"{leaf[0]}.{p}_proj" for p in ("q", "k", "v")] if leaf[-1] == "qkv_proj" else
                   [f"{leaf[0]}.{p}_proj" for p in ("gate", "up")] if leaf[-1] == "gate_up_proj" else [name])
        want = [np.concatenate(x) for x in zip(*(_stored_by_mlx(folder, m, 32, 4) for m in modules))]
        np.testing.assert_array_equal(codes, want[0])
        np.testing.assert_array_equal(scales, want[1])
        # s * (q - z) + c is MLX's s * q + b: the same sums in another order (c rounds once in float32)
        rebuilt = np.repeat(scales, 32, 1) * (codes.astype(np.float32) - zeros) + np.repeat(corr, 32, 1)
        np.testing.assert_allclose(rebuilt, want[3], rtol=0, atol=1e-6 * np.abs(want[3]).max())
        # the correction is needed: without it the weights are off by far more than float rounding
        assert np.abs(rebuilt - np.repeat(corr, 32, 1) - want[3]).max() > 1e-3 * np.abs(want[3]).max()
        assert nodes[f"{name}.corrected"].op_type == "Add"
    # the embedding reads the head's packed bytes through GatherBlockQuantized (+ the gathered correction)
    (gbq,) = [n for n in proto.graph.node if n.op_type == "GatherBlockQuantized"]
    assert list(gbq.input[2:]) == ["model.embed_tokens.scales"]


def _level(out: Path, dst: Path, level: int | None = None, drop_correction: bool = False) -> Path:
    """A copy of the export with every MatMulNBits at `level` and/or the corrections zeroed."""
    shutil.copytree(out, dst)
    proto, _ = _initializers(out)
    for node in proto.graph.node:
        for a in node.attribute:
            if a.name == "accuracy_level" and level is not None:
                a.i = level
    for t in proto.graph.initializer:
        if drop_correction and t.name.endswith(".correction"):
            t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))
    onnx.save(proto, str(dst / "onnx" / "model_q4.onnx"))
    return dst


def _teacher_forced(backend, tokens: list[int], prompt: list[int] = PROMPT) -> list[np.ndarray]:
    backend.trim(0)
    return [backend.forward(prompt)] + [backend.forward([t]) for t in tokens]


def _mlx_reference(folder: Path, prompt: list[int] = PROMPT) -> tuple[list[np.ndarray], list[int]]:
    mlx = MLXBackend(prepare_model(str(folder)), "float32")
    logits, tokens = [mlx.forward(prompt)], []
    for _ in range(STEPS):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(mlx.forward(tokens[-1:]))
    return logits, tokens


def _relative_error(reference: list[np.ndarray], got: list[np.ndarray]) -> float:
    return max(float(np.abs(r - g).max()) for r, g in zip(reference, got)) / max(float(np.abs(r).max()) for r in reference)


def test_onnxruntime_logits_equal_mlx(bf16_export, tmp_path):
    """Float activations (accuracy_level 0): onnxruntime's logits are MLX's on the same folder to float
    rounding (measured 1.3e-6 of the largest logit); without the correction they are not. The exported level
    4 (int8 activations on the CPU) is the lossy default, with the same greedy tokens here."""
    from export.backends.onnx import OnnxBackend

    folder, out = bf16_export
    reference, tokens = _mlx_reference(folder)
    exact = _teacher_forced(OnnxBackend(_level(out, tmp_path / "l0", 0), "float32", "int4"), tokens)
    assert _relative_error(reference, exact) < 1e-5
    assert [int(np.argmax(x)) for x in exact[:-1]] == tokens
    dropped = _teacher_forced(OnnxBackend(_level(out, tmp_path / "nc", 0, True), "float32", "int4"), tokens)
    assert _relative_error(reference, dropped) > 100 * _relative_error(reference, exact)
    default = _teacher_forced(OnnxBackend(out, "float32", "int4"), tokens)
    assert _relative_error(reference, default) < 0.1


@pytest.mark.parametrize("runtime", ["genai", "transformersjs"])
def test_peer_runs_the_carried_export(runtime, bf16_export):
    """onnxruntime-genai and transformers.js load the folder and reproduce our backend's greedy tokens."""
    needs_peer(runtime)
    _, out = bf16_export
    ids = [PROMPT, PROMPT[::-1]]
    ours = er.run_runtime("ours", out, ids, STEPS, onnx_file="model_q4.onnx", quantize="int4")
    assert ours.ok, ours.error
    theirs = er.run_runtime(runtime, out, ids, STEPS, onnx_file="model_q4.onnx", quantize="int4", timeout=600)
    assert theirs.ok, theirs.error
    assert er.compare(ours, theirs) == "yes", (ours.tokens, theirs.tokens)


def _mixed(path: str, module) -> bool | dict:
    """Per-module bits as an mlx-lm recipe gives them: down_proj at 8 bits (group 64), layer 1's o_proj at 3."""
    if not hasattr(module, "to_quantized"):
        return False
    if path.endswith("mlp.down_proj"):
        return {"bits": 8, "group_size": 64, "mode": "affine"}
    if path == "model.layers.1.self_attn.o_proj":
        return {"bits": 3, "group_size": 32, "mode": "affine"}
    return True


def test_mixed_bits_folder_carries_4_and_8_bits(tiny_model, tmp_path):
    """Per-module overrides: 4- and 8-bit modules carried at their own bits and group sizes (exact with float
    activations); a 3-bit module, which MatMulNBits cannot hold, named in a warning and re-quantized to int4
    by onnxruntime's quantizer, never carried wrong."""
    from export.backends.onnx import OnnxBackend

    folder = _convert(tiny_model, tmp_path, "gqa4-tied", 4, 32, None, quant_predicate=_mixed)
    r = run("export-onnx", "--model", str(folder), "--quantize", "int4", "--out", str(tmp_path / "onnx"))
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: model.layers.1.self_attn.o_proj is stored quantized but not carried (3-bit: "
                        "MatMulNBits takes 4 or 8 bits): re-quantized to int4 by onnxruntime's quantizer"]
    proto, inits = _initializers(tmp_path / "onnx")
    shapes = {}
    for n in proto.graph.node:
        if n.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            shapes[n.input[1]] = (attrs["bits"], attrs["block_size"], len(n.input))
    assert shapes["model.layers.0.mlp.down_proj.qweight"] == (8, 64, 3)
    assert shapes["model.layers.0.self_attn.o_proj.qweight"] == (4, 32, 3)
    # the 8-bit codes and scales are the stored ones, and with 128 + c they rebuild MLX's weights (here MLX's
    # biases are exactly -128 * scale: c is all zero and left out)
    down = "model.layers.0.mlp.down_proj"
    codes, scales, _, weights = _stored_by_mlx(folder, down, 64, 8)
    np.testing.assert_array_equal(inits[f"{down}.qweight"].reshape(codes.shape), codes)
    np.testing.assert_array_equal(inits[f"{down}.scales"], scales)
    corr = inits.get(f"{down}.correction", np.zeros(scales.shape[::-1], np.float32)).T
    rebuilt = np.repeat(scales, 64, 1) * (codes - 128.0) + np.repeat(corr, 64, 1)
    np.testing.assert_allclose(rebuilt, weights, rtol=0, atol=1e-6 * np.abs(weights).max())
    # onnxruntime's own symmetric int4, block 32, no zero points, under its own initializer name
    assert [v for k, v in shapes.items() if k.startswith("model.layers.1.self_attn.o_proj.weight.T")] == [(4, 32, 3)]
    # and nothing else: the corrections' small MatMuls stay float
    assert len(shapes) == 9 and not any(".correction" in k for k in shapes)
    reference, tokens = _mlx_reference(folder)
    default = _teacher_forced(OnnxBackend(tmp_path / "onnx", "float32", "int4"), tokens)
    assert _relative_error(reference, default) < 0.1


@pytest.mark.real
@pytest.mark.slow  # ~2 minutes; the tiny mlx-lm folders above stay in the default tier
def test_real_checkpoint_quantized_by_mlx_lm_exports_exactly(real_model_dir, tmp_path):
    """The real checkpoint as mlx-community ships such folders (`mlx_lm.convert -q`, 4-bit, group 64, the
    untied embedding and lm_head quantized too): every stored module carried, onnxruntime's logits equal MLX's
    on the same folder with float activations (measured 2.4e-6 of the largest logit; the twin decodes no
    weight here, so this is the whole export path), and the int8-activation default keeps MLX's greedy
    tokens on a chat prompt (measured 97% over 32 steps; 8 steps asserted)."""
    from mlx_lm import convert

    from export.backends.onnx import OnnxBackend
    from qwen_mlx.tokenizer import Tokenizer

    convert(str(real_model_dir), str(tmp_path / "q"), quantize=True, q_bits=4, q_group_size=64)
    r = run("export-onnx", "--model", str(tmp_path / "q"), "--quantize", "int4", "--out", str(tmp_path / "onnx"))
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr
    prompt = Tokenizer.from_folder(str(real_model_dir)).encode_chat(
        [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}])
    reference, tokens = _mlx_reference(tmp_path / "q", prompt)
    level0 = OnnxBackend(_level(tmp_path / "onnx", tmp_path / "l0", 0), "float32", "int4")
    assert _relative_error(reference, _teacher_forced(level0, tokens, prompt)) < 1e-5
    default = _teacher_forced(OnnxBackend(tmp_path / "onnx", "float32", "int4"), tokens, prompt)
    assert [int(np.argmax(x)) for x in default[:-1]] == tokens
