"""Loading a checked checkpoint into the MLX model, and the MLX backend of the generation loop."""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .checkpoint import Checkpoint
from .dtypes import check_dtype
from .errors import QwenError
from .quant.kv_cache import KV_GROUP_SIZE, check_kv_bits
from .model import Qwen2ForCausalLM, stack_experts
from .progress import progress_bar
from .quant.affine import module_params

QUANT_GROUP_SIZE = 64


def default_dtype() -> str:
    """bfloat16 where MLX has fast half-precision kernels (Metal, CUDA); float32 on a CPU, where MLX's
    half-precision matmuls do not use BLAS and run several times slower than float32."""
    return "float32" if mx.default_device() == mx.cpu else "bfloat16"


def load_model(ckpt: Checkpoint, dtype: str = "float32", quantize: int | None = None,
               group_size: int = QUANT_GROUP_SIZE) -> Qwen2ForCausalLM:
    check_dtype(dtype)
    if quantize not in (None, 4, 8):
        raise QwenError(f"--quantize must be 4 or 8, got {quantize}")
    if quantize and ckpt.quantization is not None:
        raise QwenError(f"{ckpt.folder} is already quantized ({ckpt.quantization['bits']}-bit); "
                        "leave out --quantize")
    model = Qwen2ForCausalLM(ckpt.args)
    if ckpt.quantization is not None:
        _quantize_as_stored(model, ckpt)
    weights: dict[str, mx.array] = {}
    try:
        for file in ckpt.files:
            weights.update(mx.load(str(file)))  # lazy: nothing is read until evaluated
    except (RuntimeError, ValueError) as e:
        raise QwenError(f"cannot read {ckpt.folder}: {e}") from None
    target = getattr(mx, dtype)
    # Packed codes stay uint32; mlx-lm's stacked `switch_mlp` experts are this model's `experts`.
    weights = stack_experts({k.replace(".mlp.switch_mlp.", ".mlp.experts."): v if v.dtype == mx.uint32
                             else v.astype(target) for k, v in weights.items() if k in ckpt.tensors}, ckpt.args)
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
        # Affine quantization of every Linear, the stacked experts (gather_qmm) and the embedding; a tied
        # lm_head reuses the quantized embedding through `as_linear`. A matrix whose rows do not split into
        # groups stays unquantized, and so do the MoE router and shared-expert gate: they decide which
        # experts run (rounding them would change routing, not just values) and are ~0.1% of the weights.
        # The scales take the model's dtype: float32 scales keep MLX's CPU kernel ~10x faster than bfloat16.
        nn.quantize(model, group_size=group_size, bits=quantize,
                    class_predicate=lambda path, m: hasattr(m, "to_quantized")
                    and m.weight.shape[-1] % group_size == 0
                    and not path.endswith(("mlp.gate", "mlp.shared_expert_gate")))
        mx.eval(model.parameters())
    return model


def _quantize_as_stored(model: Qwen2ForCausalLM, ckpt: Checkpoint) -> None:
    """Swap in quantized layers exactly where the folder stores scales, each at its stored bits and group
    size (per-module overrides included), as mlx-lm's loader does, so load_weights takes the packed tensors."""
    def stored(path: str, module: nn.Module) -> dict | bool:
        key = path.replace(".mlp.experts.", ".mlp.switch_mlp.")
        if not hasattr(module, "to_quantized") or f"{key}.scales" not in ckpt.tensors:
            return False
        p = module_params(ckpt.quantization, key)
        return {"group_size": p.group_size, "bits": p.bits, "mode": "affine"}
    nn.quantize(model, class_predicate=stored)


class MLXBackend:
    name = "mlx"

    def __init__(self, ckpt: Checkpoint, dtype: str | None = None, quantize: int | None = None,
                 kv_bits: int | None = None, kv_group_size: int = KV_GROUP_SIZE):
        check_kv_bits(kv_bits, kv_group_size, ckpt.args.head_dim)  # before loading the weights
        if kv_bits and ckpt.args.dual_chunk is not None:
            raise QwenError("--kv-bits does not work with Dual Chunk Attention yet (it reads a float cache)")
        self.args = ckpt.args
        self.dtype = dtype or default_dtype()
        self.quantize = quantize
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        self.model = load_model(ckpt, self.dtype, quantize)
        self.cache = self.model.make_cache(kv_bits, kv_group_size)
        device = "gpu" if mx.default_device() == mx.gpu else "cpu"
        stored = ckpt.quantization and f", {ckpt.quantization['bits']}-bit as stored"
        self.device = f"mlx {device}, {self.dtype}" + (f", {quantize}-bit" if quantize else stored or "") \
            + (f", {kv_bits}-bit KV cache" if kv_bits else "")

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
        """This model as a continuous-batching backend (qwen_mlx.engine.mlx_batch), or None where batching
        would change the math: dynamic NTK RoPE rescales by each sequence's own length, and Dual Chunk
        Attention cuts each sequence at its own chunk boundaries (one sequence at a time, served in turn)."""
        if self.args.rope_type == "dynamic" or self.args.dual_chunk is not None:
            return None
        if self.kv_bits:  # the batch's left-padded cache is float: one sequence at a time on this cache
            return None
        from .engine.mlx_batch import MLXBatch
        return MLXBatch(self, max_batch)
