"""The routed experts as onnxruntime's fused `com.microsoft` MoE op (float) or QMoE op (int4), `--moe fused`.

export/models/qwen2.py's SparseMoeBlock traces to standard ops (router MatMul, Softmax, TopK, a Gather of each chosen
expert's stacked matrices, MatMuls): every runtime loads it, but each token copies its k experts' matrices
before multiplying. onnxruntime's MoE op reads them in place and groups tokens by expert: one layer measured
3.6x faster to decode and 5.8x faster to prefill on the CPU provider (docs/BENCHMARKS.md). For the trace,
each SparseMoeBlock is swapped for a FusedMoeBlock on the same weights; its experts go through the custom
torch op `qwen_mlx::moe`, which the dynamo exporter translates to the com.microsoft node:

    x B L E -> x N E (N = B L) -> router MatMul -> logits N X --.
                               `--------------------------------+-> MoE(k, swiglu, interleaved gate/up) -> N E
                               `-> shared expert * sigmoid(shared_expert_gate)  (Qwen2-MoE; outside the op,
                                   whose CPU kernel takes no shared expert) ------------------------------> + -> B L E

The op does its own softmax over the logits and top-k (`normalize_routing_weights` = norm_topk_prob), as HF
does. Its CPU kernel takes SwiGLU only with gate and up interleaved row by row in one [X, 2I, E] stack
(swiglu_fusion=1, alpha 1, beta 0: silu(gate) * up); down stays [X, E, I]. For int4, `quantize_moe_int4`
turns each MoE node into QMoE: 4-bit codes [X, N, K/2] (two per byte, low nibble first), symmetric (no zero
points: 8), float scales per block of 32 (16 where a width is not a multiple of 32) along K, float activations
(no accuracy_level: onnxruntime 1.30, which transformers.js runs in Node, refuses it).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .models.qwen2 import SparseMoeBlock

QMOE_BLOCK_SIZE = 32


@torch.library.custom_op("qwen_mlx::moe", mutates_args=())
def moe(x: torch.Tensor, logits: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, k: int,
        normalize: bool) -> torch.Tensor:
    """x N E, logits N X, gate_up X 2I E (gate, up interleaved by row), down X E I -> N E: what the
    com.microsoft MoE op computes, in torch (the exporter writes the op instead)."""
    weights, indices = torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)  # N k
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    h = torch.matmul(gate_up[indices], x[:, None, :, None]).squeeze(-1)             # N k 2I
    h = F.silu(h[..., 0::2]) * h[..., 1::2]                                          # N k I
    y = torch.matmul(down[indices], h[..., None]).squeeze(-1)                        # N k E
    return (y * weights[..., None].to(y.dtype)).sum(dim=1)


@moe.register_fake
def _(x, logits, gate_up, down, k, normalize):
    return torch.empty_like(x)


def _moe_schema():
    """The com.microsoft MoE op's signature (onnxruntime's contrib schema, inputs and attributes we use), for
    onnxscript, which finds no schema for com.microsoft ops in the onnx package."""
    from onnx.defs import OpSchema

    optional = OpSchema.FormalParameterOption.Optional
    inputs = [OpSchema.FormalParameter(name, "T", param_option=optional if i in (3, 5, 6, 7) else
                                       OpSchema.FormalParameterOption.Single)
              for i, name in enumerate(["input", "router_probs", "fc1_experts_weights", "fc1_experts_bias",
                                        "fc2_experts_weights", "fc2_experts_bias", "fc3_experts_weights",
                                        "fc3_experts_bias"])]
    attrs = [OpSchema.Attribute(name, kind, "") for name, kind in
             [("k", OpSchema.AttrType.INT), ("activation_type", OpSchema.AttrType.STRING),
              ("swiglu_fusion", OpSchema.AttrType.INT), ("activation_alpha", OpSchema.AttrType.FLOAT),
              ("activation_beta", OpSchema.AttrType.FLOAT), ("normalize_routing_weights", OpSchema.AttrType.INT)]]
    return OpSchema("MoE", "com.microsoft", 1, inputs=inputs, outputs=[OpSchema.FormalParameter("output", "T")],
                    type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
                    attributes=attrs)


def _moe_to_onnx(x, logits, gate_up, down, k: int, normalize: bool):
    """qwen_mlx::moe -> com.microsoft MoE (the dynamo exporter's custom translation)."""
    from onnxscript import values

    op = values.Op(values.Opset("com.microsoft", 1), "MoE", _moe_schema())
    return op(x, logits, gate_up, None, down, k=k, activation_type="swiglu", swiglu_fusion=1,
              activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=int(normalize))


CUSTOM_TRANSLATIONS = {torch.ops.qwen_mlx.moe.default: _moe_to_onnx}


class FusedExperts(nn.Module):
    """The routed experts in the op's layout: gate and up interleaved by row, X 2I E; down X E I."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        X, I, E = gate.shape
        self.gate_up_proj = nn.Parameter(torch.stack([gate, up], dim=2).reshape(X, 2 * I, E), requires_grad=False)
        self.down_proj = nn.Parameter(down, requires_grad=False)


class FusedMoeBlock(nn.Module):
    """SparseMoeBlock with its routed experts as one `qwen_mlx::moe` op (same weights, same math)."""

    def __init__(self, block: SparseMoeBlock):
        super().__init__()
        self.top_k, self.norm_topk_prob = block.top_k, block.norm_topk_prob
        self.gate = block.gate
        e = block.experts
        self.experts = FusedExperts(e.gate_proj.weight.data, e.up_proj.weight.data, e.down_proj.weight.data)
        self.has_shared_expert = block.has_shared_expert
        if self.has_shared_expert:
            self.shared_expert = block.shared_expert
            self.shared_expert_gate = block.shared_expert_gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, E = x.shape
        x = x.reshape(B * L, E)                                                      # N E: rows the op takes
        shared = None
        if self.has_shared_expert:
            shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        y = torch.ops.qwen_mlx.moe(x, self.gate(x), self.experts.gate_up_proj, self.experts.down_proj,
                                   self.top_k, self.norm_topk_prob)                  # N E
        if shared is not None:
            y = y + shared
        return y.reshape(B, L, E)


def fuse_moe_blocks(model: nn.Module) -> int:
    """Swap every SparseMoeBlock of the twin for a FusedMoeBlock in place (the experts' weights are
    re-laid once); returns how many."""
    n = 0
    for layer in model.model.layers:
        if isinstance(layer.mlp, SparseMoeBlock):
            layer.mlp = FusedMoeBlock(layer.mlp)
            n += 1
    return n


# ---- int4: MoE -> QMoE ---------------------------------------------------------------------------------

def quantize_block_int4(w: np.ndarray, block: int = QMOE_BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """w X N K float -> (codes X N K/2 uint8, two per byte, low nibble first; scales X N K/block float32),
    symmetric: w ~ (code - 8) * scale, the largest magnitude of each block mapped to -8 (as MatMulNBits'
    symmetric quantizer does)."""
    X, N, K = w.shape
    g = w.astype(np.float32).reshape(X, N, K // block, block)
    amax = np.take_along_axis(g, np.abs(g).argmax(-1)[..., None], -1)                 # signed, X N B 1
    scales = amax / -8.0
    safe = np.where(scales == 0, 1.0, scales)
    q = (np.clip(np.rint(g / safe), -8, 7) + 8).astype(np.uint8).reshape(X, N, K)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), scales[..., 0].astype(np.float32)


def dequantize_block_int4(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The inverse reading of quantize_block_int4 (for tests and checks)."""
    X, N, half = codes.shape
    q = np.stack([codes & 0xF, codes >> 4], axis=-1).reshape(X, N, 2 * half).astype(np.float32) - 8
    block = 2 * half // scales.shape[-1]
    return (q.reshape(X, N, -1, block) * scales[..., None]).reshape(X, N, 2 * half)


def qmoe_block_size(hidden: int, inter: int) -> int:
    """The QMoE block along K: 32 (as MatMulNBits here) when both widths split into it, else 16 (the op's
    smallest); the op takes no padding."""
    for block in (QMOE_BLOCK_SIZE, 16):
        if hidden % block == 0 and inter % block == 0:
            return block
    raise ValueError(f"expert widths {hidden} and {inter} do not split into blocks of 16 (QMoE's smallest); "
                     "export with --moe standard")


def quantize_moe_int4(graph, accuracy_level: int | None = None) -> int:
    """Every com.microsoft MoE node whose expert stacks are initializers -> QMoE with 4-bit experts in place;
    the float stacks are dropped. Returns how many nodes were rewritten.

    onnxruntime 1.31's CPU QMoE ignores normalize_routing_weights=0: it always renormalizes the k chosen
    weights (measured: it then equals MoE only with normalization on). So without norm_topk_prob the full
    softmax goes in as `router_weights` (its optional 15th input: router_probs then only picks the experts
    and the chosen experts' weights are read from it), which both settings then match to 1e-7.
    `accuracy_level` is left out by default (float activations): onnxruntime 1.30's QMoE, the one
    transformers.js runs in Node, refuses the attribute."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    drop, order, count = set(), [], 0
    for node in graph.node:
        if node.op_type != "MoE" or node.domain != "com.microsoft":
            order.append(node)
            continue
        x, logits, fc1, _, fc2 = list(node.input)[:5]
        w1, w2 = numpy_helper.to_array(inits[fc1]), numpy_helper.to_array(inits[fc2])
        block = qmoe_block_size(w1.shape[2], w2.shape[2])
        (q1, s1), (q2, s2) = quantize_block_int4(w1, block), quantize_block_int4(w2, block)
        names = [f"{fc1}_Q4", f"{fc1}_scales", f"{fc2}_Q4", f"{fc2}_scales"]
        for name, value in zip(names, (q1, s1, q2, s2)):
            graph.initializer.append(numpy_helper.from_array(value, name))
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        inputs = [x, logits, names[0], names[1], "", names[2], names[3]]
        if not attrs.get("normalize_routing_weights", 0):
            probs = f"{node.output[0]}.router_weights"
            order.append(helper.make_node("Softmax", [logits], [probs], name=f"{node.name}.Softmax", axis=-1))
            inputs += [""] * 7 + [probs]
        if accuracy_level is not None:
            attrs["accuracy_level"] = accuracy_level
        order.append(helper.make_node("QMoE", inputs, list(node.output), name=f"{node.name or fc1}.int4",
                                      domain="com.microsoft", expert_weight_bits=4, block_size=block, **attrs))
        drop |= {fc1, fc2}
        count += 1
    if count:
        order = [_copy(n) for n in order]  # the graph's own nodes are cleared below: keep copies
        del graph.node[:]
        graph.node.extend(order)
    for j in reversed(range(len(graph.initializer))):  # by index: never copy the big weights around
        if graph.initializer[j].name in drop:
            del graph.initializer[j]
    return count


def _copy(node):
    from onnx import NodeProto

    out = NodeProto()
    out.CopyFrom(node)
    return out


__all__ = ["CUSTOM_TRANSLATIONS", "FusedMoeBlock", "fuse_moe_blocks",
           "quantize_moe_int4", "qmoe_block_size", "quantize_block_int4", "dequantize_block_int4"]
