"""Choosing and loading a backend by name; the CLI and the benchmarks go through here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoint import prepare_model, read_generation_config, resolve_model
from .errors import QwenError
from .generate import Backend
from .tokenizer import Tokenizer

BACKENDS = ("mlx", "torch", "onnx")


@dataclass
class LoadedModel:
    backend: Backend
    tokenizer: Tokenizer
    generation_config: dict
    folder: Path


def load(backend: str, model: str | None, dtype: str | None = None, quantize: str | None = None) -> LoadedModel:
    """`mlx` and `torch` read a safetensors checkpoint; `onnx` reads a folder written by `export-onnx`."""
    if backend not in BACKENDS:
        raise QwenError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if backend == "onnx":
        folder = resolve_model(model)
        from export.onnx_backend import OnnxBackend
        impl: Backend = OnnxBackend(folder, dtype, quantize)
    else:
        ckpt = prepare_model(model)
        folder = ckpt.folder
        if backend == "mlx":
            if quantize not in (None, "4", "8"):
                raise QwenError(f"--quantize for the mlx backend must be 4 or 8, got {quantize}")
            from .mlx_backend import MLXBackend
            impl = MLXBackend(ckpt, dtype, int(quantize) if quantize else None)
        else:
            if quantize:
                raise QwenError("the torch backend runs unquantized weights; drop --quantize")
            from export.torch_backend import TorchBackend
            impl = TorchBackend(ckpt, dtype or "float32")
    tokenizer = Tokenizer.from_folder(folder)
    return LoadedModel(impl, tokenizer, read_generation_config(folder), folder)
