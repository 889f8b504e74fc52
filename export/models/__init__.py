"""The PyTorch twins of qwen_mlx/models/, file for file, found by the same `model_type` table."""

from __future__ import annotations

import importlib
from pathlib import Path

from qwen_mlx.errors import QwenError
from qwen_mlx.models import FAMILIES


def model_class(model_type: str) -> type:
    """The twin `Model` class of `model_type`'s family, imported on first use."""
    family = FAMILIES[model_type]
    if not (Path(__file__).parent / f"{family}.py").is_file():
        raise QwenError(f"{model_type} runs on the mlx backend only for now: the PyTorch twin (the torch "
                        "backend and export-onnx) of this family is not written yet")
    return importlib.import_module(f"{__name__}.{family}").Model
