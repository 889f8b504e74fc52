"""The ONNX nodes that hold a stored quantized module: MatMulNBits, GatherBlockQuantized, and the per-group
float correction beside them (export/stored_quant.py decides what is carried and explains the arithmetic)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qwen_mlx.formats.affine import dequantize_codes


@dataclass
class Stored:
    """One module (or fused siblings) as MatMulNBits holds it: w = scales * (codes - zeros) + correction."""
    codes: np.ndarray  # uint8 [N, K]
    scales: np.ndarray  # float32 [N, K/G]
    biases: np.ndarray  # float32 [N, K/G], as stored
    zeros: np.ndarray  # uint8 [N, K/G]
    bits: int
    group: int
    dtype: np.dtype = np.dtype(np.float32)  # the export's: scales and correction are written in it

    @property
    def correction(self) -> np.ndarray:
        """c = b + s * z [N, K/G] (float32): what s * (q - z) misses of s * q + b."""
        return self.biases + self.scales * self.zeros

    @property
    def dequantized(self) -> np.ndarray:
        """s * q + b exactly as the twin computes it (qwen_mlx.formats.affine.dequantize)."""
        return dequantize_codes(self.codes, self.scales, self.biases, self.group)


def pack_codes(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [rows, n] -> [rows, ceil(n * bits / 8)] bytes, low bits first (onnxruntime's order)."""
    per = 8 // bits
    v = np.pad(values, ((0, 0), (0, -values.shape[1] % per))).reshape(values.shape[0], -1, per)
    return np.bitwise_or.reduce(v << (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8), axis=-1)


def add_initializers(graph, name: str, s: Stored, correction_rows: bool) -> tuple[str, str, str | None, str | None]:
    """The packed codes [N, K/G, G*bits/8], scales [N, K/G] and zero points [N, ceil(K/G*bits/8)] (2-D:
    GatherBlockQuantized reads the same ones; none when all are MatMulNBits' default 2 ** (bits - 1)) and,
    unless all zero, the correction ([N, K/G] rows to gather, else [K/G, N] for the MatMul). Returns names."""
    from onnx import numpy_helper

    N, K = s.codes.shape
    tensors = {f"{name}.qweight": pack_codes(s.codes, s.bits).reshape(N, K // s.group, -1),
               f"{name}.scales": s.scales.astype(s.dtype)}
    zeros = f"{name}.qzeros" if (s.zeros != 1 << (s.bits - 1)).any() else None
    if zeros:
        tensors[zeros] = pack_codes(s.zeros, s.bits)
    c = s.correction.astype(s.dtype)
    corr = f"{name}.correction" if c.any() else None
    if corr:
        tensors[corr] = c if correction_rows else c.T
    graph.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(a), n) for n, a in tensors.items())
    return f"{name}.qweight", f"{name}.scales", zeros, corr


def int64_initializer(graph, name: str, values: list[int]) -> str:
    from onnx import numpy_helper

    if not any(t.name == name for t in graph.initializer):
        graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), name))
    return name


def matmul_nbits(graph, name: str, node, s: Stored, names, rank: int | None, accuracy_level: int,
                  tied_head: bool) -> list:
    """MatMulNBits(x) [+ groupsum(x) @ c^T] for the MatMul `node`."""
    from onnx import helper

    packed, scales, zeros, corr = names
    N, K = s.codes.shape
    x, out = node.input[0], node.output[0]
    nodes = [helper.make_node(
        "MatMulNBits", [x, packed, scales, *([zeros] if zeros else [])], [f"{name}.q" if corr else out],
        name=f"{name}.MatMulNBits", domain="com.microsoft", K=K, N=N, bits=s.bits, block_size=s.group,
        accuracy_level=accuracy_level)]
    if corr is None:
        return nodes
    groups = K // s.group
    shape = int64_initializer(graph, f"groups.{K}x{s.group}.r{rank}", [0] * (rank - 1) + [groups, s.group])
    last = int64_initializer(graph, "axis.last", [-1])
    nodes += [helper.make_node("Reshape", [x, shape], [f"{name}.groups"], name=f"{name}.groups"),
              helper.make_node("ReduceSum", [f"{name}.groups", last], [f"{name}.groupsum"],
                               name=f"{name}.groupsum", keepdims=0)]
    if tied_head:  # the table's [V, K/G] rows serve the Gather too
        nodes.append(helper.make_node("Transpose", [corr], [f"{corr}.T"], name=f"{name}.correction.T", perm=[1, 0]))
        corr = f"{corr}.T"
    nodes += [helper.make_node("MatMul", [f"{name}.groupsum", corr], [f"{name}.c"], name=f"{name}.correction"),
              helper.make_node("Add", [f"{name}.q", f"{name}.c"], [out], name=f"{name}.corrected")]
    return nodes


def gather_block_quantized(graph, name: str, node, s: Stored, names, rank: int) -> list:
    """Gather(E, ids) -> GatherBlockQuantized over the packed codes [+ the gathered c rows over each group]."""
    from onnx import helper

    packed, scales, zeros, corr = names
    N, K = s.codes.shape
    flat = int64_initializer(graph, f"{name}.qweight.rows", [N, K * s.bits // 8])
    ids, out = node.input[1], node.output[0]
    nodes = [helper.make_node("Reshape", [packed, flat], [f"{packed}.rows.{node.name}"], name=f"{node.name}.rows"),
             helper.make_node("GatherBlockQuantized", [f"{packed}.rows.{node.name}", ids, scales,
                                                        *([zeros] if zeros else [])],
                              [f"{out}.q" if corr else out], name=f"{node.name}.quantized", domain="com.microsoft",
                              gather_axis=0, quantize_axis=1, block_size=s.group, bits=s.bits)]
    if corr is None:
        return nodes
    groups = K // s.group
    grouped = int64_initializer(graph, f"groups.{K}x{s.group}.r{rank + 1}", [0] * rank + [groups, s.group])
    whole = int64_initializer(graph, f"rows.{K}.r{rank + 1}", [0] * rank + [K])
    last = int64_initializer(graph, "axis.last", [-1])
    return nodes + [
        helper.make_node("Reshape", [f"{out}.q", grouped], [f"{out}.groups"], name=f"{node.name}.groups"),
        helper.make_node("Gather", [corr, ids], [f"{out}.c"], name=f"{node.name}.correction", axis=0),
        helper.make_node("Unsqueeze", [f"{out}.c", last], [f"{out}.c1"], name=f"{node.name}.correction.spread"),
        helper.make_node("Add", [f"{out}.groups", f"{out}.c1"], [f"{out}.sum"], name=f"{node.name}.corrected"),
        helper.make_node("Reshape", [f"{out}.sum", whole], [out], name=f"{node.name}.ungroup")]
