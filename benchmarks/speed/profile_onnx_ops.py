"""Kernel time by op type of one decoder graph on onnxruntime's CPU provider (its built-in profiler).

    python -m benchmarks.speed.profile_onnx_ops MODEL.onnx [--threads 1] [--prompt 149] [--steps 32]

Runs a random prompt of --prompt tokens, then --steps greedy decode steps, with the cache fed back as the
standard (concatenating) graphs and GroupQueryAttention graphs both accept, and prints the summed kernel time
per op type for the prefill and per decode step. Works on our exports (with or without position_ids) and on
onnxruntime-genai builder output (same input names).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time

import numpy as np
import onnxruntime as ort

from benchmarks.common import prog


def main() -> None:
    ap = argparse.ArgumentParser(prog=prog(__spec__.name), description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=149)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "profile")
    session = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    past_names = [n for n in inputs if n.startswith("past_key_values.")]
    heads, head_dim = inputs[past_names[0]].shape[1], inputs[past_names[0]].shape[3]

    def run(ids: np.ndarray, past: list[np.ndarray], total: int):
        feed = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64), **dict(zip(past_names, past))}
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(total - ids.shape[1], total)[None]
        logits, *present = session.run(None, feed)
        return logits, present

    P = args.prompt
    past = [np.zeros((1, heads, 0, head_dim), np.float32) for _ in past_names]
    ids = np.random.default_rng(0).integers(0, 500, (1, P))  # ids any vocabulary has.astype(np.int64)
    start = time.perf_counter()
    logits, past = run(ids, past, P)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for step in range(args.steps):
        logits, past = run(np.array([[int(logits[0, -1].argmax())]]), past, P + step + 1)
    decode_s = time.perf_counter() - start
    path = session.end_profiling()
    events = json.load(open(path))
    os.remove(path)
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    prefill_end = runs[0]["ts"] + runs[0]["dur"]
    by_op: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])  # op -> [prefill us, decode us]
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]][0 if e["ts"] <= prefill_end else 1] += e["dur"]
    print(f"{args.model}, {args.threads} thread(s): prefill {P / prefill_s:.1f} tok/s, decode {args.steps / decode_s:.1f} tok/s")
    total = [sum(v[i] for v in by_op.values()) or 1.0 for i in (0, 1)]
    for op, (a, b) in sorted(by_op.items(), key=lambda kv: -kv[1][1]):
        print(f"  {op:34s} prefill {a / 1e3:9.1f} ms ({a / total[0]:5.1%})   decode {b / args.steps / 1e3:8.3f} ms/token "
              f"({b / total[1]:5.1%})")


if __name__ == "__main__":
    main()
