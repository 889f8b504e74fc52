"""Quality and size of every file of transformers.js' dtype set in one export folder, as a markdown table.

    python -m benchmarks.quality.onnx_dtypes [--model FOLDER] --onnx-dir DIR [--dtypes all] [--text-tokens 1024]

--model     an HF float32 checkpoint folder; default: the real Qwen2.5-Coder-0.5B-Instruct (python -m
            qwen_mlx.formats.real_checkpoint)
--onnx-dir  the export folder; written first by `cli.py export-onnx --dtypes LIST` (its own validation
            included) when it has no config.json yet
--dtypes    the files to export when --onnx-dir is empty (default: all seven)

Each file is teacher-forced over the first --text-tokens tokens of the stdlib colorsys.py
(benchmarks/quality/parity.py: quality_text, the text of benchmarks/quality/quality.py) in chunks through its
own KV cache; perplexity, its ratio to the fp32 file's (model.onnx, the float32 reference), top-1 agreement
with fp32 and max |logit diff|.
Size: the .onnx file plus its external data. One file is loaded at a time.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, prog, real_checkpoint
from benchmarks.quality import parity


def file_bytes(onnx_dir: Path, name: str) -> int:
    """The model file and its external data (`<name>_data`)."""
    return sum(p.stat().st_size for p in onnx_dir.glob(f"{name}*") if p.is_file())


def measure(folder: Path, variant: str, ids: list[int], reference: parity.Quality | None) -> parity.Quality:
    from export.backends.onnx import OnnxBackend
    from qwen_mlx.backends import LoadedModel

    t = time.perf_counter()
    loaded = LoadedModel(OnnxBackend(folder, variant=variant), None, {}, folder)
    try:
        q = parity.teacher_forced(variant, parity.onnx_position_logits(loaded, ids), ids, reference,
                                  keep=reference is None)
    finally:
        del loaded
        parity.free_memory()
    q.seconds = time.perf_counter() - t
    return q


def main(argv: list[str] | None = None) -> int:
    from export.onnx_format import VARIANT_FILES
    from qwen_mlx.tokenizer import Tokenizer

    p = argparse.ArgumentParser(prog=prog(__spec__.name), description=__doc__.split("\n")[0])
    p.add_argument("--model", help="HF float32 checkpoint folder (default: the real checkpoint)")
    p.add_argument("--onnx-dir", type=Path, required=True, help="the export folder (exported when missing)")
    p.add_argument("--dtypes", default="all", help="what to export when --onnx-dir is missing")
    p.add_argument("--text-tokens", type=int, default=parity.TEXT_TOKENS)
    args = p.parse_args(argv)
    model_dir = Path(args.model) if args.model else real_checkpoint("float32")
    lines = []
    if not (args.onnx_dir / "config.json").is_file():
        command = [sys.executable, str(REPO / "cli.py"), "export-onnx", "--model", str(model_dir), "--out",
                   str(args.onnx_dir), "--dtypes", args.dtypes]
        print("exporting:", " ".join(command), file=sys.stderr, flush=True)
        t = time.perf_counter()
        subprocess.run(command, check=True)
        lines += [f"export of --dtypes {args.dtypes} (validation included): {time.perf_counter() - t:.0f}s", ""]
    onnx_dir = args.onnx_dir / "onnx"
    present = [v for v, name in VARIANT_FILES.items() if (onnx_dir / name).is_file()]
    if "fp32" not in present:
        sys.exit("error: the folder has no model.onnx (fp32), the reference")
    ids = parity.text_ids(Tokenizer.from_folder(model_dir), args.text_tokens)
    print("measuring fp32 ...", file=sys.stderr, flush=True)
    ref = measure(args.onnx_dir, "fp32", ids, None)
    rows = [ref]
    for variant in present:
        if variant != "fp32":
            print(f"measuring {variant} ...", file=sys.stderr, flush=True)
            rows.append(measure(args.onnx_dir, variant, ids, ref))
    lines += [f"Teacher-forced over the first {args.text_tokens} tokens of colorsys.py (Python "
              f"{platform.python_version()}, token digest {parity.text_digest(ids)}), {parity.CHUNK} positions per "
              "forward; agreement and diff against the fp32 file.", "",
              "| dtype | file | size MB | perplexity | vs fp32 | top-1 agreement | max abs logit diff | seconds |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for q in rows:
        name = VARIANT_FILES[q.name]
        lines.append(f"| {q.name} | {name} | {file_bytes(onnx_dir, name) / 1e6:.0f} | {q.perplexity:.4f} | "
                     f"x{q.perplexity_ratio(ref):.4f} | {q.top1_agreement:.2%} | {q.max_abs_diff:.3g} | "
                     f"{q.seconds:.0f} |")
    lines += ["", f"peak RSS {parity.process_peak_rss_gb():.1f} GB, {platform.machine()}"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
