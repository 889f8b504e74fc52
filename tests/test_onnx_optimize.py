"""export/optimize.py: sibling MatMul fusion and the RMSNorm rewrite, on hand-built graphs and on a tiny export."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.backends.onnx import OnnxBackend
from export.onnx_export import export_onnx
from export.optimize import canonicalize_rms_norm, fuse_sibling_matmuls, optimize
from export.backends.torch import TorchBackend
from qwen_mlx.checkpoint import prepare_model
from benchmarks.checkpoints.tiny_models import write_tiny_model

E = 16


def _ops(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _run(model, feed: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # judge our rewrite, not ORT's
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)


def _ort_optimized(model, tmp_path: Path) -> onnx.ModelProto:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # what OnnxBackend uses
    so.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return onnx.load(so.optimized_model_filepath)


def _attention_like_graph(rng: np.random.Generator) -> onnx.ModelProto:
    """x -> q/k/v MatMul + bias Add (three widths); y -> gate/up MatMul (no bias); x -> a MatMul whose weight
    another MatMul (on y) shares: both must stay; k is also read by a second consumer."""
    w = {n: rng.normal(size=(E, k)).astype(np.float32) for n, k in
         (("q", 12), ("k", 4), ("v", 4), ("gate", 20), ("up", 20), ("shared", 8))}
    b = {n: rng.normal(size=(w[n].shape[1],)).astype(np.float32) for n in ("q", "k", "v")}
    inits = [numpy_helper.from_array(a, f"layers.0.attn.{n}_proj.weight.T") for n, a in w.items()]
    inits += [numpy_helper.from_array(a, f"layers.0.attn.{n}_proj.bias") for n, a in b.items()]
    nodes = []
    for n in ("q", "k", "v"):
        nodes.append(helper.make_node("MatMul", ["x", f"layers.0.attn.{n}_proj.weight.T"], [f"{n}_mm"]))
        nodes.append(helper.make_node("Add", [f"layers.0.attn.{n}_proj.bias", f"{n}_mm"], [n]))  # bias first
    for n in ("gate", "up"):
        nodes.append(helper.make_node("MatMul", ["y", f"layers.0.attn.{n}_proj.weight.T"], [n]))
    nodes.append(helper.make_node("MatMul", ["x", "layers.0.attn.shared_proj.weight.T"], ["s1"]))
    nodes.append(helper.make_node("MatMul", ["y", "layers.0.attn.shared_proj.weight.T"], ["s2"]))
    nodes.append(helper.make_node("Concat", ["q", "k", "v", "gate", "up", "s1", "s2"], ["out"], axis=-1))
    nodes.append(helper.make_node("Identity", ["k"], ["k_out"]))
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "L", E]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "L", E])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", "L", 76]),
         helper.make_tensor_value_info("k_out", TensorProto.FLOAT, ["B", "L", 4])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def test_sibling_matmuls_fuse_with_their_biases() -> None:
    rng = np.random.default_rng(0)
    model = _attention_like_graph(rng)
    feed = {"x": rng.normal(size=(2, 3, E)).astype(np.float32), "y": rng.normal(size=(2, 3, E)).astype(np.float32)}
    before = _run(model, feed)
    io = ([i.SerializeToString() for i in model.graph.input], [o.SerializeToString() for o in model.graph.output])
    stats = fuse_sibling_matmuls(model.graph)
    onnx.checker.check_model(model, full_check=True)
    assert stats == {"matmul_groups": 2, "matmuls_fused": 5, "biases_fused": 3}
    ops = _ops(model)
    # q/k/v -> MatMul + Add + Split; gate/up -> MatMul + Split; the shared-weight pair untouched.
    assert ops["MatMul"] == 4 and ops["Split"] == 2 and ops["Add"] == 1
    names = {t.name for t in model.graph.initializer}
    assert "layers.0.attn.qkv_proj.weight.T" in names and "layers.0.attn.gate_up_proj.weight.T" in names
    assert "layers.0.attn.q_proj.weight.T" not in names and "layers.0.attn.q_proj.bias" not in names
    assert "layers.0.attn.shared_proj.weight.T" in names
    fused = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "layers.0.attn.qkv_proj.weight.T"))
    assert fused.shape == (E, 20)
    assert ([i.SerializeToString() for i in model.graph.input], [o.SerializeToString() for o in model.graph.output]) == io
    for a, b in zip(before, _run(model, feed)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_partial_bias_is_left_after_the_split() -> None:
    """Only some members have a bias Add: fuse the MatMuls, keep each Add where it was."""
    rng = np.random.default_rng(1)
    wq, wk = rng.normal(size=(E, 8)).astype(np.float32), rng.normal(size=(E, 8)).astype(np.float32)
    bq = rng.normal(size=(8,)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "q_proj.weight"], ["qm"]), helper.make_node("Add", ["qm", "q_bias"], ["q"]),
         helper.make_node("MatMul", ["x", "k_proj.weight"], ["k"]),
         helper.make_node("Sub", ["q", "k"], ["out"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", E])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(wq, "q_proj.weight"), numpy_helper.from_array(wk, "k_proj.weight"),
         numpy_helper.from_array(bq, "q_bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    feed = {"x": rng.normal(size=(5, E)).astype(np.float32)}
    before = _run(model, feed)[0]
    assert fuse_sibling_matmuls(model.graph)["biases_fused"] == 0
    onnx.checker.check_model(model, full_check=True)
    assert _ops(model) == {"MatMul": 1, "Split": 1, "Add": 1, "Sub": 1}
    np.testing.assert_allclose(_run(model, feed)[0], before, rtol=1e-6, atol=1e-6)


def _rms_norm_graph(cast: bool) -> onnx.ModelProto:
    """The dynamo exporter's RMSNorm: Pow, ReduceMean, Add eps, Sqrt, Reciprocal, Mul, Mul weight."""
    rng = np.random.default_rng(2)
    dtype = TensorProto.FLOAT16 if cast else TensorProto.FLOAT
    np_dtype = np.float16 if cast else np.float32
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT)] if cast else []
    x = "xf" if cast else "x"
    nodes += [helper.make_node("Pow", [x, "two"], ["p"]),
              helper.make_node("ReduceMean", ["p", "axes"], ["m"], keepdims=1),
              helper.make_node("Add", ["m", "eps"], ["a"]), helper.make_node("Sqrt", ["a"], ["s"]),
              helper.make_node("Reciprocal", ["s"], ["r"]), helper.make_node("Mul", [x, "r"], ["n"])]
    if cast:
        nodes.append(helper.make_node("Cast", ["n"], ["nh"], to=TensorProto.FLOAT16))
    nodes.append(helper.make_node("Mul", ["w", "nh" if cast else "n"], ["y"]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", dtype, ["B", "L", E])],
        [helper.make_tensor_value_info("y", dtype, ["B", "L", E])],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two"), numpy_helper.from_array(np.array([-1], np.int64), "axes"),
         numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
         numpy_helper.from_array(rng.uniform(0.5, 1.5, size=E).astype(np_dtype), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


@pytest.mark.parametrize("cast", [False, True], ids=["float32", "float16"])
def test_rms_norm_rewrite_lets_onnxruntime_fuse_it(cast: bool, tmp_path: Path) -> None:
    model = _rms_norm_graph(cast)
    # The pattern as the tracer writes it is not fused by onnxruntime (the reason for the rewrite).
    assert "SimplifiedLayerNormalization" not in _ops(_ort_optimized(model, tmp_path))
    feed = {"x": np.random.default_rng(3).normal(size=(2, 3, E)).astype(np.float16 if cast else np.float32)}
    before = _run(model, feed)[0]
    assert canonicalize_rms_norm(model.graph) == 1
    onnx.checker.check_model(model, full_check=True)
    assert "Reciprocal" not in _ops(model) and _ops(model)["Div"] == 1
    np.testing.assert_allclose(_run(model, feed)[0].astype(np.float32), before.astype(np.float32),
                               rtol=1e-3 if cast else 1e-6, atol=1e-3 if cast else 1e-6)
    assert _ops(_ort_optimized(model, tmp_path))["SimplifiedLayerNormalization"] == 1


# ---- on a real (tiny) export ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("optimize")
    ckpt = prepare_model(str(write_tiny_model(root / "ckpt", "gqa2-untied")))
    return ckpt, root


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_export_is_fused_and_exact(tiny, quantize: str | None, tmp_path: Path) -> None:
    ckpt, root = tiny
    a = ckpt.args
    path = export_onnx(ckpt, root / f"out-{quantize}", "float32", quantize, validate=False)
    model = onnx.load(str(path))
    ops = _ops(model)
    n = a.num_hidden_layers
    matmul = "MatMulNBits" if quantize else "MatMul"
    # Per layer: qkv, o, gate_up, down (+ the two attention products in float); then the lm_head.
    assert ops[matmul] == 4 * n + 1 + (0 if quantize else 2 * n)
    assert ops["Reciprocal"] == 0 and ops["Div"] == 2 * n + 1
    widths = sorted({int(helper.get_attribute_value(at)) for node in model.graph.node if node.op_type == "MatMulNBits"
                     for at in node.attribute if at.name == "N"}) if quantize else None
    if quantize:
        assert (a.num_attention_heads + 2 * a.num_key_value_heads) * a.head_dim in widths
        assert 2 * a.intermediate_size in widths
    # The signature is the unfused one's.
    assert [i.name for i in model.graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert [o.name for o in model.graph.output][0] == "logits"
    # onnxruntime fuses every RMSNorm at load.
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "ort.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    assert _ops(onnx.load(so.optimized_model_filepath))["SimplifiedLayerNormalization"] == 2 * n + 1
    if quantize:
        return
    # float32 stays exact against the twin, prefill and cached decode.
    twin, onnx_backend = TorchBackend(ckpt, "float32"), OnnxBackend(root / "out-None", "float32")
    prompt = np.random.default_rng(4).integers(0, a.vocab_size, size=13).tolist()
    ref, got = [twin.forward(prompt)], [onnx_backend.forward(prompt)]
    for t in (5, 77, 301):
        ref.append(twin.forward([t]))
        got.append(onnx_backend.forward([t]))
    assert max(float(np.abs(r - g).max()) for r, g in zip(ref, got)) < 1e-4


def test_optimize_is_idempotent(tiny) -> None:
    ckpt, root = tiny
    model = onnx.load(str(export_onnx(ckpt, root / "again", "float32", validate=False)))
    before = model.SerializeToString()
    assert optimize(model) == {"rms_norm_divs": 0, "matmul_groups": 0, "matmuls_fused": 0, "biases_fused": 0}
    assert model.SerializeToString() == before


# ---- the backend's thread settings ----------------------------------------------------------------------

def test_spinning_follows_the_load(monkeypatch) -> None:
    import export.backends.onnx as ob

    monkeypatch.setattr(ob.os, "getloadavg", lambda: (2.5, 2.0, 2.0))
    assert ob.cpu_oversubscribed(2)
    monkeypatch.setattr(ob.os, "getloadavg", lambda: (0.7, 2.0, 2.0))
    assert not ob.cpu_oversubscribed(2)


def test_backend_thread_options_keep_results(tiny) -> None:
    ckpt, root = tiny
    folder = root / "out-None"
    if not folder.is_dir():
        export_onnx(ckpt, folder, "float32", validate=False)
    prompt = [3, 14, 15, 92, 65]
    ref = OnnxBackend(folder, "float32").forward(prompt)
    for threads, spinning in ((1, False), (2, True)):
        got = OnnxBackend(folder, "float32", threads=threads, spinning=spinning).forward(prompt)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
