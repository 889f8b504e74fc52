"""Quality of every reduced precision and float32 parity of every backend, as markdown tables.

    python -m benchmarks.quality.quality [--model FOLDER] [--onnx-dir DIR] [--text-tokens 1024] [--skip-parity]

--model     an HF float32 checkpoint folder; default: the real Qwen2.5-Coder-0.5B-Instruct, built once into
            ~/.cache/qwen-mlx (python -m qwen_mlx.formats.real_checkpoint)
--onnx-dir  where the exports live (sub-folders fp32/, fp16/, q4/); the missing ones are exported there
            (1-3 min each for the real model on 2 cores, ~4.5 GB of disk for the three). Default: a temporary
            folder, removed at the end. The whole run takes ~10 min (MLX bfloat16 alone ~4.5).

Quality: the first --text-tokens tokens of the stdlib colorsys.py, teacher-forced in one chunked prefill;
perplexity and top-1 agreement / max |logit diff| against MLX float32. The text comes with the running
Python (see benchmarks/quality/parity.py: quality_text), so the header prints its digest and the Python version.
Parity: the logits of a ~30-token chat prompt and of 8 cached decode steps, pairwise between HF
transformers, MLX, the PyTorch twin and ONNX (all float32), and 32-token greedy continuations of three
prompts. The measuring code is benchmarks/quality/parity.py, which tests/test_real_parity.py runs with bounds.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import prog, real_checkpoint
from benchmarks.quality import parity  # imports qwen_mlx first, which loads OpenBLAS

# ONNX variant -> (sub-folder of --onnx-dir, dtype, quantize)
EXPORTS = {"onnx float32": ("fp32", "float32", None), "onnx float16": ("fp16", "float16", None),
           "onnx int4": ("q4", "float32", "int4")}


def ensure_exports(model_dir: Path, root: Path) -> tuple[dict[str, Path], dict[str, float]]:
    """The export folders, exporting those missing; returns them and the seconds each export took."""
    dirs, seconds = {}, {}
    for name, (sub, dtype, quantize) in EXPORTS.items():
        out = root / sub
        if not (out / "config.json").is_file():
            print(f"exporting {name} into {out} ...", file=sys.stderr, flush=True)
            _, seconds[name] = parity.export_variant(model_dir, out, dtype, quantize)
        dirs[name] = out
    return dirs, seconds


def quality_table(model_dir: Path, onnx_dirs: dict[str, Path], n_tokens: int) -> str:
    from qwen_mlx.tokenizer import Tokenizer

    ids = parity.text_ids(Tokenizer.from_folder(model_dir), n_tokens)
    ref = parity.measure_variant(parity.REFERENCE, model_dir, onnx_dirs, ids)
    rows = [ref]
    for name in parity.VARIANTS:
        if name != parity.REFERENCE:
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            rows.append(parity.measure_variant(name, model_dir, onnx_dirs, ids, ref))
    lines = [f"Teacher-forced over the first {n_tokens} tokens of colorsys.py (Python {platform.python_version()}, "
             f"token digest {parity.text_digest(ids)}), {parity.CHUNK} positions per forward; "
             f"agreement and diff against {parity.REFERENCE}.", "",
             "| precision | perplexity | vs float32 | top-1 agreement | max abs logit diff | seconds |",
             "| --- | --- | --- | --- | --- | --- |"]
    for q in rows:
        lines.append(f"| {q.name} | {q.perplexity:.4f} | x{q.perplexity_ratio(ref):.4f} | "
                     f"{q.top1_agreement:.2%} | {q.max_abs_diff:.3g} | {q.seconds:.0f} |")
    gaps = [f"{q.name} {q.kernel_gap:.2g}" for q in rows if q.kernel_gap is not None]
    if gaps:
        lines += ["", f"MLX quantized rows run on their dequantized weights (float32 BLAS; the quantized CPU kernels "
                  f"take ~2 positions/s); their kernels against those weights over {parity.KERNEL_CHECK_TOKENS} "
                  f"positions, max |logit diff|: " + ", ".join(gaps) + "."]
    return "\n".join(lines)


def parity_table(model_dir: Path, onnx_fp32: Path) -> str:
    from qwen_mlx.backends import load
    from qwen_mlx.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(model_dir)
    print("measuring float32 parity: hf ...", file=sys.stderr, flush=True)
    hf, steps = parity.run_reference(model_dir, tokenizer)
    runs = [hf]
    for name in ("mlx", "torch", "onnx"):
        print(f"measuring float32 parity: {name} ...", file=sys.stderr, flush=True)
        loaded = load(name, str(onnx_fp32 if name == "onnx" else model_dir), "float32")
        runs.append(parity.run_backend(loaded, name, steps))
        del loaded
        parity.free_memory()
    n_prompt = len(parity.logit_prompt(tokenizer))
    lines = [f"float32 logits after a {n_prompt}-token chat prompt and {parity.N_STEPS} cached decode steps:", "",
             "| pair | max abs logit diff |", "| --- | --- |"]
    lines += [f"| {a} vs {b} | {d:.3g} |" for (a, b), d in parity.pairwise_max_diff(runs).items()]
    lines += ["", f"{parity.N_GREEDY}-token greedy continuations ({', '.join(r.name for r in runs)}):", "",
              "| prompt | identical on all | continuation (hf) |", "| --- | --- | --- |"]
    for prompt, same in parity.greedy_agreement(runs).items():
        text = tokenizer.decode(hf.greedy[prompt]).replace("\n", "\\n").replace("|", "\\|")
        lines.append(f"| {prompt} | {'yes' if same else 'NO'} | `{text[:60]}` |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog(__spec__.name), description=__doc__.split("\n")[0])
    p.add_argument("--model", help="HF float32 checkpoint folder (default: the real checkpoint)")
    p.add_argument("--onnx-dir", type=Path, help="folder of the exports (made when missing)")
    p.add_argument("--text-tokens", type=int, default=parity.TEXT_TOKENS)
    p.add_argument("--skip-parity", action="store_true", help="only the quality table")
    args = p.parse_args(argv)
    model_dir = Path(args.model) if args.model else real_checkpoint("float32")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qwen-mlx-quality-") as tmp:
        onnx_root = args.onnx_dir or Path(tmp)
        onnx_dirs, export_seconds = ensure_exports(model_dir, onnx_root)
        out = [f"# Quality and parity: {model_dir}", ""]
        if export_seconds:
            out += ["ONNX export times: " + ", ".join(f"{n} {s:.0f}s" for n, s in export_seconds.items()), ""]
        out += [quality_table(model_dir, onnx_dirs, args.text_tokens), ""]
        if not args.skip_parity:
            out += [parity_table(model_dir, onnx_dirs["onnx float32"]), ""]
    out.append(f"total {time.perf_counter() - start:.0f}s, peak RSS {parity.process_peak_rss_gb():.1f} GB, "
               f"{platform.machine()}, Python {platform.python_version()}")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
