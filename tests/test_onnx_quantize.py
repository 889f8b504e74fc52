"""int4 quantization of a tied embedding (export/quantize.py) on hand-built graphs: no tracing, milliseconds.

The traced export of a tied tiny model is checked in tests/test_onnx_export.py; here the pass itself, on the
shape the dynamo exporter writes for a tied head (Gather(E, ids) and MatMul(h, Transpose(E))), with a hidden
size that fills whole int4 blocks and one that does not.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.quantize import INT4_BLOCK_SIZE, quantize_int4

V = 96


def tied_graph(hidden: int, tied: bool = True):
    """embedding = Gather(E, ids); logits = h @ E.T (tied) or h @ W (untied, W its own [H, V] weight)."""
    rng = np.random.default_rng(hidden)
    table = rng.normal(0.0, 0.5, (V, hidden)).astype(np.float32)
    inits = [numpy_helper.from_array(table, "model.embed_tokens.weight")]
    nodes = [helper.make_node("Gather", ["model.embed_tokens.weight", "ids"], ["embedding"], name="node_embedding")]
    if tied:
        nodes += [helper.make_node("Transpose", ["model.embed_tokens.weight"], ["table_t"], perm=[1, 0]),
                  helper.make_node("MatMul", ["h", "table_t"], ["logits"], name="node_linear")]
    else:
        inits.append(numpy_helper.from_array(rng.normal(0.0, 0.5, (hidden, V)).astype(np.float32), "lm_head.weight.T"))
        nodes.append(helper.make_node("MatMul", ["h", "lm_head.weight.T"], ["logits"], name="node_linear"))
    graph = helper.make_graph(
        nodes, "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, ["m", hidden])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", hidden]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["m", V])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), table


def run(proto, ids: np.ndarray, h: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["embedding", "logits"], {"ids": ids, "h": h})


@pytest.mark.parametrize("hidden", [64, 48])  # 48: K padded to 64, the gathered rows are sliced back
def test_tied_table_quantized_once_and_read_the_same_by_both_ends(hidden: int) -> None:
    proto, table = tied_graph(hidden)
    proto = quantize_int4(proto)
    graph = proto.graph
    ops = [n.op_type for n in graph.node]
    assert "Gather" not in ops and "Transpose" not in ops and "MatMul" not in ops, ops
    assert ops.count("GatherBlockQuantized") == 1 and ops.count("MatMulNBits") == 1
    assert ("Slice" in ops) == (hidden % INT4_BLOCK_SIZE != 0)
    floats = [t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2
              and sorted(t.dims) == sorted([V, hidden])]
    assert floats == [], "a float table is left"
    # The packed table is stored once: the lm_head's weight, which the Gather reads through a Reshape.
    nodes = {o: n for n in graph.node for o in n.output}
    head, gather = nodes["logits"], next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    reshape = nodes[gather.input[0]]
    assert reshape.op_type == "Reshape" and reshape.input[0] == head.input[1] and gather.input[2] == head.input[2]
    big = [t.name for t in graph.initializer if np.prod(t.dims) >= V * hidden // 2]
    assert big == [head.input[1]]

    # Every row through the Gather equals the lm_head's column (logits of the identity): one table, read
    # the same way by both kernels; and both are the table within int4 rounding: steps of max|block| / 8,
    # codes -8..7, so half a step off at most, or one step where the far end clips at +7.
    embedding, logits = run(proto, np.arange(V), np.eye(hidden, dtype=np.float32))
    assert embedding.shape == (V, hidden)
    np.testing.assert_allclose(embedding, logits.T, atol=1e-6)
    step = np.abs(table).max() / 8
    assert np.abs(embedding - table).max() <= step + 1e-6
    assert 0 < np.abs(embedding - table).mean() < step / 4

    # And on ordinary inputs, the quantized graph stays near the float one.
    rng = np.random.default_rng(1)
    ids, h = rng.integers(0, V, 7), rng.normal(0, 1, (5, hidden)).astype(np.float32)
    ref_embedding, ref_logits = table[ids], h @ table.T
    got_embedding, got_logits = run(proto, ids, h)
    np.testing.assert_allclose(got_embedding, ref_embedding, atol=step + 1e-6)
    assert np.abs(got_logits - ref_logits).max() < 0.1 * np.abs(ref_logits).max()


def test_untied_graph_keeps_its_gather() -> None:
    """An untied head is quantized by onnxruntime's quantizer as it is; the embedding Gather is left alone."""
    proto, table = tied_graph(64, tied=False)
    graph = quantize_int4(proto).graph
    ops = [n.op_type for n in graph.node]
    assert ops == ["Gather", "MatMulNBits"]
    assert [t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT and list(t.dims) == [V, 64]] == \
        ["model.embed_tokens.weight"]


# ---- 8 bits (q8 / int8 / uint8): onnxruntime's dynamic quantizer, the tied table kept once ---------------

@pytest.mark.parametrize("weights", ["int8", "uint8"])
def test_8bit_tied_table_stored_once_and_read_the_same_by_both_ends(weights: str) -> None:
    from export.quantize import quantize_8bit

    proto, table = tied_graph(64)
    graph = quantize_8bit(proto, weights).graph
    ops = [n.op_type for n in graph.node]
    assert "MatMulInteger" in ops and "MatMul" not in ops, ops  # the head runs in 8 bits too
    big = [t for t in graph.initializer if np.prod(t.dims) >= V * 64]
    assert [t.name for t in big] == ["model.embed_tokens.weight.T_quantized"]  # one table, no float copy
    assert big[0].data_type == (TensorProto.INT8 if weights == "int8" else TensorProto.UINT8)
    # Row i of the gathered table is column i of the head's weight: logits of the identity read it back.
    # (the head's activations are quantized too: rows of the identity are exact in uint8)
    embedding, logits = run(proto_of(graph), np.arange(V), np.eye(64, dtype=np.float32))
    np.testing.assert_allclose(embedding, logits.T, atol=1e-5)
    step = (np.abs(table).max() * 2) / 255  # per-tensor: one step over the whole range
    assert np.abs(embedding - table).max() <= step
    rng = np.random.default_rng(1)
    ids, h = rng.integers(0, V, 7), rng.normal(0, 1, (5, 64)).astype(np.float32)
    got_embedding, got_logits = run(proto_of(graph), ids, h)
    np.testing.assert_allclose(got_embedding, table[ids], atol=step)
    assert np.abs(got_logits - h @ table.T).max() < 0.05 * np.abs(h @ table.T).max()


def proto_of(graph):
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_q8_weights_follow_transformers_js() -> None:
    """q8 (model_quantized.onnx) is int8 weights unless the graph has the ops transformers.js' script gives
    uint8 weights (Conv, GroupQueryAttention, MultiHeadAttention)."""
    from export.quantize import eight_bit_weights

    proto, _ = tied_graph(64)
    assert eight_bit_weights(proto, "q8") == "int8"
    assert eight_bit_weights(proto, "uint8") == "uint8"
    proto.graph.node.append(helper.make_node("GroupQueryAttention", ["h"], ["x"], domain="com.microsoft"))
    assert eight_bit_weights(proto, "q8") == "uint8"
    assert eight_bit_weights(proto, "int8") == "int8"
