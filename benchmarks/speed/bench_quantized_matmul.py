"""One quantized matmul on MLX's CPU: the quantized kernel beside dequantize + BLAS (qwen_mlx/models/layers.py).

    python -m benchmarks.speed.bench_quantized_matmul [--bits 4] [--rounds 5]

Rows are the input rows (1 = a decode step, 64-512 = a prefill chunk); shapes are Qwen2.5-0.5B's MLP and a
scaled-down MoE's stacked experts (60 experts, 704 x 1024; rows are (token, expert) pairs, sorted). Each round
times every form once, in turn; the median is printed. "float" is the unquantized matrix, for scale.
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.common import load_openblas, prog

load_openblas()  # first: OpenBLAS into MLX's BLAS symbols before mlx, as the backend does
import mlx.core as mx  # noqa: E402
from qwen_mlx.models.layers import DEQUANTIZE_FROM_ROWS, DEQUANTIZE_FROM_ROWS_PER_EXPERT, dequantize  # noqa: E402

GROUP = 64


def forms(rows: int, out_dims: int, in_dims: int, bits: int, experts: int) -> dict:
    shape = (experts, out_dims, in_dims) if experts else (out_dims, in_dims)
    w = mx.random.normal(shape) * 0.02
    q, s, b = mx.quantize(w, GROUP, bits)
    if experts:
        x = mx.random.normal((rows, 1, in_dims))
        idx = mx.sort(mx.random.randint(0, experts, (rows,)))
        mx.eval(w, q, s, b, x, idx)
        return {
            "gather_qmm": lambda: mx.gather_qmm(x, q, s, b, rhs_indices=idx, transpose=True, group_size=GROUP,
                                                bits=bits, sorted_indices=True),
            "dequantize + gather_mm": lambda: mx.gather_mm(
                x, dequantize(q, s, b, GROUP, bits).swapaxes(-1, -2), rhs_indices=idx, sorted_indices=True),
            "float": lambda: mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=idx, sorted_indices=True),
        }
    x = mx.random.normal((rows, in_dims))
    mx.eval(w, q, s, b, x)
    return {
        "quantized_matmul": lambda: mx.quantized_matmul(x, q, s, b, transpose=True, group_size=GROUP, bits=bits),
        "dequantize + BLAS": lambda: x @ dequantize(q, s, b, GROUP, bits).T,
        "float": lambda: x @ w.T,
    }


def main() -> None:
    p = argparse.ArgumentParser(prog=prog(__spec__.name), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    cases = [(1, 4864, 896, 0), (4, 4864, 896, 0), (8, 4864, 896, 0), (16, 4864, 896, 0), (64, 4864, 896, 0),
             (512, 4864, 896, 0), (512, 896, 4864, 0), (64, 704, 1024, 60), (128, 704, 1024, 60),
             (256, 704, 1024, 60), (512, 704, 1024, 60), (2048, 704, 1024, 60)]
    print(f"{a.bits}-bit, group {GROUP}, float32 scales; median of {a.rounds} interleaved rounds, ms")
    print("| rows | matrix | quantized kernel | dequantize + BLAS | float | kernel / dequantize |")
    print("| --- | --- | --- | --- | --- | --- |")
    for rows, out_dims, in_dims, experts in cases:
        fs = forms(rows, out_dims, in_dims, a.bits, experts)
        times: dict[str, list[float]] = {k: [] for k in fs}
        for f in fs.values():
            mx.eval(f())  # warm-up
        for _ in range(a.rounds):
            for name, f in fs.items():
                t = time.perf_counter()
                mx.eval(f())
                times[name].append((time.perf_counter() - t) * 1e3)
        kernel, deq, flt = (statistics.median(v) for v in times.values())
        matrix = f"{experts} x {out_dims} x {in_dims}" if experts else f"{out_dims} x {in_dims}"
        print(f"| {rows} | {matrix} | {kernel:.1f} | {deq:.1f} | {flt:.1f} | {kernel / deq:.2f}x |", flush=True)
    print(f"qwen_mlx's CPU layers dequantize from {DEQUANTIZE_FROM_ROWS} rows, stacked experts from "
          f"{DEQUANTIZE_FROM_ROWS_PER_EXPERT} rows per expert")


if __name__ == "__main__":
    main()
