"""AWQ and GPTQ checkpoints in: repacked exactly into MLX affine layers.

No AWQ/GPTQ quantizer runs on this CPU (AutoAWQ and gptqmodel need CUDA to quantize), so the test
checkpoints are a tiny HF model quantized by plain min/max rounding and packed to the published layouts
(AutoAWQ's GEMM words in AWQ_ORDER; GPTQ v1 with its stored zero - 1, and gptq_v2; act-order g_idx) by
benchmarks/checkpoints/awq_gptq.py. Each folder is then read by onnxruntime-genai's own quantized-model loader
(tests/support/genai_quant_reader.py, in the genai peer venv): its codes, zero points and scales must
equal ours exactly, and so must the dequantized weights of our MLX layers equal s * (q - z) computed from
them. Logits of the repacked model equal those of HF transformers running the dequantized float model. Norm
weights are random (0.5..1.5): AWQ folds its scales into them, and the loader must take them as stored.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qwen_mlx.checkpoint import prepare_model
from qwen_mlx.errors import QwenError
from qwen_mlx.models.load import load_model
from benchmarks.checkpoints.awq_gptq import CASES, LINEARS, MODEL, make_checkpoint
from tests.support.needs import er, needs_peer

# Run in the genai peer venv (benchmarks/peers/setup_peers.sh), never importing qwen_mlx.
GENAI_READER = Path(__file__).parent / "support" / "genai_quant_reader.py"
PROMPT = [1, 5, 9, 33, 100, 7, 250, 3]


# ---- fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def packed(tiny_model, tmp_path_factory):
    """name -> (AWQ/GPTQ folder, the float32 weights it encodes), all CASES built once."""
    root = tmp_path_factory.mktemp("awq_gptq")
    return {name: (root / name, make_checkpoint(tiny_model(MODEL), root / name, *case))
            for name, case in CASES.items()}


@pytest.fixture(scope="session")
def genai_read(packed, tmp_path_factory) -> dict[str, dict[str, np.ndarray]]:
    """onnxruntime-genai's reading of every case (one subprocess in its venv)."""
    needs_peer("genai")
    python = er.peer_python("genai")
    out = tmp_path_factory.mktemp("genai") / "read.npz"
    names = list(packed)
    subprocess.run([str(python), str(GENAI_READER), str(out),
                    *[str(packed[n][0]) for n in names]], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": ""})
    data = np.load(out)
    result: dict[str, dict[str, np.ndarray]] = {n: {} for n in names}
    for key in data.files:
        i, rest = key.split("/", 1)
        result[names[int(i)]][rest] = data[key]
    return result


def _hf_logits(folder: Path, exact: dict[str, np.ndarray], ref: Path) -> np.ndarray:
    """HF transformers' float32 logits for the dequantized float model of an AWQ/GPTQ folder."""
    import torch
    import transformers

    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    config["torch_dtype"] = "float32"
    (ref / "config.json").write_text(json.dumps(config))
    save_file(exact, str(ref / "model.safetensors"))
    model = transformers.AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0].numpy()


@pytest.fixture(scope="session")
def hf_logits(packed, tmp_path_factory) -> dict[str, np.ndarray]:
    return {name: _hf_logits(folder, exact, tmp_path_factory.mktemp(f"{name}-float"))
            for name, (folder, exact) in packed.items()}


def _mlx_weights(folder: Path) -> tuple[object, dict[str, np.ndarray]]:
    """Our MLX model of `folder` and each quantized layer's weights as MLX itself dequantizes them."""
    model = load_model(prepare_model(str(folder)), "float32")
    weights = {}
    for path, m in model.named_modules():
        if hasattr(m, "scales"):
            weights[path] = np.array(mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits))
    return model, weights


# ---- exactness ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_repacked_weights_and_logits_are_exact(name, packed, genai_read, hf_logits, tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_MLX_CACHE", str(tmp_path))
    folder, exact = packed[name]
    method, bits, group, sym, fmt, act_order = CASES[name]
    genai = genai_read[name]
    model, ours = _mlx_weights(folder)
    assert len(ours) == 2 * len(LINEARS)  # every linear layer is quantized, nothing dequantized
    for layer in range(2):
        perm = None  # down_proj's act order: its inputs, and gate/up's output rows, are stored in group order
        if "mlp.down_proj" in act_order:
            g_idx = load_file(str(folder / "model.safetensors"))[f"model.layers.{layer}.mlp.down_proj.g_idx"]
            perm = np.argsort(g_idx, kind="stable")
        for linear in LINEARS:
            module = f"model.layers.{layer}.{linear}"
            # genai's integer reading, dequantized in float32: what the MLX layer must hold, bit for bit
            codes, zeros, scales = (genai[f"{module}.{k}"] for k in ("codes", "zeros", "scales"))
            if fmt == "gptq_v2":  # genai 0.18 reads every GPTQ folder as v1 (stored zero + 1): undo its + 1
                zeros = (zeros - 1) & ((1 << bits) - 1)
            g_idx = np.arange(codes.shape[0]) // (codes.shape[0] if group == -1 else group)
            if linear in act_order:
                g_idx = load_file(str(folder / "model.safetensors"))[f"{module}.g_idx"]
            theirs = (scales[g_idx] * (codes - zeros[g_idx]).astype(np.float32)).T
            np.testing.assert_array_equal(theirs, exact[f"{module}.weight"])  # their reading = what we packed
            w = ours[module]
            if perm is not None and linear == "mlp.down_proj":
                w = w[:, np.argsort(perm)]
            elif perm is not None and linear in ("mlp.gate_proj", "mlp.up_proj"):
                w = w[np.argsort(perm)]
            np.testing.assert_array_equal(w, theirs, err_msg=module)
            # genai's own float16 dequantization rounds q*s and z*s first: ours is within fp16 rounding of it
            if fmt != "gptq_v2":
                np.testing.assert_allclose(genai[f"{module}.dequant"], theirs, rtol=0,
                                           atol=2e-3 * np.abs(theirs).max())
    logits = np.array(model(mx.array([PROMPT]), model.make_cache(), last_only=False)[0])
    np.testing.assert_allclose(logits, hf_logits[name], rtol=0, atol=1e-4 * np.abs(hf_logits[name]).max())


# ---- the other readers of the repacked folder -------------------------------------------------------------

def test_convert_writes_a_folder_mlx_lm_runs_with_the_same_logits(packed, tmp_path, monkeypatch):
    """`convert --model GPTQ --out DIR` (the act-order case: gate/up rows permuted, mixed group sizes are
    not in it) writes a folder mlx-lm loads unmodified, with our logits; the torch twin reads it too."""
    import sys

    from mlx_lm import load

    from export.models.load import load_model as load_torch_model

    monkeypatch.setenv("QWEN_MLX_CACHE", str(tmp_path / "cache"))
    folder, _ = packed["gptq4-g32-sym-descact"]
    out = tmp_path / "mlx"
    cli = Path(__file__).resolve().parents[1] / "cli.py"
    done = subprocess.run([sys.executable, str(cli), "convert", "--model", str(folder), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    ours = load_model(prepare_model(str(out)), "float32")
    logits = np.array(ours(mx.array([PROMPT]), ours.make_cache(), last_only=False)[0])
    theirs, _ = load(str(out))
    theirs.set_dtype(mx.float32)  # mlx-lm computes in the stored fp16 of the embedding and norms; we in float32
    np.testing.assert_allclose(np.array(theirs(mx.array([PROMPT]))[0]), logits, rtol=0, atol=1e-5)
    import torch
    twin = load_torch_model(prepare_model(str(folder)), "float32")  # the AWQ/GPTQ folder itself, dequantized
    n = len(PROMPT)
    with torch.no_grad():
        twin_logits, _ = twin(torch.tensor([PROMPT]), torch.ones(1, n, dtype=torch.long),
                              torch.arange(n)[None], twin.empty_cache())
    np.testing.assert_allclose(twin_logits[0].numpy(), logits, rtol=0, atol=1e-4 * np.abs(logits).max())


# ---- bad inputs -------------------------------------------------------------------------------------------

def _broken(packed, tmp_path: Path, case: str, edit_tensors=None, edit_config=None) -> Path:
    folder = tmp_path / "broken"
    src, _ = packed[case]
    folder.mkdir()
    for f in src.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    if edit_tensors:
        tensors = load_file(str(folder / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(folder / "model.safetensors"))
    if edit_config:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config["quantization_config"])
        (folder / "config.json").write_text(json.dumps(config))
    return folder


Q = "model.layers.0.self_attn.q_proj"
D = "model.layers.1.mlp.down_proj"
BAD = {
    "missing qzeros": ("awq4-g32", lambda t: t.pop(f"{Q}.qzeros"), None, "q_proj: qzeros is missing"),
    "scales too short": ("gptq8-row-asym", lambda t: t.update({f"{Q}.scales": t[f"{Q}.scales"][:, :8]}), None,
                         "tensors do not match config.json"),
    "3-bit": ("gptq4-g64-v2-asym", None, lambda q: q.update(bits=3), "GPTQ bits 3 is not supported"),
    "8-bit AWQ": ("awq4-g32", None, lambda q: q.update(bits=8), "AWQ bits 8 is not supported"),
    "GEMV AWQ": ("awq4-g32", None, lambda q: q.update(version="gemv"), "AWQ version 'gemv' is not supported"),
    "marlin": ("gptq8-row-asym", None, lambda q: q.update(checkpoint_format="marlin"), "format 'marlin'"),
    "g_idx not a grouping": ("gptq4-g32-sym-descact",
                             lambda t: t.update({f"{D}.g_idx": np.zeros_like(t[f"{D}.g_idx"])}), None,
                             "down_proj: g_idx is not a valid grouping"),
    "g_idx out of range": ("gptq4-g32-sym-descact",
                           lambda t: t.update({f"{D}.g_idx": t[f"{D}.g_idx"] + 1}), None, "not a valid grouping"),
    "act order on q_proj": ("gptq4-g32-sym-descact",
                            lambda t: t.update({f"{Q}.g_idx": t[f"{Q}.g_idx"][::-1].copy()}), None,
                            "q_proj: act-order g_idx (desc_act)"),
    "sym with other zeros": ("gptq8-row-asym", None, lambda q: q.update(sym=True), "config says sym"),
    "v1 zero point 0": ("gptq8-row-asym", lambda t: t[f"{Q}.qzeros"].fill(-1), None,
                        "a zero point of 0 stored in GPTQ v1 format"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_is_one_clear_error(case, packed, tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_MLX_CACHE", str(tmp_path / "cache"))
    source, edit_tensors, edit_config, words = BAD[case]
    folder = _broken(packed, tmp_path, source, edit_tensors, edit_config)
    with pytest.raises(QwenError, match=words.replace("(", r"\(").replace(")", r"\)")):
        prepare_model(str(folder))
    assert not any((tmp_path / "cache" / "awq_gptq").glob("*/config.json"))  # nothing half-made is cached


def test_a_group_size_mlx_cannot_hold_is_refused(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_MLX_CACHE", str(tmp_path / "cache"))
    make_checkpoint(tiny_model(MODEL), tmp_path / "g16", "gptq", 4, 16, True, "gptq", ())
    with pytest.raises(QwenError, match="down_proj: a group size of 16 over 128 inputs cannot be held in MLX's groups"):
        prepare_model(str(tmp_path / "g16"))


def test_cli_names_a_bad_checkpoint_in_one_line(packed, tmp_path):
    import sys

    folder = _broken(packed, tmp_path, "awq4-g32", edit_config=lambda q: q.update(bits=8))
    cli = Path(__file__).resolve().parents[1] / "cli.py"
    done = subprocess.run([sys.executable, str(cli), "convert", "--model", str(folder), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert done.returncode != 0 and done.stderr.strip().splitlines() == [
        "error: AWQ bits 8 is not supported (AutoAWQ's GEMM layout is 4-bit only)"]


def test_moe_experts_are_stacked_as_mlx_lm_does(tiny_model, tmp_path, monkeypatch):
    """Qwen's MoE GPTQ releases quantize each expert (the router stays float): the experts are stacked into
    mlx-lm's switch_mlp, each down_proj's act order folded into its own expert's gate/up rows."""
    from qwen_mlx.models.qwen2 import QuantizedSwitchLinear

    monkeypatch.setenv("QWEN_MLX_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "moe"
    exact = make_checkpoint(tiny_model("qwen3moe-q64"), folder, "gptq", 4, 32, True, "gptq",
                            ("mlp.down_proj", "mlp.experts.down_proj"))
    model = load_model(prepare_model(str(folder)), "float32")
    switch = [m for _, m in model.named_modules() if isinstance(m, QuantizedSwitchLinear)]
    assert len(switch) == 3  # layer 1's gate/up/down stacks (layer 0 is dense)
    logits = np.array(model(mx.array([PROMPT]), model.make_cache(), last_only=False)[0])
    (tmp_path / "float").mkdir()
    expected = _hf_logits(folder, exact, tmp_path / "float")
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


# ---- ONNX: MatMulNBits with the publisher's codes and zero points ----------------------------------------

@pytest.mark.parametrize("name,dtype", [("awq4-g32", np.float32), ("gptq4-g64-v2-asym", np.float32),
                                        ("awq4-g32", np.float16)])
def test_onnx_matmulnbits_hold_the_stored_quantization(name, dtype, packed, tmp_path, monkeypatch):
    """export/stored_quant.py on MatMuls named as the traced (and fused) graph names them: each becomes
    MatMulNBits whose weights are the publisher's, so with float activations (accuracy_level 0) onnxruntime
    computes the float model's product to float rounding. (export-onnx --quantize int4 uses level 4, int8
    activations, as for every int4 export.)"""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export.stored_quant import carry_stored

    monkeypatch.setenv("QWEN_MLX_CACHE", str(tmp_path))
    folder, exact = packed[name]
    ckpt = prepare_model(str(folder))
    layer = "model.layers.0"
    qkv = np.concatenate([exact[f"{layer}.self_attn.{p}_proj.weight"] for p in "qkv"]).astype(dtype)
    down = exact[f"{layer}.mlp.down_proj.weight"].astype(dtype)
    inits = [numpy_helper.from_array(np.ascontiguousarray(qkv.T), f"{layer}.self_attn.qkv_proj.weight.T"),
             numpy_helper.from_array(np.ascontiguousarray(down.T), f"{layer}.mlp.down_proj.weight.T")]
    nodes = [helper.make_node("MatMul", ["x", inits[0].name], ["qkv"]),
             helper.make_node("MatMul", ["h", inits[1].name], ["down"])]
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    io = [helper.make_tensor_value_info(n, elem, s)
          for n, s in [("x", [3, 64]), ("h", [3, 128]), ("qkv", [3, qkv.shape[0]]), ("down", [3, 64])]]
    proto = helper.make_model(helper.make_graph(nodes, "g", io[:2], io[2:], inits),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    carried = carry_stored(proto, ckpt, accuracy_level=0)
    assert carried.modules == [f"{layer}.self_attn.{p}_proj" for p in "qkv"] + [f"{layer}.mlp.down_proj"]
    # zero points exactly -b / s: no correction term, codes + scales + zero points only
    assert [n.op_type for n in proto.graph.node] == ["MatMulNBits"] * 2 and len(proto.graph.initializer) == 6
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x, h = rng.normal(size=(3, 64)).astype(dtype), rng.normal(size=(3, 128)).astype(dtype)
    got_qkv, got_down = session.run(None, {"x": x, "h": h})
    tol = 1e-5 if dtype == np.float32 else 2e-3  # float16: the output's own rounding
    for got, a, w in [(got_qkv, x, qkv), (got_down, h, down)]:
        want = a.astype(np.float32) @ w.astype(np.float32).T
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=0, atol=tol * np.abs(want).max())
