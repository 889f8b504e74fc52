"""`convert --quantize`: an MLX affine-quantized folder in mlx-lm's layout, which `mlx_lm.load` runs as it is.

The weights are quantized by the same rule as `--quantize` at load time (every matrix whose rows split into
groups, experts included; the MoE router and shared-expert gate stay float), then saved under mlx-lm's
names: stacked experts as `mlp.switch_mlp.<proj>`, each quantized module as weight/scales/biases, and
config.json's `quantization` (copied to `quantization_config`, as mlx-lm writes it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..checkpoint import Checkpoint
from ..errors import QwenError
from ..files import staged_folder
from ..mlx_backend import load_model
from .affine import GROUP_SIZES

# Files mlx-lm (and this project) read besides the weights and config.json: tokenizer, chat template,
# generation defaults. Weight indexes and pickles are never copied.
SKIPPED = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf")


def quantize_folder(ckpt: Checkpoint, out: Path, bits: int, group_size: int = 64, dtype: str = "float32",
                    force: bool = False) -> Path:
    if ckpt.quantization is not None:
        raise QwenError(f"{ckpt.folder} is already quantized ({ckpt.quantization['bits']}-bit); "
                        "re-quantizing would round twice")
    if group_size not in GROUP_SIZES:
        raise QwenError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    model = load_model(ckpt, dtype, quantize=bits, group_size=group_size)
    weights = {k.replace(".mlp.experts.", ".mlp.switch_mlp."): v for k, v in tree_flatten(model.parameters())}
    config = json.loads((ckpt.folder / "config.json").read_text(encoding="utf-8"))
    quantization = {"group_size": group_size, "bits": bits, "mode": "affine"}
    config.update(_mlx_lm_keys(ckpt, config), quantization=quantization, quantization_config=quantization)
    with staged_folder(out, force) as staging:
        for src in sorted(ckpt.folder.iterdir()):
            if src.is_file() and src.name != "config.json" and not src.name.endswith(SKIPPED) \
                    and src.name != "model.safetensors.index.json":
                shutil.copy2(src, staging / src.name)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "mlx"})
    return out


def _mlx_lm_keys(ckpt: Checkpoint, config: dict) -> dict:
    """Top-level keys mlx-lm's model classes read but transformers >= 5 nests or renames: without them
    mlx-lm's qwen2 falls back to its default rope_theta (1e6) and its MoE classes fail on num_experts."""
    a, extra = ckpt.args, {}
    if "rope_theta" not in config:
        extra["rope_theta"] = a.rope_theta
    if "rope_scaling" not in config and a.rope_type != "default":
        extra["rope_scaling"] = a.rope_scaling
    if a.num_experts and "num_experts" not in config:
        extra["num_experts"] = a.num_experts
    return extra
