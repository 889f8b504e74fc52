"""The publisher's own 4-bit codes in the int4 ONNX export: MatMulNBits with the stored zero points.

A checkpoint stored 4-bit with integer zero points (AWQ/GPTQ repacked by qwen_mlx.quant.awq_gptq, where MLX's
biases are -zero * scale) reaches the twin dequantized exactly, scale * (q - zero) in float32. Handing that
to onnxruntime's int4 quantizer would round it a second time into other codes. Instead each traced MatMul
whose weight is such a module, or a fused q/k/v or gate/up of modules with the same group size, becomes
MatMulNBits holding the same codes, scales and zero points, block size = the group size. The traced weight
must equal the stored dequantization (rounded to the export's dtype), else the MatMul is left to the quantizer.
What the publisher left float (embedding, lm_head) stays float: export_onnx runs the int4 quantizer only
when nothing here was kept.
"""

from __future__ import annotations

import re

import numpy as np

from qwen_mlx.checkpoint import Checkpoint
from qwen_mlx.quant.affine import module_params

BITS = 4


def stored_int4(proto, ckpt: Checkpoint, accuracy_level: int = 4) -> int:
    """Rewrite in place every MatMul of a stored 4-bit module to MatMulNBits; returns how many."""
    from onnx import helper, numpy_helper

    if ckpt.quantization is None:
        return 0
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    replaced: list[str] = []
    for i, node in enumerate(graph.node):
        m = re.fullmatch(r"(.*)\.(\w+)\.weight\.T", node.input[1] if len(node.input) == 2 else "")
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or not m or node.input[1] not in inits:
            continue
        modules = [f"{m[1]}.{p}" for p in _unfused(ckpt, m[1], m[2])]
        parts = [_stored(ckpt, x) for x in modules]
        if any(p is None for p in parts) or len({p[3] for p in parts}) != 1:
            continue
        codes, scales, zeros = (np.concatenate([p[k] for p in parts]) for k in range(3))
        group = parts[0][3]
        N, K = codes.shape
        g = np.arange(K) // group
        traced = numpy_helper.to_array(inits[node.input[1]]).T
        # float16 export: the twin's weights are the exact dequantization rounded once to float16; the scales
        # go in the activations' dtype too, which fp16-published scales survive exactly
        if not (np.array_equal(traced, (scales[:, g] * (codes.astype(np.float32) - zeros[:, g])).astype(traced.dtype))
                and np.array_equal(scales.astype(traced.dtype).astype(np.float32), scales)):
            continue
        scales = scales.astype(traced.dtype)
        name = m[0].removesuffix(".weight.T")
        blocks = K // group
        packed = codes.reshape(N, blocks, group // 2, 2)
        zp = np.pad(zeros.astype(np.uint8), ((0, 0), (0, blocks % 2))).reshape(N, -1, 2)
        graph.initializer.extend([
            numpy_helper.from_array((packed[..., 0] | packed[..., 1] << 4).astype(np.uint8), f"{name}.qweight"),
            numpy_helper.from_array(scales.reshape(-1), f"{name}.scales"),
            numpy_helper.from_array((zp[..., 0] | zp[..., 1] << 4).reshape(-1), f"{name}.qzeros")])
        graph.node[i].CopyFrom(helper.make_node(
            "MatMulNBits", [node.input[0], f"{name}.qweight", f"{name}.scales", f"{name}.qzeros"], list(node.output),
            name=f"{name}.MatMulNBits", domain="com.microsoft", K=K, N=N, bits=BITS, block_size=group,
            accuracy_level=accuracy_level))
        replaced.append(m[0])
    if replaced and all(o.domain != "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    for j in reversed(range(len(graph.initializer))):  # by index: never copy the big weights around
        if graph.initializer[j].name in replaced:
            del graph.initializer[j]
    return len(replaced)


def _unfused(ckpt: Checkpoint, prefix: str, proj: str) -> list[str]:
    """export/optimize.py's fused names back to modules: qkv_proj -> q/k/v_proj, gate_up_proj -> gate/up_proj
    (the traced values are compared with the stored ones after, so a wrong guess is only a miss)."""
    if f"{prefix}.{proj}.scales" in ckpt.tensors:
        return [proj]
    stem = proj.removesuffix("_proj")
    return [f"{p}_proj" for p in (stem.split("_") if "_" in stem else stem)]


def _stored(ckpt: Checkpoint, module: str):
    """(codes uint8 [out, in], scales float32 [out, groups], zeros uint8 [out, groups], group size) of a
    stored 4-bit module whose biases are exactly -zero * scale with integer zeros, else None."""
    from safetensors import safe_open

    p = module_params(ckpt.quantization, module) if f"{module}.scales" in ckpt.tensors else None
    if p is None or p.bits != BITS:
        return None
    t = {}
    for key in ("weight", "scales", "biases"):
        with safe_open(str(ckpt.tensors[f"{module}.{key}"].file), framework="numpy") as f:
            t[key] = f.get_tensor(f"{module}.{key}")
    scales, biases = t["scales"].astype(np.float32), t["biases"].astype(np.float32)
    zeros = np.rint(-biases / np.where(scales == 0, 1, scales))
    if not (np.array_equal(-(zeros * scales), biases) and zeros.min() >= 0 and zeros.max() < 1 << BITS):
        return None
    words = t["weight"].astype(np.uint32)
    codes = ((words[..., None] >> np.arange(0, 32, BITS, dtype=np.uint32)) & 15).reshape(words.shape[0], -1)
    return codes.astype(np.uint8), scales, zeros.astype(np.uint8), p.group_size
