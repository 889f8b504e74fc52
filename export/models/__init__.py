"""The PyTorch twins of qwen_mlx/models/, file for file, found by the same `model_type` table."""

from __future__ import annotations

import importlib

from qwen_mlx.models import FAMILIES


def model_class(model_type: str) -> type:
    """The twin `Model` class of `model_type`'s family, imported on first use."""
    return importlib.import_module(f"{__name__}.{FAMILIES[model_type]}").Model
