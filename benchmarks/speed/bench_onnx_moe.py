"""The MoE layer in ONNX two ways, on onnxruntime's CPU provider: the standard ops export/models/qwen2.py traces to
(router MatMul, Softmax, TopK, a Gather of the chosen experts' stacked matrices, MatMuls) beside
onnxruntime's fused `com.microsoft` MoE op, on one random layer; same answer checked, then timed in
interleaved rounds.

    python -m benchmarks.speed.bench_onnx_moe [--hidden 1024] [--experts 60] [--top-k 4] [--inter 704] [--rounds 7]

Decode is 1 token, prefill 64 tokens per call. `--int4` adds both graphs quantized as `export-onnx --quantize
int4` does it (standard: GatherBlockQuantized experts; fused: QMoE, 4-bit blocks of 32, int8 activations). The com.microsoft graph takes the same weights: gate and up
interleaved per expert ([X, 2I, H], swiglu_fusion=1, the only layout its CPU kernel takes; SwiGLU with
alpha 1 and beta 0 is SiLU(gate) * up), down [X, H, I]; it does its own softmax and top-k on the router
logits (normalize_routing_weights = norm_topk_prob).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import prog, round_order


def standard_graph(block, hidden: int, path: Path) -> None:
    import torch

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = block.eval()

        def forward(self, x):
            return self.block(x)

    x = torch.zeros(1, 3, hidden)
    seq = torch.export.Dim("sequence")
    program = torch.onnx.export(Wrap(), (x,), dynamo=True, input_names=["x"], output_names=["y"],
                                dynamic_shapes={"x": {1: seq}}, opset_version=18, optimize=True, verbose=False)
    program.save(str(path))


def fused_graph(block, hidden: int, path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    e = block.experts
    # The CPU kernel takes gate and up interleaved row by row (swiglu_fusion=1): rows 2i, 2i+1 = gate_i, up_i.
    gate, up = e.gate_proj.weight.detach().numpy(), e.up_proj.weight.detach().numpy()
    gate_up = np.stack([gate, up], axis=2).reshape(gate.shape[0], 2 * gate.shape[1], gate.shape[2])
    inits = [numpy_helper.from_array(block.gate.weight.detach().numpy().T.copy(), "router"),
             numpy_helper.from_array(gate_up, "fc1"),
             numpy_helper.from_array(e.down_proj.weight.detach().numpy(), "fc2"),
             numpy_helper.from_array(np.array([-1, hidden], np.int64), "flat"),
             numpy_helper.from_array(np.array([1, -1, hidden], np.int64), "unflat")]
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["x2"]),
             helper.make_node("MatMul", ["x2", "router"], ["logits"]),
             helper.make_node("MoE", ["x2", "logits", "fc1", "", "fc2"], ["y2"], domain="com.microsoft",
                              k=block.top_k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                              activation_beta=0.0, normalize_routing_weights=int(block.norm_topk_prob)),
             helper.make_node("Reshape", ["y2", "unflat"], ["y"])]
    graph = helper.make_graph(nodes, "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "L", hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "L", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")


def int4_graph(src: Path, path: Path) -> None:
    """`src` quantized as export-onnx --quantize int4 does it (export/quantize.py): a standard graph's expert
    Gathers -> GatherBlockQuantized, a fused graph's MoE -> QMoE (export/moe_onnx.py)."""
    import onnx

    from export.quantize import quantize_int4

    proto = quantize_int4(onnx.load(str(src)))
    onnx.save_model(proto, str(path), save_as_external_data=True, location=path.name + ".data")


def main() -> None:
    p = argparse.ArgumentParser(prog=prog(__spec__.name), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=60)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--inter", type=int, default=704)
    p.add_argument("--norm-topk-prob", action="store_true")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--int4", action="store_true", help="also both graphs quantized to int4 as export-onnx does")
    a = p.parse_args()
    import onnxruntime as ort
    import torch

    from export.models.qwen2 import SparseMoeBlock
    from qwen_mlx.config import ModelArgs

    args = ModelArgs.from_dict(dict(model_type="qwen3_moe", hidden_size=a.hidden, intermediate_size=a.inter,
                                    num_hidden_layers=1, num_attention_heads=8, vocab_size=16,
                                    num_experts=a.experts, num_experts_per_tok=a.top_k,
                                    moe_intermediate_size=a.inter, norm_topk_prob=a.norm_topk_prob))
    torch.manual_seed(0)
    block = SparseMoeBlock(args).eval()
    with torch.no_grad():
        for w in block.parameters():
            w.normal_(0, a.hidden ** -0.5)
    tmp = Path(tempfile.mkdtemp())
    standard_graph(block, a.hidden, tmp / "standard.onnx")
    fused_graph(block, a.hidden, tmp / "fused.onnx")
    names = ["standard", "fused"]
    if a.int4:
        for name in ("standard", "fused"):
            int4_graph(tmp / f"{name}.onnx", tmp / f"{name}-int4.onnx")
        names += ["standard-int4", "fused-int4"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    sessions = {name: ort.InferenceSession(str(tmp / f"{name}.onnx"), options, providers=["CPUExecutionProvider"])
                for name in names}
    rng = np.random.default_rng(0)
    inputs = {n: rng.standard_normal((1, n, a.hidden)).astype(np.float32) for n in (1, 64)}
    with torch.no_grad():
        for n, x in inputs.items():
            want = block(torch.from_numpy(x)).numpy()
            for name, s in sessions.items():
                got = s.run(None, {"x": x})[0]
                print(f"{name:13} {n:3} tokens: max |diff| vs the torch twin {np.abs(got - want).max():.2e} "
                      f"(largest output {np.abs(want).max():.2e})")
    times: dict[tuple[str, int], list[float]] = {(name, n): [] for name in sessions for n in inputs}
    for r in range(a.rounds):
        for name in round_order(names, r):
            for n, x in inputs.items():
                reps = 10 if n == 1 else 2
                t = time.perf_counter()
                for _ in range(reps):
                    sessions[name].run(None, {"x": x})
                times[name, n].append((time.perf_counter() - t) / reps)
    print(f"one MoE layer: hidden {a.hidden}, {a.experts} experts, top {a.top_k}, expert width {a.inter}; "
          f"load average {os.getloadavg()[0]:.1f}; median of {a.rounds} interleaved rounds")
    print("| graph | decode: 1 token, ms | prefill: 64 tokens, ms |")
    print("| --- | --- | --- |")
    for name in sessions:
        print(f"| {name} | {statistics.median(times[name, 1]) * 1e3:.2f} | "
              f"{statistics.median(times[name, 64]) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
