"""Graph passes on the traced ONNX decoder, run by export_onnx before int4 quantization.

Two rewrites, both exact in float32 up to rounding (summation order, 1/x vs division), standard ONNX in and out,
and neither touches the graph's inputs or outputs:

- `fuse_sibling_matmuls`: MatMuls that read the same activation with constant 2-D weights (q/k/v, gate/up)
  become one MatMul on the weights concatenated along N, then a Split back into the original tensor names.
  When every member is followed by its own Add of a constant 1-D bias (q/k/v), the biases are concatenated
  too and added once before the Split. One wide MatMul reads the activation once (int4: quantizes it to
  int8 once) and is one kernel launch instead of three; onnxruntime-genai's builder fuses q/k/v the same
  way (N = 1152 on Qwen2.5-0.5B).
- `canonicalize_rms_norm`: the dynamo exporter writes `torch.rsqrt(v)` as Sqrt -> Reciprocal -> Mul(x, .).
  onnxruntime's load-time SimplifiedLayerNormFusion only matches Pow -> ReduceMean -> Add -> Sqrt ->
  Div(x, .) -> Mul(weight): with the Reciprocal the fusion never fires and every RMSNorm stays 6-7 kernels.
  Rewriting Mul(x, Reciprocal(s)) as Div(x, s) lets onnxruntime fuse each norm into one
  SimplifiedLayerNormalization at session load (written `h / torch.sqrt(...)` in the twin, the tracer would
  produce the Div itself).
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

# The MoE router and Qwen2-MoE's shared-expert gate: they choose and scale experts. Kept as their own float
# MatMuls (never fused, never int4): rounding them changes which experts run, and they are ~0.1% of weights.
ROUTER_WEIGHTS = re.compile(r".*\.mlp\.(gate|shared_expert_gate)\.weight\.T")


def optimize(proto) -> dict:
    """Run every pass on `proto` (an onnx.ModelProto, weights in memory) in place; returns counts."""
    stats = {"rms_norm_divs": canonicalize_rms_norm(proto.graph)}
    stats.update(fuse_sibling_matmuls(proto.graph))
    return stats


# ---- helpers ------------------------------------------------------------------------------------------

def _consumers(graph) -> dict[str, list]:
    out: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                out[name].append(node)
    return out


def _producers(graph) -> dict[str, object]:
    return {name: node for node in graph.node for name in node.output if name}


# ---- RMSNorm: Mul(x, Reciprocal(Sqrt(.))) -> Div(x, Sqrt(.)) ------------------------------------------

def canonicalize_rms_norm(graph) -> int:
    """Replace Mul(x, Reciprocal(s)) by Div(x, s) where s comes from a Sqrt and the Reciprocal feeds only
    Muls. Returns the number of Muls rewritten."""
    producers, consumers = _producers(graph), _consumers(graph)
    outputs = {o.name for o in graph.output}
    rewritten, dead = 0, []
    for node in list(graph.node):
        if node.op_type != "Reciprocal" or node.domain not in ("", "ai.onnx"):
            continue
        r = node.output[0]
        sqrt = producers.get(node.input[0])
        users = consumers.get(r, [])
        if sqrt is None or sqrt.op_type != "Sqrt" or r in outputs or not users:
            continue
        if any(u.op_type != "Mul" or u.domain not in ("", "ai.onnx") or list(u.input).count(r) != 1
               for u in users):
            continue
        for mul in users:
            x = mul.input[1] if mul.input[0] == r else mul.input[0]
            mul.op_type = "Div"
            del mul.input[:]
            mul.input.extend([x, node.input[0]])
            rewritten += 1
        dead.append(node)
    dead_outputs = {d.output[0] for d in dead}
    for i in reversed(range(len(graph.node))):
        if graph.node[i].op_type == "Reciprocal" and graph.node[i].output[0] in dead_outputs:
            del graph.node[i]
    return rewritten


# ---- sibling MatMuls -> one MatMul + Split ------------------------------------------------------------

def _fused_name(names: list[str]) -> str:
    """['...q_proj.weight.T', '...k_proj.weight.T', '...v_proj.weight.T'] -> '...qkv_proj.weight.T'."""
    found = [re.fullmatch(r"(.*\.)(\w+?)_proj(\..*)", n) for n in names]
    if all(found) and len({(m.group(1), m.group(3)) for m in found}) == 1:
        parts = [m.group(2) for m in found]
        joined = "".join(parts) if all(len(p) == 1 for p in parts) else "_".join(parts)
        return f"{found[0].group(1)}{joined}_proj{found[0].group(3)}"
    return names[0] + ".fused"


def fuse_sibling_matmuls(graph) -> dict:
    """One MatMul + Split for every set of MatMuls reading the same activation with constant 2-D weights
    of one dtype and one K. Returns {'matmul_groups': n, 'matmuls_fused': m, 'biases_fused': b}."""
    inits = {t.name: t for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    consumers = _consumers(graph)
    uses: dict[str, int] = defaultdict(int)
    for node in graph.node:
        for name in node.input:
            uses[name] += 1
    groups: dict[tuple, list] = defaultdict(list)
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        w = inits.get(node.input[1])
        # A weight another node also reads stays as it is (concatenating would store it twice); MoE routers
        # stay apart so that int4 never quantizes them (ROUTER_WEIGHTS).
        if w is None or len(w.dims) != 2 or uses[w.name] != 1 or node.input[0] in inits \
                or node.output[0] in graph_outputs or ROUTER_WEIGHTS.fullmatch(w.name):
            continue
        groups[(node.input[0], w.data_type, w.dims[0])].append(node)

    stats = {"matmul_groups": 0, "matmuls_fused": 0, "biases_fused": 0}
    taken = {n for node in graph.node for n in (*node.output, node.name)} | set(inits) | {v.name for v in graph.input}
    insert_at: dict[int, list] = {}  # id(first member) -> the nodes that replace the group there
    removed: set[int] = set()
    dead: set[str] = set()
    added = []
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        new_nodes, gone, dead_inits, new_inits = _plan_group(nodes, inits, consumers, graph_outputs, taken)
        insert_at[id(nodes[0])] = new_nodes
        removed |= {id(n) for n in gone}
        dead |= dead_inits
        added += new_inits
        stats["matmul_groups"] += 1
        stats["matmuls_fused"] += len(nodes)
        stats["biases_fused"] += len(gone) - len(nodes)
    if not insert_at:
        return stats
    from onnx import NodeProto

    order = []
    for node in graph.node:
        # The first member's position: its inputs exist there, and every consumer of any member's output
        # comes after that member, so after the first one.
        order += insert_at.get(id(node), [])
        if id(node) not in removed:
            copy = NodeProto()
            copy.CopyFrom(node)
            order.append(copy)
    del graph.node[:]
    graph.node.extend(order)
    for i in reversed(range(len(graph.initializer))):  # by index: never copy the big weights around
        if graph.initializer[i].name in dead:
            del graph.initializer[i]
    graph.initializer.extend(added)
    return stats


def _bias_of(node, inits, consumers, graph_outputs):
    """(Add node, bias initializer) when `node`'s output feeds exactly one Add of a 1-D constant of width N."""
    out = node.output[0]
    users = consumers.get(out, [])
    if len(users) != 1 or out in graph_outputs:
        return None
    add = users[0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2 \
            or list(add.input).count(out) != 1:
        return None
    other = add.input[1] if add.input[0] == out else add.input[0]
    bias = inits.get(other)
    weight = inits[node.input[1]]
    if bias is None or list(bias.dims) != [weight.dims[1]] or bias.data_type != weight.data_type \
            or len(consumers.get(other, [])) != 1:
        return None
    return add, bias


def _plan_group(nodes, inits, consumers, graph_outputs, taken):
    """-> (new nodes, nodes they replace, initializer names to drop, new initializers) for one group."""
    from onnx import helper, numpy_helper

    def unique(base: str) -> str:
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    weights = [inits[m.input[1]] for m in nodes]
    widths = [int(w.dims[1]) for w in weights]
    biases = [_bias_of(m, inits, consumers, graph_outputs) for m in nodes]
    with_bias = all(b is not None for b in biases)

    w_name = unique(_fused_name([w.name for w in weights]))
    new_inits = [numpy_helper.from_array(np.concatenate([numpy_helper.to_array(w) for w in weights], axis=1), w_name)]
    base = w_name.removesuffix(".weight.T").removesuffix(".weight")
    mm_out = unique(f"{base}.MatMul.output")
    new_nodes = [helper.make_node("MatMul", [nodes[0].input[0], w_name], [mm_out], name=unique(f"{base}.MatMul"))]
    gone = list(nodes)
    dead = {w.name for w in weights}
    split_in, outputs = mm_out, [m.output[0] for m in nodes]
    if with_bias:
        b_name = unique(f"{base}.bias")
        new_inits.append(numpy_helper.from_array(np.concatenate([numpy_helper.to_array(b) for _, b in biases]), b_name))
        split_in = unique(f"{base}.Add.output")
        new_nodes.append(helper.make_node("Add", [mm_out, b_name], [split_in], name=unique(f"{base}.Add")))
        outputs = [add.output[0] for add, _ in biases]
        gone += [add for add, _ in biases]
        dead |= {b.name for _, b in biases}
    sizes_name = unique(f"{base}.split_sizes")
    new_inits.append(numpy_helper.from_array(np.array(widths, np.int64), sizes_name))
    new_nodes.append(helper.make_node("Split", [split_in, sizes_name], outputs, axis=-1, name=unique(f"{base}.Split")))
    return new_nodes, gone, dead, new_inits


# ---- GroupQueryAttention: packed q/k/v -------------------------------------------------------------------

def pack_gqa_qkv(graph) -> int:
    """GroupQueryAttention(Split(qkv) -> q, k, v, ...) -> GroupQueryAttention(qkv, "", "", ...): the op takes
    q/k/v packed along the last axis [B, L, (H + 2K) * D] (as the builder feeds it), so the Split after the
    fused q/k/v MatMul goes. Only where the Split's three outputs feed that one node, in order. Returns the
    number of nodes packed."""
    producers, consumers = _producers(graph), _consumers(graph)
    outputs = {o.name for o in graph.output}
    dead, sizes, packed = set(), set(), 0
    for node in graph.node:
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft" or len(node.input) < 3:
            continue
        split = producers.get(node.input[0])
        if split is None or split.op_type != "Split" or list(split.output) != list(node.input[:3]):
            continue
        axis = [a.i for a in split.attribute if a.name == "axis"]
        if axis not in ([-1], [2]) or any(len(consumers[o]) != 1 or o in outputs for o in split.output):
            continue
        node.input[0], node.input[1], node.input[2] = split.input[0], "", ""
        dead.add(id(split))
        sizes |= {name for name in split.input[1:] if len(consumers.get(name, [])) == 1}
        packed += 1
    for i in reversed(range(len(graph.node))):
        if id(graph.node[i]) in dead:
            del graph.node[i]
    for i in reversed(range(len(graph.initializer))):  # the Splits' size constants
        if graph.initializer[i].name in sizes:
            del graph.initializer[i]
    return packed


# ---- residual Add + RMSNorm -> SkipSimplifiedLayerNormalization ----------------------------------------------

def _constant(graph, name: str):
    from onnx import numpy_helper

    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    return None


def fuse_skip_rms_norm(graph) -> int:
    """Add(x, y) -> s; RMSNorm(s) = weight * s / Sqrt(ReduceMean(s^2, -1) + eps) (the form canonicalize_rms_norm
    leaves, float32 throughout: no Casts) -> one com.microsoft SkipSimplifiedLayerNormalization(x, y, weight)
    with outputs [normed, "", "", s], as the builder writes each layer's two norms. onnxruntime fuses the
    norm alone at load (SimplifiedLayerNormalization) but not the residual Add into it. For the gqa form;
    returns the number of norms fused."""
    from onnx import helper

    producers, consumers = _producers(graph), _consumers(graph)
    outputs = {o.name for o in graph.output}
    inits = {t.name for t in graph.initializer}

    def only(name: str, op_type: str):
        users = consumers.get(name, [])
        if len(users) != 1 or name in outputs or users[0].op_type != op_type or users[0].domain not in ("", "ai.onnx"):
            return None
        return users[0]

    plans = []
    for div in graph.node:
        if div.op_type != "Div" or div.domain not in ("", "ai.onnx"):
            continue
        s, q = div.input
        sqrt = producers.get(q)
        add_eps = producers.get(sqrt.input[0]) if sqrt is not None and sqrt.op_type == "Sqrt" else None
        mean = producers.get(add_eps.input[0]) if add_eps is not None and add_eps.op_type == "Add" else None
        power = producers.get(mean.input[0]) if mean is not None and mean.op_type == "ReduceMean" else None
        residual = producers.get(s)
        mul = only(div.output[0], "Mul")
        if power is None or power.op_type != "Pow" or power.input[0] != s or mul is None \
                or residual is None or residual.op_type != "Add" or residual.domain not in ("", "ai.onnx") \
                or s in outputs or any(n in inits for n in residual.input):
            continue
        weight = mul.input[0] if mul.input[1] == div.output[0] else mul.input[1]
        exponent, axes, eps = (_constant(graph, n) for n in (power.input[1], mean.input[1], add_eps.input[1]))
        keepdims = [a.i for a in mean.attribute if a.name == "keepdims"] or [1]
        if weight not in inits or exponent is None or float(exponent) != 2.0 or axes is None \
                or axes.reshape(-1).tolist() != [-1] or keepdims != [1] or eps is None or eps.size != 1:
            continue
        if any(only(n.output[0], nxt) is None for n, nxt in ((power, "ReduceMean"), (mean, "Add"), (add_eps, "Sqrt"),
                                                            (sqrt, "Div"))):
            continue
        if {id(u) for u in consumers[s]} & {id(power), id(div)} != {id(power), id(div)}:
            continue
        fused = helper.make_node("SkipSimplifiedLayerNormalization", [*residual.input, weight],
                                 [mul.output[0], "", "", s], name=f"{mul.name or weight}.SkipSimplifiedLayerNorm",
                                 domain="com.microsoft", epsilon=float(eps.reshape(-1)[0]))
        plans.append((residual, fused, [residual, power, mean, add_eps, sqrt, div, mul]))
    if not plans:
        return 0
    from onnx import NodeProto

    at = {id(residual): fused for residual, fused, _ in plans}
    gone = {id(n) for _, _, nodes in plans for n in nodes}
    order = []
    for node in graph.node:
        if id(node) in at:  # where the residual Add was: x and y exist there, every reader of s comes later
            order.append(at[id(node)])
        if id(node) not in gone:
            copy = NodeProto()
            copy.CopyFrom(node)
            order.append(copy)
    del graph.node[:]
    graph.node.extend(order)
    return len(plans)


__all__ = ["optimize", "fuse_sibling_matmuls", "canonicalize_rms_norm", "pack_gqa_qkv", "fuse_skip_rms_norm",
           "ROUTER_WEIGHTS"]
