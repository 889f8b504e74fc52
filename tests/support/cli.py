"""`cli.py` run as a user runs it: a real subprocess from the repository root, quiet and offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, QWEN_MLX_QUIET="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], input=stdin, capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


def run_with_cache(*args: str, cache: Path) -> subprocess.CompletedProcess:
    """`cli.py` with its conversion cache at `cache` (QWEN_MLX_CACHE), from the caller's directory."""
    env = dict(os.environ, QWEN_MLX_QUIET="1", QWEN_MLX_CACHE=str(cache))
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300)
