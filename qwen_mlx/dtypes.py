"""The floating-point dtypes qwen-mlx runs and writes, by name: the one table every backend and file
format reads (pure Python; each framework maps a name with `getattr(mx, name)` / `getattr(torch, name)`)."""

from __future__ import annotations

from .errors import QwenError

DTYPES = ("float32", "bfloat16", "float16")
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SAFETENSORS = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}  # the header's dtype codes


def check_dtype(dtype: str, allowed: tuple[str, ...] = DTYPES, what: str = "") -> str:
    """`dtype` if it is one of `allowed`, else a clear error naming them."""
    if dtype not in allowed:
        where = f" for {what}" if what else ""
        raise QwenError(f"unknown dtype {dtype!r}{where} (choose from {', '.join(allowed)})")
    return dtype
