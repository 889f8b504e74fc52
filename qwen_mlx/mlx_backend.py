"""Loading a checked checkpoint into the MLX model, and the MLX backend of the generation loop."""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .checkpoint import Checkpoint
from .dtypes import check_dtype
from .errors import QwenError
from .model import Qwen2ForCausalLM
from .progress import progress_bar

QUANT_GROUP_SIZE = 64


def default_dtype() -> str:
    """bfloat16 where MLX has fast half-precision kernels (Metal, CUDA); float32 on a CPU, where MLX's
    half-precision matmuls do not use BLAS and run several times slower than float32."""
    return "float32" if mx.default_device() == mx.cpu else "bfloat16"


def load_model(ckpt: Checkpoint, dtype: str = "float32", quantize: int | None = None) -> Qwen2ForCausalLM:
    check_dtype(dtype)
    if quantize not in (None, 4, 8):
        raise QwenError(f"--quantize must be 4 or 8, got {quantize}")
    model = Qwen2ForCausalLM(ckpt.args)
    weights: dict[str, mx.array] = {}
    try:
        for file in ckpt.files:
            weights.update(mx.load(str(file)))  # lazy: nothing is read until evaluated
    except (RuntimeError, ValueError) as e:
        raise QwenError(f"cannot read {ckpt.folder}: {e}") from None
    target = getattr(mx, dtype)
    weights = {k: v.astype(target) for k, v in weights.items() if k in ckpt.tensors}
    model.load_weights(list(weights.items()), strict=True)
    # Read the weights layer by layer so the progress bar moves and peak memory stays one layer above
    # the model's size (the source dtype copy of a layer is freed once cast).
    parts = [model.model.embed_tokens, *model.model.layers, model.model.norm]
    if not ckpt.args.tie_word_embeddings:
        parts.append(model.lm_head)
    for part in progress_bar(parts, "loading weights", total=len(parts)):
        mx.eval(part.parameters())
    del weights
    if quantize:
        # Affine quantization of every Linear and the embedding; a tied lm_head reuses the quantized
        # embedding through `as_linear`. A matrix whose rows do not split into groups stays unquantized.
        # The scales take the model's dtype: float32 scales keep MLX's CPU kernel ~10x faster than bfloat16.
        nn.quantize(model, group_size=QUANT_GROUP_SIZE, bits=quantize,
                    class_predicate=lambda _, m: hasattr(m, "to_quantized")
                    and m.weight.shape[-1] % QUANT_GROUP_SIZE == 0)
        mx.eval(model.parameters())
    return model


class MLXBackend:
    name = "mlx"

    def __init__(self, ckpt: Checkpoint, dtype: str | None = None, quantize: int | None = None):
        self.args = ckpt.args
        self.dtype = dtype or default_dtype()
        self.model = load_model(ckpt, self.dtype, quantize)
        self.cache = self.model.make_cache()
        device = "gpu" if mx.default_device() == mx.gpu else "cpu"
        self.device = f"mlx {device}, {self.dtype}" + (f", {quantize}-bit" if quantize else "")

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        logits = self.model(mx.array([list(tokens)], dtype=mx.int32), self.cache)
        return np.array(logits[0, -1].astype(mx.float32))

    @property
    def cache_length(self) -> int:
        return self.cache[0].offset

    def trim(self, length: int) -> None:
        for c in self.cache:
            c.offset = min(c.offset, length)

    def peak_memory_gb(self) -> float:
        return mx.get_peak_memory() / 1e9

    def batched(self, max_batch: int):
        """This model as a continuous-batching backend (qwen_mlx.mlx_batch), or None where batching
        would change the math: dynamic NTK RoPE rescales by each sequence's own length."""
        if self.args.rope_type == "dynamic":
            return None
        from .mlx_batch import MLXBatch
        return MLXBatch(self, max_batch)
