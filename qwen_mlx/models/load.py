"""Loading a checked checkpoint (qwen_mlx/checkpoint.py) into its MLX model: float, quantized at load time
(`--quantize`), or quantized as stored (mlx-lm folders, repacked AWQ/GPTQ, GGUF blocks)."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from ..checkpoint import Checkpoint
from ..dtypes import check_dtype
from ..errors import QwenError
from ..formats.affine import module_params
from ..progress import progress_bar
from . import model_class
from .dequantize import dequantize_stored

QUANT_GROUP_SIZE = 64


def load_model(ckpt: Checkpoint, dtype: str = "float32", quantize: int | None = None,
               group_size: int = QUANT_GROUP_SIZE,
               shard: Callable[[nn.Module], nn.Module] | None = None, dequantize: bool = False) -> nn.Module:
    """`dequantize`: load weights stored quantized as float (qwen_mlx/models/dequantize.py says when it pays).
    `shard`: a rank's cut of the model (qwen_mlx/models/sharding.py), taken while the weights are still
    lazy, so only the slices it keeps are read; `--quantize` then runs first, on the whole lazy matrices."""
    check_dtype(dtype)
    if quantize not in (None, 4, 8):
        raise QwenError(f"--quantize must be 4 or 8, got {quantize}")
    if quantize and ckpt.quantization is not None:
        raise QwenError(f"{ckpt.folder} is already quantized ({ckpt.quantization['bits']}-bit); "
                        "leave out --quantize")
    model = model_class(ckpt.args.model_type)(ckpt.args)
    if ckpt.quantization is not None and not dequantize:
        _quantize_as_stored(model, ckpt)
    weights: dict[str, mx.array] = {}
    try:
        for file in ckpt.files:
            weights.update(mx.load(str(file)))  # lazy: nothing is read until evaluated
    except (RuntimeError, ValueError) as e:
        raise QwenError(f"cannot read {ckpt.folder}: {e}") from None
    target = getattr(mx, dtype)
    # The model's names for the stored keys it uses; packed codes stay uint32.
    names = {info.name or key: key for key, info in ckpt.tensors.items()}
    weights = {names[k]: v for k, v in weights.items() if k in names}
    if dequantize and ckpt.quantization is not None:
        weights = dequantize_stored(weights, ckpt.quantization)
    weights = model.sanitize({k: v if v.dtype == mx.uint32 else v.astype(target) for k, v in weights.items()})
    model.load_weights(list(weights.items()), strict=True)
    if shard is not None:
        if quantize:
            quantize_model(model, quantize, group_size)
            quantize = None
        model = shard(model)
        # The dict's whole tensors would keep their data once evaluated for a slice: only the slices may stay.
        weights.clear()
    # Read the weights layer by layer so the progress bar moves and peak memory stays one layer above
    # the model's size (the source dtype copy of a layer is freed once cast).
    parts = [model.model.embed_tokens, *model.model.layers, model.model.norm]
    if not ckpt.args.tie_word_embeddings:
        # Beside the embedding: a rank that keeps a slice of each vocabulary matrix reads the whole one (MLX
        # loads a tensor whole) while little else is resident yet, so the peak stays near its share.
        parts.insert(1, model.lm_head)
    for part in progress_bar(parts, "loading weights", total=len(parts)):
        mx.eval(part.parameters())
    del weights
    if quantize:
        # Affine quantization of every Linear, the stacked experts (gather_qmm) and the embedding; a tied
        # lm_head reuses the quantized embedding through `as_linear`. A matrix whose rows do not split into
        # groups stays unquantized, and so do the MoE router and shared-expert gate: they decide which
        # experts run (rounding them would change routing, not just values) and are ~0.1% of the weights.
        # The scales take the model's dtype: float32 scales keep MLX's CPU kernel ~10x faster than bfloat16.
        quantize_model(model, quantize, group_size)
        mx.eval(model.parameters())
    return model


def quantize_model(model: nn.Module, bits: int, group_size: int) -> None:
    nn.quantize(model, group_size=group_size, bits=bits,
                class_predicate=lambda path, m: hasattr(m, "to_quantized")
                and m.weight.shape[-1] % group_size == 0
                and not path.endswith(("mlp.gate", "mlp.shared_expert_gate")))


def _quantize_as_stored(model: nn.Module, ckpt: Checkpoint) -> None:
    """Swap in quantized layers exactly where the folder stores scales, each at its stored bits and group
    size (per-module overrides included), as mlx-lm's loader does, so load_weights takes the packed tensors."""
    def stored(path: str, module: nn.Module) -> dict | bool:
        key = path.replace(".mlp.experts.", ".mlp.switch_mlp.")
        if not hasattr(module, "to_quantized") or f"{key}.scales" not in ckpt.tensors:
            return False
        p = module_params(ckpt.quantization, key)
        return {"group_size": p.group_size, "bits": p.bits, "mode": "affine"}
    nn.quantize(model, class_predicate=stored)
