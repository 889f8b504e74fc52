"""Give MLX's Linux CPU build a real BLAS.

The `mlx[cpu]` wheel links the reference (netlib) BLAS: a float32 matmul runs ~20x slower than with an
optimised one, and decoding about 2x slower. Loading OpenBLAS into the global symbol scope before MLX is
imported makes MLX's `cblas_sgemm` calls resolve to it, without a re-exec or LD_PRELOAD. Nothing changes
on macOS (MLX uses Accelerate there) or when no OpenBLAS is installed (`apt install libopenblas0-pthread`).
Set QWEN_MLX_NO_OPENBLAS=1 to keep MLX's own BLAS, or QWEN_MLX_OPENBLAS=/path/libopenblas.so to pick one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

loaded: str | None = None  # the library in use, for `cli.py info` and the benchmarks


def use_fast_blas() -> str | None:
    global loaded
    if loaded or sys.platform != "linux" or os.environ.get("QWEN_MLX_NO_OPENBLAS"):
        return loaded
    if "mlx.core" in sys.modules:
        return None  # too late: MLX already bound its BLAS symbols
    chosen = os.environ.get("QWEN_MLX_OPENBLAS")
    found = ctypes.util.find_library("openblas")
    for path in [p for p in (chosen, found) if p] + list(CANDIDATES):
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded = path
        return path
    return None
