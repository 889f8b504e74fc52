"""What the benchmark scripts share: the repository root, OpenBLAS loaded before mlx, the real checkpoint's
folder, where the peer runtimes live, and the order of interleaved rounds.

Standard library only at import time: a peer environment (benchmarks.peers.edge_runtimes' workers) and
mlx-lm's own-BLAS rows (benchmarks.speed.bench_mlx) import this module without importing qwen_mlx or mlx.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence, TypeVar

REPO = Path(__file__).resolve().parents[1]  # the repository root: run scripts from here, as `python -m benchmarks...`
DEFAULT_PEERS = "/work/venvs"

T = TypeVar("T")


# ---- OpenBLAS and the real checkpoint -----------------------------------------------------------------

def load_openblas() -> str:
    """Load the OpenBLAS qwen-mlx uses into MLX's BLAS symbols (importing qwen_mlx does it); call it before
    anything imports mlx. Returns the library loaded, or "bundled" when MLX keeps its own."""
    from qwen_mlx import _blas

    return _blas.loaded or "bundled"


def real_checkpoint(dtype: str = "float32", progress: bool = True) -> Path:
    """The real checkpoint's HF folder (Qwen2.5-Coder-0.5B-Instruct, built once into the cache), in-process."""
    from qwen_mlx.formats.real_checkpoint import real_checkpoint as build

    return build(dtype, progress=progress)


def real_checkpoint_folder(dtype: str = "float32") -> str:
    """The same folder via `python -m qwen_mlx.formats.real_checkpoint` in a subprocess: this process imports
    neither qwen_mlx nor mlx."""
    out = subprocess.run([sys.executable, "-m", "qwen_mlx.formats.real_checkpoint", "--dtype", dtype, "--quiet"],
                         cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


# ---- the peer runtimes (made by benchmarks/peers/setup_peers.sh) -----------------------------------------

def peers_root() -> Path:
    """$QWEN_MLX_PEERS, default /work/venvs: the genai and optimum venvs and the node project live under it."""
    return Path(os.environ.get("QWEN_MLX_PEERS", DEFAULT_PEERS))


def peer_python(name: str) -> Path:
    """The interpreter of the peer venv `name` (genai, optimum)."""
    return peers_root() / name / "bin" / "python"


def node_project() -> Path:
    """The node project with @huggingface/transformers (transformers.js, and examples/browser's web bundle)."""
    return peers_root() / "node"


# ---- running scripts ----------------------------------------------------------------------------------

def prog(module: str) -> str:
    """argparse's `prog` for a script run as `python -m module` (pass `__spec__.name`): its usage line shows
    the command that runs it rather than the file's name."""
    return f"python -m {module}"


def module_command(module: str, *args: str, python: str | Path | None = None) -> list[str]:
    """`python -m module args...`, with this interpreter unless `python` is given (a peer venv's)."""
    return [str(python or sys.executable), "-m", module, *args]


def module_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's environment) with the repository root first on PYTHONPATH, so that a
    `module_command` subprocess imports benchmarks (and qwen_mlx, export) from this tree wherever it starts."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


# ---- interleaved rounds -------------------------------------------------------------------------------

def round_order(names: Sequence[T], round_index: int) -> list[T]:
    """The runners of one interleaved round: in order on even rounds, reversed on odd ones, so a busy spell of
    a shared machine falls on every runner alike."""
    return list(names) if round_index % 2 == 0 else list(names)[::-1]
