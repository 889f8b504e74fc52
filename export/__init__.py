"""PyTorch twin of the MLX model, its torch backend, the ONNX export and the onnxruntime backend.

Kept apart from `qwen_mlx` so the MLX runtime never imports torch or onnxruntime. Importing this package
registers the `torch` and `onnx` backends with qwen_mlx.backends; the heavy imports wait until one is loaded.
"""

from __future__ import annotations

from pathlib import Path

from qwen_mlx.backends import register
from qwen_mlx.checkpoint import prepare_model, resolve_model
from qwen_mlx.errors import QwenError

EXTRA_HINT = "install the export extra: pip install -e '.[export]'"


def require(what: str) -> None:
    """A clear error naming the extra when torch / onnx / onnxruntime is missing (a lean MLX install)."""
    import importlib.util

    missing = [m for m in ("torch", "onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise QwenError(f"{what} needs {', '.join(missing)}: {EXTRA_HINT}")


def _torch(model: str | None, dtype: str | None, quantize: str | None):
    if quantize:
        raise QwenError("the torch backend runs unquantized weights; drop --quantize")
    require("the torch backend")
    from .backends.torch import TorchBackend

    ckpt = prepare_model(model)
    return TorchBackend(ckpt, dtype or "float32"), ckpt.folder


def _onnx(model: str | None, dtype: str | None, quantize: str | None, onnx_dtype: str | None = None):
    require("the onnx backend")
    from .backends.onnx import OnnxBackend

    folder: Path = resolve_model(model)
    return OnnxBackend(folder, dtype, "int4" if quantize == "4" else quantize, variant=onnx_dtype), folder


register("torch", _torch)
register("onnx", _onnx)
