"""One MLX-quantized matrix as onnxruntime runs it, in each form an exporter could write, timed side by side.

    nice python -m benchmarks.speed.matmulnbits_forms [--K 896] [--N 4864] [--group 64] [--rounds 7]

A [N, K] 4-bit affine matrix (w = s * q + b per group, MLX's layout; random codes, scales and biases) on the CPU
provider, decode (1 row) and prefill (128 rows), accuracy_level 4 unless said:
  uint8 zero points + correction   export/stored_quant.py's form: MatMulNBits(z = round(-b/s)) + groupsum(x) @ c^T
  no zero points + correction      MatMulNBits' symmetric default z = 8, all of b + 8 s in c
  uint8 zero points alone          the same without the correction (not exact for MLX biases: the speed floor)
  float zero points                z = -b / s as a float zero-point input: exact in one op
  float32 MatMul                   the dequantized weights
Each form is its own session; per round every form runs `--calls` times in turn (order reversed every other
round), and the table shows the median over rounds of the mean time per call, with the max |error| against
x @ w^T in float64 relative to its largest value.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from benchmarks.common import prog, round_order
from export.nbits_nodes import pack_codes
from qwen_mlx.formats.affine import dequantize_codes


def build(form: str, q, s, b, G: int):
    N, K = q.shape
    inits, nodes = [], []
    x, y = "x", "y"
    if form == "float32 MatMul":
        w = dequantize_codes(q, s, b, G).astype(np.float32)
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), "W"))
        nodes.append(helper.make_node("MatMul", [x, "W"], [y]))
    else:
        level = 4
        inits += [numpy_helper.from_array(pack_codes(q, 4).reshape(N, K // G, G // 2), "B"),
                  numpy_helper.from_array(s, "S")]
        ins = [x, "B", "S"]
        if form.startswith("float zero"):
            inits.append(numpy_helper.from_array((-b / s).astype(np.float32), "Z"))
            ins.append("Z")
            z = None
        elif form.startswith("uint8"):
            z = np.clip(np.rint(-b / s), 0, 15).astype(np.uint8)
            inits.append(numpy_helper.from_array(pack_codes(z, 4), "Z"))
            ins.append("Z")
        else:
            z = np.full(s.shape, 8, np.uint8)
        correct = form.endswith("correction")
        nodes.append(helper.make_node("MatMulNBits", ins, ["q" if correct else y], domain="com.microsoft",
                                      K=K, N=N, bits=4, block_size=G, accuracy_level=level))
        if correct:
            c = (b + s * z).astype(np.float32)
            inits += [numpy_helper.from_array(np.ascontiguousarray(c.T), "C"),
                      numpy_helper.from_array(np.array([0, 0, K // G, G], np.int64), "shape"),
                      numpy_helper.from_array(np.array([-1], np.int64), "last")]
            nodes += [helper.make_node("Reshape", [x, "shape"], ["g"]),
                      helper.make_node("ReduceSum", ["g", "last"], ["gs"], keepdims=0),
                      helper.make_node("MatMul", ["gs", "C"], ["cc"]),
                      helper.make_node("Add", ["q", "cc"], [y])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, "M", K])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, "M", N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=9)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


FORMS = ["uint8 zero points + correction", "no zero points + correction", "uint8 zero points alone",
         "float zero points", "float32 MatMul"]


def main() -> None:
    ap = argparse.ArgumentParser(prog=prog(__spec__.name), description=__doc__.split("\n\n")[0])
    ap.add_argument("--K", type=int, default=896)
    ap.add_argument("--N", type=int, default=4864)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=50)
    opts = ap.parse_args()
    import mlx.core as mx

    rng = np.random.default_rng(0)
    w = mx.array(rng.normal(size=(opts.N, opts.K)).astype(np.float32) * 0.02)
    packed, s, b = mx.quantize(w, opts.group, 4)  # MLX's own quantizer: its scales and biases
    s, b = np.array(s), np.array(b)
    q = np.array(mx.dequantize(packed, mx.ones(s.shape), mx.zeros(b.shape), opts.group, 4)).astype(np.uint8)
    exact = (q.reshape(opts.N, -1, opts.group) * s[..., None].astype(np.float64) + b[..., None]).reshape(opts.N, opts.K)
    sessions = {f: build(f, q, s, b, opts.group) for f in FORMS}
    print(f"[{opts.N}, {opts.K}] 4-bit, group {opts.group}, onnxruntime {ort.__version__}, CPU provider, 2 threads; "
          f"median over {opts.rounds} rounds of {opts.calls} calls")
    print("| form | decode (1 row) ms | prefill (128 rows) ms | max error (of max) |")
    print("| --- | --- | --- | --- |")
    results = {}
    for rows in (1, 128):
        x = rng.normal(size=(1, rows, opts.K)).astype(np.float32)
        want = x[0].astype(np.float64) @ exact.T
        times = {f: [] for f in FORMS}
        calls = opts.calls if rows == 1 else max(opts.calls // 10, 3)
        for r in range(opts.rounds):
            for f in round_order(FORMS, r):
                sess = sessions[f]
                sess.run(None, {"x": x})
                start = time.perf_counter()
                for _ in range(calls):
                    got = sess.run(None, {"x": x})[0]
                times[f].append((time.perf_counter() - start) / calls * 1e3)
                results.setdefault(f, {})[f"err{rows}"] = float(np.abs(got[0] - want).max() / np.abs(want).max())
        for f in FORMS:
            results[f][rows] = statistics.median(times[f])
    for f in FORMS:
        r = results[f]
        print(f"| {f} | {r[1]:.3f} | {r[128]:.2f} | {r['err128']:.2g} |")


if __name__ == "__main__":
    main()
