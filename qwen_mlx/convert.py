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

from .checkpoint import Checkpoint
from .errors import QwenError
from .files import staged_folder
from .models.load import load_model
from .formats.affine import COPIED_SKIPPED, GROUP_SIZES, mlx_lm_config_keys

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
    config.update(mlx_lm_config_keys(ckpt.args, config), quantization=quantization, quantization_config=quantization)
    with staged_folder(out, force) as staging:
        for src in sorted(ckpt.folder.iterdir()):
            if src.is_file() and src.name != "config.json" and not src.name.endswith(COPIED_SKIPPED) \
                    and src.name != "model.safetensors.index.json":
                shutil.copy2(src, staging / src.name)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "mlx"})
    return out
