"""The MLX models: one file per architecture family, found by config.json's `model_type`.

Adding a family is adding its file here and its row in FAMILIES; nothing else asks which family runs. A
family module's `Model` takes ModelArgs (qwen_mlx/config.py), names its attributes as the checkpoint names
its keys, and offers `sanitize(weights)` (the checkpoint's renames), `make_cache(...)` (its cache kinds,
qwen_mlx/models/cache.py) and `__call__(input_ids, cache, mask, last_only)` -> logits. Shared pieces sit
beside the families: attention (base.py), caches (cache.py), layers (layers.py), loading (load.py).
export/models/ is the PyTorch twin, file for file.
"""

from __future__ import annotations

import importlib

FAMILIES = {"qwen2": "qwen2", "qwen2_moe": "qwen2", "qwen3": "qwen2", "qwen3_moe": "qwen2",  # model_type -> file
            "qwen3_next": "qwen3_next", "qwen3_5": "qwen3_next", "qwen3_5_moe": "qwen3_next",
            "qwen3_5_text": "qwen3_next", "qwen3_5_moe_text": "qwen3_next"}


def model_class(model_type: str) -> type:
    """The `Model` class of `model_type`'s family, imported on first use."""
    return importlib.import_module(f"{__name__}.{FAMILIES[model_type]}").Model
