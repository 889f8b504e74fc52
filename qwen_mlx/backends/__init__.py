"""Choosing and loading a backend by name: the CLI, the server and the benchmarks go through here.

Backends register themselves, so imports only run downhill: `mlx` is registered below, and the `export`
package registers `torch` and `onnx` when it is imported (the app layer, cli.py, does that). qwen_mlx
itself never imports `export`, and nothing here imports torch or onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..checkpoint import prepare_model, read_generation_config
from ..errors import QwenError
from .base import Backend
from ..tokenizer import Tokenizer

# name -> factory(model, dtype, quantize) -> (backend, the folder holding its tokenizer and configs)
Factory = Callable[[str | None, str | None, str | None], tuple[Backend, Path]]
_REGISTRY: dict[str, Factory] = {}
# Backends this project ships outside qwen_mlx, and what provides them, for a useful error.
_PROVIDED_BY = {"torch": "export", "onnx": "export"}


def register(name: str, factory: Factory) -> None:
    _REGISTRY[name] = factory


def names() -> list[str]:
    return sorted(set(_REGISTRY) | set(_PROVIDED_BY))


@dataclass
class LoadedModel:
    backend: Backend
    tokenizer: Tokenizer
    generation_config: dict
    folder: Path


def load(backend: str, model: str | None, dtype: str | None = None, quantize: str | None = None,
         kv_bits: int | None = None, kv_group_size: int = 64, onnx_dtype: str | None = None,
         keep_quantized: bool = False) -> LoadedModel:
    """`mlx` and `torch` read a safetensors checkpoint; `onnx` reads a folder written by `export-onnx`.
    `kv_bits` (mlx only) stores the KV cache quantized, `kv_group_size` features per scale and bias.
    `onnx_dtype` (onnx only) picks the folder's file by transformers.js' dtype name (fp32, q8, q4, ...).
    `keep_quantized` (mlx only): weights stored quantized keep MLX's quantized kernels on a CPU too."""
    if kv_bits is not None and backend != "mlx":
        raise QwenError(f"--kv-bits works with the mlx backend only (its cache stores quantized keys and values "
                        f"and attends with quantized matmuls); the {backend} backend keeps a float cache")
    if onnx_dtype is not None and backend != "onnx":
        raise QwenError(f"--onnx-dtype picks a file of an ONNX export folder: it needs --backend onnx, not {backend}")
    if keep_quantized and backend != "mlx":
        raise QwenError(f"--keep-quantized is an mlx backend option (its CPU quantized kernels), not {backend}'s")
    factory = _REGISTRY.get(backend)
    if factory is None:
        if backend in _PROVIDED_BY:
            raise QwenError(f"the {backend} backend lives in the `{_PROVIDED_BY[backend]}` package: "
                            f"`import {_PROVIDED_BY[backend]}` registers it (cli.py does)")
        raise QwenError(f"unknown backend {backend!r} (choose from {', '.join(names())})")
    impl, folder = factory(model, dtype, quantize, *((kv_bits, kv_group_size) if kv_bits is not None else ()),
                           **({"onnx_dtype": onnx_dtype} if onnx_dtype is not None else {}),
                           **({"keep_quantized": True} if keep_quantized else {}))
    tokenizer = Tokenizer.from_folder(folder)
    return LoadedModel(impl, tokenizer, read_generation_config(folder), folder)


def _mlx(model: str | None, dtype: str | None, quantize: str | None, kv_bits: int | None = None,
         kv_group_size: int = 64, keep_quantized: bool = False) -> tuple[Backend, Path]:
    if quantize not in (None, "4", "8"):
        raise QwenError(f"--quantize for the mlx backend must be 4 or 8, got {quantize}")
    # A GGUF keeps its exact blocks unless a --dtype or --quantize asks for other weights.
    ckpt = prepare_model(model, gguf_blocks=dtype is None and quantize is None)
    try:
        from .mlx import MLXBackend
    except ImportError as e:
        raise QwenError(f"the mlx backend needs MLX ({e}); install it with `pip install -e .`") from None
    from .distributed import distributed_backend, world
    group = world()  # several ranks (mlx.launch): each holds its part of the model; rank 0 runs the command
    if group is not None:
        return distributed_backend(ckpt, dtype, int(quantize) if quantize else None, kv_bits, kv_group_size,
                                   group, keep_quantized), ckpt.folder
    # By name (the CLI, the server): a CPU dequantizes stored quantized weights unless --keep-quantized.
    return MLXBackend(ckpt, dtype, int(quantize) if quantize else None, kv_bits, kv_group_size,
                      keep_quantized=keep_quantized), ckpt.folder


register("mlx", _mlx)
