"""Where qwen-mlx keeps what it builds once and reuses (converted GGUFs, the offline real checkpoint)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import QwenError


def cache_dir() -> Path:
    """`$QWEN_MLX_CACHE`, else `~/.cache/qwen-mlx`; created on first use."""
    root = Path(os.environ.get("QWEN_MLX_CACHE") or Path.home() / ".cache" / "qwen-mlx")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QwenError(f"cannot create the cache folder {root} ({e.strerror}): set QWEN_MLX_CACHE to a writable "
                        "folder") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise QwenError(f"the cache folder {root} is not writable: set QWEN_MLX_CACHE to a writable folder")
    return root
