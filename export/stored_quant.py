"""The publisher's own codes in the int4 ONNX export: MatMulNBits (and GatherBlockQuantized) as stored.

A checkpoint stored quantized (mlx_lm.convert -q folders, AWQ/GPTQ repacked by qwen_mlx.formats.awq_gptq) holds,
per group of G inputs, codes q and MLX's affine scale s and bias b: w = s * q + b. The twin takes that
dequantized; handing it to onnxruntime's int4 quantizer would round it a second time into other codes.
Instead every traced MatMul of such a module (a fused q/k/v or gate/up included: their rows concatenate)
becomes MatMulNBits with the same codes, scales and bits (4 or 8), block size = G, computing s * (q - z) for
an integer z; what that misses of s * q + b, the per-group correction c = b + s * z [N, K/G], is added as a
small float product:

    x @ W^T = MatMulNBits(x) + groupsum(x) @ c^T,   groupsum(x) = ReduceSum(Reshape(x, [.., K/G, G]), -1)

the same arithmetic in another summation order. Where uint8 zero points z = round(-b / s) reproduce b exactly
(AWQ/GPTQ: b = -z * s), they are written and there is no correction. Otherwise (MLX's own biases, whose b / s
is whole only up to rounding, and farther off once scales and biases are stored in bfloat16) z is
MatMulNBits' default 2 ** (bits - 1), no zero-point input: a correction is needed either way, and onnxruntime's
CPU kernel runs the symmetric form fastest, with the same error (uint8 zero points measured ~8% slower to
decode; float zero points z = -b / s, exact in one op, ~13-35x slower; docs/BENCHMARKS.md). A stored
embedding becomes GatherBlockQuantized over the same packed bytes (tied to the lm_head as export/quantize.py
ties them), plus the gathered c rows spread over their groups.

A module is carried only when the traced weight equals the stored dequantization (rounded to the export's
dtype) and its scales survive that dtype; anything else, and bits MatMulNBits lacks (2, 3, 5, 6), stays as
traced and is reported (export_onnx then has onnxruntime's int4 quantizer round those MatMuls, saying so).
What the publisher left float stays float: export_onnx runs the int4 quantizer over everything only when
nothing here was carried. This module reads the stored modules and decides; export/nbits_nodes.py writes the
nodes.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

import numpy as np

from qwen_mlx.checkpoint import Checkpoint
from qwen_mlx.formats.affine import module_params, unpack_codes

from .moe_onnx import quantize_moe_int4
from .nbits_nodes import Stored, add_initializers, gather_block_quantized, matmul_nbits
from .quantize import quantize_int4, untie_lm_head

CARRIED_BITS = (4, 8)  # what MatMulNBits and GatherBlockQuantized take (onnxruntime >= 1.2x CPU: both)
_LINEAR = re.compile(r"(?:(.*)\.)?(\w+)\.weight\.T")  # the traced (and fused) Linear weights' names


@dataclass
class Carried:
    """What carry_stored did: modules carried and stored modules left as traced, with the reason."""
    modules: list[str] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)
    left_matmuls: dict[str, list[str]] = field(default_factory=dict)  # MatMul node name -> its `left` modules

    def __len__(self) -> int:
        return len(self.modules)


def int4_from_stored(proto, ckpt: Checkpoint):
    """export-onnx --quantize int4 on a stored quantized checkpoint: carry what can be carried; the MatMuls of
    stored modules that cannot be go to onnxruntime's int4 quantizer. Warnings on stderr name each such module.
    Returns (the model, how many modules were carried); with none carried, the caller quantizes it all."""
    done = carry_stored(proto, ckpt)
    if not done:
        if done.left:
            print(f"warning: no stored quantized module can be carried ({next(iter(done.left.values()))}, ...): "
                  "onnxruntime's int4 quantizer rounds the dequantized weights", file=sys.stderr)
        return proto, 0
    requantized = {m for modules in done.left_matmuls.values() for m in modules}
    for module, why in done.left.items():
        to = "re-quantized to int4 by onnxruntime's quantizer" if module in requantized else "left float"
        print(f"warning: {module} is stored quantized but not carried ({why}): {to}", file=sys.stderr)
    only = list(done.left_matmuls)
    if any(len(t.shape) == 3 for k, t in ckpt.tensors.items() if k.endswith(".scales")):
        # Stacked experts: QMoE and the expert Gathers hold no per-group correction, so they are rounded as a
        # float checkpoint's are (QMoE for --moe fused, GatherBlockQuantized for standard) rather than kept float.
        print("warning: the routed experts are stored quantized but not carried (stacked experts): re-quantized "
              "to int4 by onnxruntime's quantizer", file=sys.stderr)
        quantize_moe_int4(proto.graph)
        ranks = {t.name: len(t.dims) for t in proto.graph.initializer}
        only += [n.name for n in proto.graph.node if _is_plain(n, "Gather") and ranks.get(n.input[0]) == 3]
    if only:
        proto = quantize_int4(proto, only=only)
    return proto, len(done)


def carry_stored(proto, ckpt: Checkpoint, accuracy_level: int = 4, zero_points: str = "exact") -> Carried:
    """Rewrite in place every MatMul and Gather of a stored 4- or 8-bit module (see the module docstring).
    `zero_points`: "exact" writes uint8 zero points round(-b / s) for a module where they leave no correction
    (AWQ/GPTQ), else none; "always" and "never" force one form (benchmarks/quality/mlx_onnx_int4.py compares them)."""
    from onnx import helper

    done = Carried()
    if ckpt.quantization is None:
        return done
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    cache: dict[str, Stored | str] = {}

    def stored(modules: list[str], traced_name: str, transpose: bool) -> Stored | None:
        from onnx import numpy_helper

        parts = [cache.setdefault(m, _stored(ckpt, m, zero_points)) for m in modules]
        why = next((p for p in parts if isinstance(p, str)), None)
        if why is None and len({(p.bits, p.group) for p in parts}) != 1:
            why = "fused siblings stored with different bits or group sizes"
        if why is None:
            s = Stored(*(np.concatenate([getattr(p, k) for p in parts]) for k in
                         ("codes", "scales", "biases", "zeros")), parts[0].bits, parts[0].group)
            traced = numpy_helper.to_array(inits[traced_name])
            traced = traced.T if transpose else traced
            # float16 export: the twin's weights are the exact dequantization rounded once to float16; the
            # scales go in the activations' dtype too, which fp16-published scales survive exactly
            if not np.array_equal(traced, s.dequantized.astype(traced.dtype)):
                why = "the traced weight is not the stored dequantization"
            elif not np.array_equal(s.scales.astype(traced.dtype).astype(np.float32), s.scales):
                why = f"its scales do not survive {traced.dtype}"
            else:
                s.dtype = traced.dtype
                return s
        for m in modules:
            if not (isinstance(cache[m], str) and cache[m].startswith("-")):  # "-": not stored quantized at all
                done.left[m] = why
        return None

    # A tied lm_head reads the embedding through a Transpose: give it its own E.T first (export/quantize.py),
    # and only when the embedding is carried, else the float table would be stored twice.
    embedding = {}
    for n in graph.node:
        if _is_plain(n, "Gather") and n.input[0] in inits and n.input[0].endswith(".weight") \
                and n.input[0] not in embedding and _rank(graph, n.input[1]) is not None:
            s = stored([n.input[0].removesuffix(".weight")], n.input[0], False)
            if s is not None:
                embedding[n.input[0]] = s
    tied = untie_lm_head(graph) if embedding else None
    if tied is not None and tied.embedding not in embedding:  # untie_lm_head found another table
        raise RuntimeError(f"tied lm_head over {tied.embedding}, which is not carried")
    inits = {t.name: t for t in graph.initializer}
    new_nodes: dict[int, list] = {}  # node index -> its replacement
    written: dict[str, tuple[str, str, str | None, str | None]] = {}  # name -> its initializers' names
    for i, node in enumerate(graph.node):
        m = _LINEAR.fullmatch(node.input[1]) if _is_plain(node, "MatMul") and len(node.input) == 2 else None
        if m is None or node.input[1] not in inits:
            continue
        prefix = f"{m[1]}." if m[1] else ""  # lm_head has none
        modules = [prefix + p for p in _unfused(ckpt, prefix, m[2])]
        s = stored(modules, node.input[1], True)
        rank = _rank(graph, node.input[0])
        if s is not None and rank is None and s.correction.any():
            done.left.update((x, "its input's rank is unknown (the correction reshapes it)") for x in modules)
            s = None
        if s is None:
            if any(x in done.left for x in modules):
                done.left_matmuls[node.name] = modules
            continue
        name = node.input[1].removesuffix(".weight.T")
        tied_head = tied is not None and node.input[1] == tied.weight  # shares the table's initializers
        written[name] = add_initializers(graph, name, s, correction_rows=tied_head)
        new_nodes[i] = matmul_nbits(graph, name, node, s, written[name], rank, accuracy_level, tied_head)
        done.modules += modules
    for i, node in enumerate(graph.node):
        if _is_plain(node, "Gather") and node.input[0] in embedding:
            name = node.input[0].removesuffix(".weight")
            s = embedding[node.input[0]]
            if name not in written:
                written[name] = add_initializers(graph, name, s, correction_rows=True)
            new_nodes[i] = gather_block_quantized(graph, name, node, s, written[name], _rank(graph, node.input[1]))
            if name not in done.modules:
                done.modules.append(name)
    if not new_nodes:
        return done
    order = []
    for i, node in enumerate(graph.node):
        order += new_nodes.get(i, [node])
    del graph.node[:]
    graph.node.extend(order)
    if all(o.domain != "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    used = {name for node in graph.node for name in node.input}
    for j in reversed(range(len(graph.initializer))):  # by index: never copy the big weights around
        if graph.initializer[j].name not in used:
            del graph.initializer[j]
    return done


# ---- reading the stored modules -------------------------------------------------------------------------

def _stored(ckpt: Checkpoint, module: str, zero_points: str = "exact") -> Stored | str:
    """The stored module as MatMulNBits holds it, or why not ("-..." when it is not stored quantized)."""
    from safetensors import safe_open

    if f"{module}.scales" not in ckpt.tensors:
        return "-not stored quantized"
    p = module_params(ckpt.quantization, module)
    if p is None:
        return "-left float by config.json"
    if p.bits not in CARRIED_BITS:
        return f"{p.bits}-bit: MatMulNBits takes {' or '.join(map(str, CARRIED_BITS))} bits"
    t = {}
    for key in ("weight", "scales", "biases"):  # by torch, as the twin reads them: numpy has no bfloat16
        with safe_open(str(ckpt.tensors[f"{module}.{key}"].file), framework="pt") as f:
            t[key] = f.get_tensor(f"{module}.{key}")
    if t["weight"].ndim != 2:
        return "stacked experts (not a MatMul)"
    scales, biases = (t[k].float().numpy() for k in ("scales", "biases"))
    zeros = np.clip(np.rint(-biases / np.where(scales == 0, 1, scales)), 0, (1 << p.bits) - 1)
    if zero_points == "never" or (zero_points == "exact" and (biases + scales * zeros).any()):
        # A correction is needed anyway (MLX's b / s is whole only up to rounding): then the symmetric kernel,
        # no zero-point input, is the faster one, with the same error (docs/BENCHMARKS.md)
        zeros = np.full_like(scales, 1 << (p.bits - 1))
    return Stored(unpack_codes(t["weight"].numpy(), p.bits), scales, biases, zeros.astype(np.uint8), p.bits, p.group_size)


def _unfused(ckpt: Checkpoint, prefix: str, proj: str) -> list[str]:
    """export/optimize.py's fused names (under `prefix`: "" or ending in a dot) back to modules: qkv_proj ->
    q/k/v_proj, gate_up_proj -> gate/up_proj (the traced values are compared with the stored ones after, so a
    wrong guess is only a miss)."""
    if f"{prefix}{proj}.scales" in ckpt.tensors:
        return [proj]
    stem = proj.removesuffix("_proj")
    return [f"{p}_proj" for p in (stem.split("_") if "_" in stem else stem)]


# ---- graph queries ---------------------------------------------------------------------------------------

def _is_plain(node, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in ("", "ai.onnx")


def _rank(graph, name: str) -> int | None:
    for v in [*graph.input, *graph.value_info, *graph.output]:
        if v.name == name and v.type.tensor_type.HasField("shape"):
            return len(v.type.tensor_type.shape.dim)
    return None
