"""`convert --quantize`: an MLX affine-quantized folder in mlx-lm's layout, which `mlx_lm.load` runs as it is; and
`convert --out FILE.gguf`: one GGUF that llama.cpp runs (`gguf_file`; the format is qwen_mlx/formats/gguf_write.py).

The weights are quantized by the same rule as `--quantize` at load time (every matrix whose rows split into
groups, experts included; the MoE router and shared-expert gate stay float), then saved under mlx-lm's
names: stacked experts as `mlp.switch_mlp.<proj>`, each quantized module as weight/scales/biases, and
config.json's `quantization` (copied to `quantization_config`, as mlx-lm writes it). The hybrid family is saved
as mlx-lm saves it (`_mlx_lm_hybrid`), which is what mlx-community's folders hold and what this project reads back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .checkpoint import Checkpoint
from .config import ModelArgs
from .errors import QwenError
from .files import staged_folder
from .formats.affine import (
    COPIED_SKIPPED,
    GROUP_SIZES,
    mlx_lm_config_keys,
    mlx_lm_full_attention_interval,
)
from .formats.gguf_write import check_gguf_out, write_gguf
from .formats.safetensors import safetensors_files
from .models.load import load_model
from .models.qwen3_next import MLX_LM_PLUS_ONE_NORMS


def quantize_folder(ckpt: Checkpoint, out: Path, bits: int, group_size: int = 64, dtype: str = "float32",
                    force: bool = False) -> Path:
    if ckpt.quantization is not None:
        raise QwenError(f"{ckpt.folder} is already quantized ({ckpt.quantization['bits']}-bit); "
                        "re-quantizing would round twice")
    if group_size not in GROUP_SIZES:
        raise QwenError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    if ckpt.args.hybrid:
        _check_mlx_lm_runs(ckpt.args)
    model = load_model(ckpt, dtype, quantize=bits, group_size=group_size)
    weights = {k.replace(".mlp.experts.", ".mlp.switch_mlp."): v for k, v in tree_flatten(model.parameters())}
    config = json.loads((ckpt.folder / "config.json").read_text(encoding="utf-8"))
    quantization = {"group_size": group_size, "bits": bits, "mode": "affine"}
    config.update(mlx_lm_config_keys(ckpt.args, config), quantization=quantization, quantization_config=quantization)
    if ckpt.args.hybrid:
        weights = _mlx_lm_hybrid(weights, ckpt.args)
        config.pop("vision_config", None)  # the vision tower is not written (mlx-lm's save_config drops it too)
    with staged_folder(out, force) as staging:
        for src in sorted(ckpt.folder.iterdir()):
            if src.is_file() and src.name != "config.json" and not src.name.endswith(COPIED_SKIPPED) \
                    and src.name != "model.safetensors.index.json":
                shutil.copy2(src, staging / src.name)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "mlx"})
    return out


def _mlx_lm_hybrid(weights: dict[str, mx.array], args: ModelArgs) -> dict[str, mx.array]:
    """The hybrids' weights as mlx-lm's sanitize leaves them and its save writes them: the conv weight C K 1 (MLX's
    Conv1d; HF's is C 1 K), the zero-centred norms as 1 + w (mlx-lm runs them as plain RMSNorm), and Qwen3.5's text
    model under `language_model.` (its module path). Its loader then takes them as they are; so does ours
    (Qwen3NextForCausalLM.sanitize undoes each)."""
    prefix = "" if args.model_type == "qwen3_next" else "language_model."

    def stored(key: str, value: mx.array) -> mx.array:
        if key.endswith(".conv1d.weight"):
            return value.swapaxes(1, 2)
        return 1.0 + value if key.endswith(MLX_LM_PLUS_ONE_NORMS) else value
    return {prefix + key: stored(key, value) for key, value in weights.items()}


def _check_mlx_lm_runs(args: ModelArgs) -> None:
    """Refuse a hybrid that mlx-lm's classes would build otherwise than this project runs it: they place full
    attention every full_attention_interval-th layer (layer_types unread), give each MoE a shared expert, and
    Qwen3.5's make every layer MoE (mlp_only_layers and decoder_sparse_step unread)."""
    why = None
    if mlx_lm_full_attention_interval(args) is None:
        why = f"its layer_types are not every n-th layer full attention ({args.layer_types})"
    elif args.num_experts and not args.shared_expert:
        why = "its MoE layers have no shared expert"
    elif args.num_experts and args.model_type != "qwen3_next" and len(args.moe_layers) != args.num_hidden_layers:
        why = "not every layer is MoE (mlx-lm's Qwen3.5 ignores mlp_only_layers and decoder_sparse_step)"
    if why:
        raise QwenError(f"convert --quantize writes mlx-lm's layout, and mlx-lm cannot run this {args.model_type} "
                        f"model as it is: {why}")


def default_gguf_type(ckpt: Checkpoint) -> str:
    """llama.cpp's converter's `auto`: bf16 for a bfloat16 checkpoint (the releases: nothing rounded), else f16."""
    stored = {info.dtype for info in ckpt.tensors.values() if len(info.shape) >= 2}
    return "bf16" if "BF16" in stored else "f16"


def gguf_file(ckpt: Checkpoint, out: Path, gguf_type: str | None = None, force: bool = False,
              source_gguf: Path | None = None) -> Path:
    """The checkpoint as one GGUF file at `out`. The weights are the ones the MLX backend runs (read through its
    loader, so every layout it reads is taken: fused or per-expert MoE, mlx-lm folders, Qwen3.5's multimodal
    release), float32, stored quantized ones dequantized; the `mtp.*` layer is read beside them (from
    `source_gguf`'s nextn block when the checkpoint is that GGUF's conversion, which leaves it out)."""
    gguf_type = gguf_type or default_gguf_type(ckpt)
    check_gguf_out(out, gguf_type, force)  # before the long work, not after it
    # The MLX model's names are the HF names, its experts stacked [X, out, in] as GGUF stores them.
    extra = {"dequantize": True} if ckpt.quantization is not None else {}
    model = load_model(ckpt, "float32", **extra)
    weights = dict(tree_flatten(model.parameters()))
    if source_gguf is not None and ckpt.args.hybrid:
        from .formats.gguf import read_mtp

        mtp = model.sanitize({k: mx.array(v) for k, v in read_mtp(source_gguf).items()})
    else:
        mtp = _mtp_weights(ckpt, model)
    return write_gguf(weights, ckpt.args, ckpt.folder, out, gguf_type, force, mtp)


def _mtp_weights(ckpt: Checkpoint, model) -> dict[str, mx.array]:
    """A hybrid release's multi-token-prediction layer (`mtp.*`, which the model does not load), float32, its
    experts stacked as the model's own (`model.sanitize`); {} where there is none."""
    if not ckpt.args.hybrid:
        return {}
    weights: dict[str, mx.array] = {}
    for file in safetensors_files(ckpt.folder):
        try:
            weights.update({k: v for k, v in mx.load(str(file)).items() if k.startswith("mtp.")})
        except (RuntimeError, ValueError) as e:
            raise QwenError(f"cannot read {file}: {e}") from None
    if any(k.endswith((".scales", ".biases")) for k in weights):
        raise QwenError(f"{ckpt.folder} stores its mtp.* layer quantized; GGUF out reads a float one")
    return model.sanitize({k: v.astype(mx.float32) for k, v in weights.items()}) if weights else {}
