"""Where qwen-mlx keeps what it builds once and reuses (converted GGUFs, the offline real checkpoint)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$QWEN_MLX_CACHE`, else `~/.cache/qwen-mlx`; created on first use."""
    root = Path(os.environ.get("QWEN_MLX_CACHE") or Path.home() / ".cache" / "qwen-mlx")
    root.mkdir(parents=True, exist_ok=True)
    return root
