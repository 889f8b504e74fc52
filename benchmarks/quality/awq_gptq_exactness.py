"""How exactly AWQ/GPTQ weights survive: ours (qwen_mlx/formats/awq_gptq.py), mlx-lm's own AWQ loader, and the int4
ONNX export (the stored codes as MatMulNBits, or onnxruntime's quantizer run over the dequantized weights).

    python -m benchmarks.quality.awq_gptq_exactness [--onnx]

On the tiny AWQ test checkpoint (benchmarks/checkpoints/awq_gptq.py, as tests/test_awq_gptq.py: gqa4-tied, 4-bit,
group size 32). Prints, per
reader, how many quantized weights differ from scale * (q - zero) and by how much (relative to the largest
|w|); with --onnx, the export's own validation line for both int4 paths (a minute or two each here).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import prog


def _errors(model, exact: dict[str, np.ndarray], as_float32: bool) -> tuple[float, float]:
    import mlx.core as mx

    differ, worst, total = 0, 0.0, 0
    for path, m in model.named_modules():
        if hasattr(m, "scales"):
            s, b = (m.scales.astype(mx.float32), m.biases.astype(mx.float32)) if as_float32 else (m.scales, m.biases)
            w = np.array(mx.dequantize(m.weight, s, b, m.group_size, m.bits).astype(mx.float32))
            e = exact[f"{path}.weight"]
            differ += int((w != e).sum())
            total += e.size
            worst = max(worst, float(np.abs(w - e).max() / np.abs(e).max()))
    return differ / total, worst


def main() -> None:
    ap = argparse.ArgumentParser(prog=prog(__spec__.name), description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", action="store_true", help="also export int4 ONNX both ways")
    opts = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="awq-exactness-"))
    os.environ["QWEN_MLX_CACHE"] = str(root / "cache")
    from mlx_lm import load

    from qwen_mlx.checkpoint import prepare_model
    from qwen_mlx.models.load import load_model
    from benchmarks.checkpoints.awq_gptq import CASES, MODEL, make_checkpoint
    from benchmarks.checkpoints.tiny_models import write_tiny_model

    write_tiny_model(root / "hf", MODEL)
    folder = root / "awq"
    exact = make_checkpoint(root / "hf", folder, *CASES["awq4-g32"])
    ours = load_model(prepare_model(str(folder)), "float32")
    print("ours (MLX, float32 scales and biases): %.1f%% of weights differ, worst %.2g of max|w|"
          % (100 * _errors(ours, exact, False)[0], _errors(ours, exact, False)[1]))
    config = json.loads((folder / "config.json").read_text())
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]  # mlx-lm reads it at the top level
    (folder / "config.json").write_text(json.dumps(config))
    theirs, _ = load(str(folder))
    for label, f32 in [("dequantized in float32", True), ("in its float16", False)]:
        frac, worst = _errors(theirs, exact, f32)
        print(f"mlx-lm's AWQ loader ({label}): {100 * frac:.1f}% of weights differ, worst {worst:.2g} of max|w|")
    if opts.onnx:
        import export.onnx_export as onnx_export
        from qwen_mlx.errors import QwenError

        ckpt = prepare_model(str(folder))
        for label, kept in [("stored codes (MatMulNBits)", True), ("re-quantized by onnxruntime", False)]:
            if not kept:  # what the export did before export/stored_quant.py
                import export.stored_quant as stored_quant
                stored_quant.carry_stored = lambda proto, ckpt, accuracy_level=4: stored_quant.Carried()
            print(f"ONNX int4, {label}:")
            try:
                onnx_export.export_onnx(ckpt, root / f"onnx-{kept}", quantize="int4")
            except QwenError as e:
                print(f"  error: {e}")


if __name__ == "__main__":
    main()
