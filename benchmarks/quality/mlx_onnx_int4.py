"""An mlx_lm.convert -q folder in the int4 ONNX export: the stored codes carried (export/stored_quant.py) against
onnxruntime's quantizer run over the dequantized weights (what the export did before), speed and error.

    nice python -m benchmarks.quality.mlx_onnx_int4 --model MLX_Q4_FOLDER [--float HF_FOLDER]
        [--work DIR] [--rounds 5] [-n 32]

Variants, each exported once into --work (a subprocess apiece, one at a time: the quantizer peaks ~8 GB):
  carried            the default: MatMulNBits with the stored codes and scales, no zero-point input
                     (MatMulNBits' default 8), + groupsum(x) @ c^T for the per-group remainder c = b + 8 s;
                     the embedding GatherBlockQuantized + its gathered c rows
  uint8-zero-points  the same codes with uint8 zero points z = round(-b/s): c = b + s z, a few ulps
  requantized        onnxruntime's MatMulNBits quantizer (symmetric, block 32) over the dequantized float weights
                     (the embedding, untied here, stays float32 on that path)
Each at accuracy_level 4 (int8 activations on the CPU, what the export writes) and the carried one at level 0
too (float activations: a copy of the graph pointing at the same weights).
Error: logits of each beside MLX running the same quantized folder (MLXBackend, float32) on a chat prompt and
then -n teacher-forced decode steps (MLX's greedy tokens), as max |diff| / max |logit| and greedy agreement;
with --float, top-1 agreement with MLX on the float folder too. Speed: every variant loaded at once in our ONNX
backend; per round each times a prefill of the prompt and -n decode steps, variants taking turns (order
reversed every other round); median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import module_command, module_env, prog, round_order

PROMPT = ("Write a Python function that merges two sorted lists into one sorted list without using sort(), "
          "then explain its time complexity and show two example calls.")


def export_variant(model: str, out: Path, variant: str) -> None:
    """Run in a subprocess of its own (see main)."""
    import export.onnx_export as onnx_export
    import export.stored_quant as stored_quant
    from qwen_mlx.checkpoint import prepare_model

    carry = stored_quant.carry_stored
    if variant == "requantized":  # what the export did before: nothing carried, the quantizer runs
        stored_quant.carry_stored = lambda proto, ckpt, accuracy_level=4: stored_quant.Carried()
    elif variant == "uint8-zero-points":
        stored_quant.carry_stored = lambda proto, ckpt, accuracy_level=4: carry(proto, ckpt, accuracy_level, "always")
    onnx_export.export_onnx(prepare_model(model), out, quantize="int4", validate=False)


def level0_copy(src: Path, dst: Path) -> None:
    """The same folder with every MatMulNBits at accuracy_level 0; the weights file is hard-linked, not copied."""
    import onnx

    if dst.exists():
        return
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.onnx", "*.onnx_data"))
    proto = onnx.load(str(src / "onnx" / "model_q4.onnx"), load_external_data=False)
    for node in proto.graph.node:
        for a in node.attribute:
            if a.name == "accuracy_level":
                a.i = 0
    onnx.save(proto, str(dst / "onnx" / "model_q4.onnx"))
    for data in (src / "onnx").glob("*.onnx_data"):
        os.link(data, dst / "onnx" / data.name)  # a hard link: onnxruntime refuses data outside the folder


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in (folder / "onnx").iterdir()) / 1e6


def prompt_ids(model: str) -> list[int]:
    from qwen_mlx.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(Path(model))
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))


def reference(model: str, prompt: list[int], n: int) -> tuple[list[np.ndarray], list[int]]:
    """MLX's logits after the prompt and each of its n greedy tokens."""
    from qwen_mlx.checkpoint import prepare_model
    from qwen_mlx.backends.mlx import MLXBackend

    mlx = MLXBackend(prepare_model(model), "float32")
    logits, tokens = [mlx.forward(prompt)], []
    for _ in range(n):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(mlx.forward(tokens[-1:]))
    return logits, tokens


def teacher_forced(backend, prompt: list[int], tokens: list[int]) -> list[np.ndarray]:
    backend.trim(0)
    return [backend.forward(prompt)] + [backend.forward([t]) for t in tokens]


def main() -> None:
    ap = argparse.ArgumentParser(prog=prog(__spec__.name), description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a folder written by mlx_lm.convert -q")
    ap.add_argument("--float", help="the float folder it was quantized from (top-1 agreement with it)")
    ap.add_argument("--work", default="/tmp/mlx_onnx_int4")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--export-variant", nargs=2, help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.export_variant:
        export_variant(opts.model, Path(opts.export_variant[1]), opts.export_variant[0])
        return
    os.environ["QWEN_MLX_QUIET"] = "1"
    work = Path(opts.work)
    work.mkdir(parents=True, exist_ok=True)
    folders = {}
    for variant in ("carried", "uint8-zero-points", "requantized"):
        folders[variant] = work / variant
        if not folders[variant].exists():
            start = time.perf_counter()
            subprocess.run(module_command(__spec__.name, "--model", opts.model, "--export-variant", variant,
                                          str(folders[variant])), check=True, env=module_env())
            print(f"exported {variant} in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    folders["carried, level 0"] = work / "carried-level0"
    level0_copy(folders["carried"], folders["carried, level 0"])

    from export.backends.onnx import OnnxBackend

    prompt = prompt_ids(opts.model)
    ref, tokens = reference(opts.model, prompt, opts.n)
    float_top1 = None
    if opts.float:
        float_top1 = teacher_forced_float(opts.float, prompt, tokens)
    rows = {}
    backends = {}
    for label, folder in folders.items():
        b = OnnxBackend(folder, "float32", "int4")
        got = teacher_forced(b, prompt, tokens)
        diff = max(float(np.abs(r - g).max()) for r, g in zip(ref, got))
        scale = max(float(np.abs(r).max()) for r in ref)
        rows[label] = {"MB": folder_mb(folders[label.split(",")[0]]), "rel": diff / scale, "abs": diff,
                       "greedy": float(np.mean([np.argmax(r) == np.argmax(g) for r, g in zip(ref, got)]))}
        if float_top1 is not None:
            rows[label]["float_top1"] = float(np.mean([np.argmax(f) == np.argmax(g) for f, g in zip(float_top1, got)]))
        backends[label] = b
    times: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in backends}
    order = list(backends)
    for r in range(opts.rounds):
        for label in round_order(order, r):
            b = backends[label]
            b.trim(0)
            start = time.perf_counter()
            logits = b.forward(prompt)
            mid = time.perf_counter()
            for _ in range(opts.n):
                logits = b.forward([int(np.argmax(logits))])
            end = time.perf_counter()
            times[label]["prefill"].append(len(prompt) / (mid - start))
            times[label]["decode"].append(opts.n / (end - mid))
    print(f"prompt {len(prompt)} tokens, {opts.n} decode steps, {opts.rounds} interleaved rounds (median)")
    print("| variant | model MB | prefill tok/s | decode tok/s | max abs logit diff vs MLX (relative) | greedy agreement"
          + (" | top-1 = float32 MLX" if float_top1 is not None else "") + " |")
    print("| --- | --- | --- | --- | --- | ---" + (" | ---" if float_top1 is not None else "") + " |")
    for label, row in rows.items():
        t = times[label]
        print(f"| {label} | {row['MB']:.0f} | {statistics.median(t['prefill']):.0f} | "
              f"{statistics.median(t['decode']):.1f} | {row['abs']:.3g} ({row['rel']:.2g}) | {row['greedy']:.0%}"
              + (f" | {row['float_top1']:.0%}" if float_top1 is not None else "") + " |")
    print(json.dumps({"rows": rows, "times": times}), file=sys.stderr)


def teacher_forced_float(model: str, prompt: list[int], tokens: list[int]) -> list[np.ndarray]:
    """MLX on the float folder, fed the same tokens."""
    from qwen_mlx.checkpoint import prepare_model
    from qwen_mlx.backends.mlx import MLXBackend

    return teacher_forced(MLXBackend(prepare_model(model), "float32"), prompt, tokens)


if __name__ == "__main__":
    main()
