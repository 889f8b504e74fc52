"""int4 and 8-bit weights for the traced decoder, by onnxruntime's own quantizers, tied embeddings kept tied.

8 bits (transformers.js' q8 / int8 / uint8 files, `quantize_8bit`): onnxruntime's dynamic quantizer with the
settings of transformers.js' conversion script (scripts/quantize.py there): IntegerOps mode, per-tensor
scales, no reduced range, constant-B MatMuls -> MatMulInteger after DynamicQuantizeLinear on the activations,
the embedding Gather on a uint8 table. A tied lm_head is given its own weight first (as below), so it runs as
MatMulInteger too, and the Gather then reads that one table through a Transpose: stored once, in 8 bits.

int4 (`quantize_int4`):

The quantizer rewrites only MatMuls whose B is a plain initializer. A tied lm_head reads the embedding table
through a Transpose, so it would stay float32 and keep the float32 table alive for the Gather too: for
Qwen2.5-0.5B that is a [151936, 896] float32 matrix (545 MB) read for every decoded token. So a tied head is
first given a transposed copy of the table as its own initializer, the quantizer turns that into MatMulNBits,
and every Gather of the table then reads the same packed int4 weight through com.microsoft's
GatherBlockQuantized, as onnxruntime-genai's builder does for shared embeddings:

    packed [V, k_blocks, 16] uint8 --Reshape [V, k_blocks * 16]--> GatherBlockQuantized(ids, scales) --> [.., H]
                                   `--------------------------------> MatMulNBits (lm_head, N=V, K=H)

The float table is dropped: one int4 table (+ its [V, k_blocks] scales) serves both ends. The Reshape is a
view of an initializer; onnxruntime folds it at load, so in memory the Gather holds its own packed copy beside
MatMulNBits' prepacked one, as with untied weights, while the file stores it once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

INT4_BLOCK_SIZE = 32
# onnxruntime's packing for 4 bits: two codes per byte, low nibble first, codes offset by 8 when symmetric
# (no zero points). GatherBlockQuantized on uint8 data reads exactly that layout (its default zero point
# is 2 ** (bits - 1) = 8 too).
BITS = 4


@dataclass
class TiedHead:
    embedding: str  # the table the Gather(s) read, [V, H]
    weight: str  # the lm_head's own transposed copy, [H, V], until quantized
    logits: str  # the lm_head MatMul's output


def quantize_int4(proto, only: list[str] | None = None):
    """MatMul weights -> MatMulNBits (4 bits, block 32, symmetric, int8 activations on CPU: accuracy_level
    4, as onnxruntime-genai's builder does for int4), the tied lm_head and embedding included. Fused MoE
    experts (a com.microsoft MoE node) become QMoE (export/moe_onnx.py); standard-op experts,
    gathered from [X, out, in] stacks, become GatherBlockQuantized (int4 along `in`, block 32), so a token
    reads its k experts in 4 bits. An untied embedding's Gather and the MoE routers stay float (a router
    picks the experts and is ~0.1% of the weights)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from .moe_onnx import quantize_moe_int4
    from .optimize import ROUTER_WEIGHTS

    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    if only is not None:  # just these nodes (stored modules export/stored_quant.py could not carry)
        # (the quantizer's nodes_to_include adds to op_types_to_quantize: exclusion is what restricts it)
        keep = [n.name for n in proto.graph.node if n.name not in set(only)]
        quantizer = MatMulNBitsQuantizer(proto, bits=BITS, block_size=INT4_BLOCK_SIZE, is_symmetric=True,
                                         accuracy_level=4, nodes_to_exclude=keep,
                                         op_types_to_quantize=("MatMul", "Gather"),
                                         quant_axes=(("MatMul", 0), ("Gather", -1)))
        quantizer.process()
        return quantizer.model.model
    quantize_moe_int4(proto.graph)  # fused experts (com.microsoft MoE) -> QMoE, 4-bit in blocks of 32
    tied = untie_lm_head(proto.graph)
    ranks = {t.name: len(t.dims) for t in proto.graph.initializer}
    experts = any(_is_plain(n, "Gather") and ranks.get(n.input[0]) == 3 for n in proto.graph.node)
    keep_float = [n.name for n in proto.graph.node
                  if (_is_plain(n, "MatMul") and len(n.input) == 2 and ROUTER_WEIGHTS.fullmatch(n.input[1]))
                  or (_is_plain(n, "Gather") and ranks.get(n.input[0]) != 3)]
    # Quantizing a Gather raises the opset to 21 (the first with an int4 tensor type): only MoE graphs need it.
    op_types = ("MatMul", "Gather") if experts else ("MatMul",)
    quantizer = MatMulNBitsQuantizer(proto, bits=BITS, block_size=INT4_BLOCK_SIZE, is_symmetric=True,
                                     accuracy_level=4, nodes_to_exclude=keep_float, op_types_to_quantize=op_types,
                                     quant_axes=(("MatMul", 0), ("Gather", -1)))
    quantizer.process()
    proto = quantizer.model.model
    if tied is not None:
        tie_quantized_embedding(proto.graph, tied)
    return proto


# ---- 8 bits: onnxruntime's dynamic quantizer, as transformers.js runs it --------------------------------

# Weight types by name: q8 is transformers.js' pick per graph (`eight_bit_weights`), int8 / uint8 are fixed.
WEIGHT_TYPES = {"int8": "QInt8", "uint8": "QUInt8"}
# transformers.js' QUINT8_OPS: graphs with these take uint8 weights for q8 (onnxruntime-web lacks int8
# ConvInteger; genai-style attention ops run faster with uint8), every other graph int8.
QUINT8_OPS = ("Conv", "GroupQueryAttention", "MultiHeadAttention")


def eight_bit_weights(proto, variant: str) -> str:
    """"int8" or "uint8": the weight type of the q8 / int8 / uint8 file for this graph."""
    if variant != "q8":
        return variant
    ops = {n.op_type for n in proto.graph.node}
    return "uint8" if ops & set(QUINT8_OPS) else "int8"


def quantize_8bit(proto, weights: str):
    """Constant-B MatMuls -> MatMulInteger with per-tensor 8-bit weights (`weights`: "int8", symmetric, or
    "uint8", asymmetric) and the embedding table -> uint8, by onnxruntime's ONNXQuantizer with transformers.js'
    settings. Refuses graphs whose weights it would leave float: the fused MoE experts (com.microsoft MoE)."""
    from onnxruntime.quantization import QuantizationMode, QuantType
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    from qwen_mlx.errors import QwenError

    if any(n.op_type == "MoE" for n in proto.graph.node):
        raise QwenError("8-bit ONNX variants (q8, int8, uint8) cannot hold the fused MoE experts: onnxruntime's "
                        "dynamic quantizer does not rewrite com.microsoft MoE, so they would stay float32; export "
                        "q4 / q4f16 (QMoE), or pass --moe standard")
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    tied = untie_lm_head(proto.graph)
    keep_float = [n.name for n in proto.graph.node
                  if tied is not None and _is_plain(n, "Gather") and n.input[0] == tied.embedding]
    # The quantizer deep-copies the graph and reloads it for shape inference twice, the first time only when
    # the graph does not say it was inferred; its dynamic path infers again after rewriting Gemms anyway, so
    # the mark skips a redundant copy (2.5 GB for the real 0.5B model; the output is byte-identical).
    add_infer_metadata(proto)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    quantizer = ONNXQuantizer(proto, False, False, mode=QuantizationMode.IntegerOps, static=False,
                              weight_qType=getattr(QuantType, WEIGHT_TYPES[weights]),
                              activation_qType=QuantType.QUInt8,  # dynamic activations are uint8 only
                              tensors_range=None, nodes_to_quantize=[], nodes_to_exclude=keep_float,
                              op_types_to_quantize=set(IntegerOpsRegistry.keys()),
                              extra_options=dict(EnableSubgraph=True, MatMulConstBOnly=True))
    quantizer.quantize_model()
    proto = quantizer.model.model
    if tied is not None:
        tie_8bit_embedding(proto.graph, tied)
    return proto


def tie_8bit_embedding(graph, tied: TiedHead) -> None:
    """Gather(E) -> DequantizeLinear(Gather(Transpose(E.T quantized))) with the lm_head's scale and zero
    point, then drop the float table E: one 8-bit table serves both ends (onnxruntime folds the Transpose of
    an initializer at load)."""
    from onnx import helper

    names = {t.name for t in graph.initializer}
    packed, scale, zero = (f"{tied.weight}{suffix}" for suffix in ("_quantized", "_scale", "_zero_point"))
    if not {packed, scale, zero} <= names:
        raise RuntimeError(f"the tied lm_head ({tied.weight}) was not quantized to 8 bits")
    rows = f"{tied.embedding}.8bit"
    order, done = [], False
    for node in list(graph.node):
        if _is_plain(node, "Gather") and node.input[0] == tied.embedding:
            if not done:
                order.append(helper.make_node("Transpose", [packed], [rows], name=f"{tied.embedding}.Transpose",
                                              perm=[1, 0]))
                done = True
            order.append(helper.make_node("Gather", [rows, node.input[1]], [f"{node.output[0]}.8bit"],
                                          name=f"{node.name}.8bit", axis=0))
            order.append(helper.make_node("DequantizeLinear", [f"{node.output[0]}.8bit", scale, zero],
                                          [node.output[0]], name=f"{node.name}.Dequantize"))
        else:
            order.append(node)
    if not done:
        raise RuntimeError(f"no Gather reads {tied.embedding}")
    copies = []
    for node in order:  # the graph's own nodes are cleared below: keep copies
        copy = type(node)()
        copy.CopyFrom(node)
        copies.append(copy)
    del graph.node[:]
    graph.node.extend(copies)
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name == tied.embedding:
            del graph.initializer[i]


# ---- before quantizing: give the tied head a weight of its own ------------------------------------------

def _is_plain(node, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in ("", "ai.onnx")


def untie_lm_head(graph) -> TiedHead | None:
    """MatMul(h, Transpose(E)) where a Gather also reads the initializer E -> MatMul(h, E.T as an initializer
    of its own). Returns what tie_quantized_embedding needs to tie them back, or None when not tied."""
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    producers = {name: node for node in graph.node for name in node.output}
    gathered = {node.input[0] for node in graph.node if _is_plain(node, "Gather")}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    for node in graph.node:
        if not _is_plain(node, "MatMul"):
            continue
        transpose = producers.get(node.input[1])
        if transpose is None or not _is_plain(transpose, "Transpose") or transpose.input[0] not in gathered:
            continue
        table = inits.get(transpose.input[0])
        perm = [list(a.ints) for a in transpose.attribute if a.name == "perm"]
        if table is None or len(table.dims) != 2 or perm not in ([], [[1, 0]]):
            continue
        name = f"{table.name}.T"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(table).T), name))
        node.input[1] = name
        if users[transpose.output[0]] == 1:
            graph.node.remove(transpose)
        return TiedHead(table.name, name, node.output[0])
    return None


# ---- after quantizing: the Gather reads the lm_head's packed weight ----------------------------------------

def tie_quantized_embedding(graph, tied: TiedHead) -> None:
    """Replace every Gather of `tied.embedding` by GatherBlockQuantized over the quantized lm_head's weight
    and scales, then drop the float table."""
    from onnx import NodeProto, helper, numpy_helper

    head = next((n for n in graph.node if tied.logits in n.output), None)
    if head is None or head.op_type != "MatMulNBits":
        raise RuntimeError(f"the tied lm_head ({tied.logits}) was not quantized")
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    packed, scales = head.input[1], head.input[2]
    inits = {t.name: t for t in graph.initializer}
    V, k_blocks, blob = inits[packed].dims
    hidden = attrs["K"]
    block = attrs["block_size"]
    # GatherBlockQuantized takes uint8 data as [rows, packed columns]: the same bytes, one row per token.
    flat_shape = f"{tied.embedding}.int4_shape"
    flat = f"{tied.embedding}.int4"
    graph.initializer.append(numpy_helper.from_array(np.array([V, k_blocks * blob], np.int64), flat_shape))
    new_nodes = [helper.make_node("Reshape", [packed, flat_shape], [flat], name=f"{tied.embedding}.Reshape")]
    if k_blocks * block != hidden:  # K padded to whole blocks: the gathered rows carry the padding
        ends = f"{tied.embedding}.hidden_size"
        graph.initializer.append(numpy_helper.from_array(np.array([hidden], np.int64), ends))
        graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), f"{ends}.start"))
        graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), f"{ends}.axis"))
    order = []
    for node in graph.node:
        if not (_is_plain(node, "Gather") and node.input[0] == tied.embedding):
            copy = NodeProto()  # the graph's own nodes are cleared below: keep copies
            copy.CopyFrom(node)
            order.append(copy)
            continue
        axis = [a.i for a in node.attribute if a.name == "axis"]
        if axis not in ([], [0]):
            raise RuntimeError(f"{node.name}: a Gather of the embedding along axis {axis[0]}")
        order += new_nodes
        new_nodes = []  # one Reshape for every Gather
        out = node.output[0] if k_blocks * block == hidden else f"{node.output[0]}.padded"
        order.append(helper.make_node("GatherBlockQuantized", [flat, node.input[1], scales], [out],
                                      name=f"{node.name}.int4", domain="com.microsoft", gather_axis=0,
                                      quantize_axis=1, block_size=block, bits=attrs["bits"]))
        if out != node.output[0]:
            order.append(helper.make_node("Slice", [out, f"{ends}.start", ends, f"{ends}.axis"], [node.output[0]],
                                          name=f"{node.name}.Slice"))
    if new_nodes:
        raise RuntimeError(f"no Gather reads {tied.embedding}")
    del graph.node[:]
    graph.node.extend(order)
    for i in reversed(range(len(graph.initializer))):  # by index: never copy the big weights around
        if graph.initializer[i].name in (tied.embedding, tied.weight):
            del graph.initializer[i]


__all__ = ["quantize_8bit", "eight_bit_weights", "quantize_int4", "untie_lm_head", "tie_quantized_embedding",
           "INT4_BLOCK_SIZE"]
