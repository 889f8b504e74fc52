"""The MLX backend of the generation loop: one sequence over the model's own caches (qwen_mlx/models/cache.py)."""

from __future__ import annotations

from typing import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..checkpoint import Checkpoint
from ..errors import QwenError
from ..models.cache import KV_GROUP_SIZE, check_kv_bits, trim_caches
from ..models.dequantize import dequantize_at_load
from ..models.load import load_model
from ..models.mtp import MTPState, forward_hidden

def default_dtype() -> str:
    """bfloat16 where MLX has fast half-precision kernels (Metal, CUDA); float32 on a CPU, where MLX's
    half-precision matmuls do not use BLAS and run several times slower than float32."""
    return "float32" if mx.default_device() == mx.cpu else "bfloat16"


class MLXBackend:
    name = "mlx"

    def __init__(self, ckpt: Checkpoint, dtype: str | None = None, quantize: int | None = None,
                 kv_bits: int | None = None, kv_group_size: int = KV_GROUP_SIZE,
                 shard: Callable[[nn.Module], nn.Module] | None = None, keep_quantized: bool = True):
        """`keep_quantized=False`: weights stored quantized are dequantized at load where that pays, on a CPU
        (qwen_mlx/models/dequantize.py); `load("mlx", ...)`, which the CLI and the server use, asks for it unless
        --keep-quantized. The default keeps what the folder stores."""
        check_kv_bits(kv_bits, kv_group_size, ckpt.args.head_dim)  # before loading the weights
        if kv_bits and ckpt.args.dual_chunk is not None:
            raise QwenError("--kv-bits does not work with Dual Chunk Attention yet (it reads a float cache)")
        self.args = ckpt.args
        self.dtype = dtype or default_dtype()
        self.quantize = quantize
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        # Weights stored quantized: float on a CPU unless --keep-quantized (qwen_mlx/models/dequantize.py).
        dequantize, stored = dequantize_at_load(ckpt, self.dtype, mx.default_device() == mx.cpu, keep_quantized)
        # shard: a rank's part (distributed.py)
        self.model = load_model(ckpt, self.dtype, quantize, shard=shard, dequantize=dequantize)
        self.cache = self.model.make_cache(kv_bits, kv_group_size)
        device = "gpu" if mx.default_device() == mx.gpu else "cpu"
        stored = stored and f", {stored}"
        self.device = f"mlx {device}, {self.dtype}" + (f", {quantize}-bit" if quantize else stored or "") \
            + (f", {kv_bits}-bit KV cache" if kv_bits else "")

    # Set where an MTP layer is attached (engine/speculative.py load_mtp_drafter, qwen_mlx/models/mtp.py): the one
    # cache's hidden states, kept for the layer to draft from.
    mtp: MTPState | None = None

    def _run(self, tokens: Sequence[int], last_only: bool = True) -> mx.array:
        ids = mx.array([list(tokens)], dtype=mx.int32)
        if self.mtp is None:
            return self.model(ids, self.cache, last_only=last_only)
        logits, h = forward_hidden(self.model, ids, self.cache, last_only=last_only)
        self.mtp.add(self.cache_length - len(tokens), h)
        return logits

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        logits = self._run(tokens)
        out = np.array(logits[0, -1].astype(mx.float32))
        if len(tokens) > 1:  # the end of a prompt chunk: where a recurrent state can be brought back to
            for c in self.cache:
                c.mark()
        return out

    # --- speculative decoding on the one cache (batching.SerialBatch.verify) ----------------------------

    def forward_all(self, tokens: Sequence[int]) -> np.ndarray:
        """Feed `tokens` after the cache: float32 logits of every position [len(tokens), vocab]."""
        logits = self._run(tokens, last_only=False)
        return np.array(logits[0].astype(mx.float32))

    def snapshot(self) -> list[tuple[int, object, object]]:
        """What `restore` needs to bring the cache back here: each layer's length and recurrent state
        (references: MLX arrays are never changed in place by an update)."""
        return [(c.offset, getattr(c, "conv", None), getattr(c, "recurrent", None)) for c in self.cache]

    def rewind(self, snapshot: list[tuple[int, object, object]], fed: Sequence[int] = (), kept: int = 0) -> None:
        """Back to `snapshot`, then the first `kept` of the tokens `fed` since it again. Keys and values are only
        cut (their buffers still hold what was written past the cut); a recurrent state goes back and is fed."""
        recurrent = any(not c.trimmable for c in self.cache)
        if self.mtp is not None:  # the dropped positions' hidden states go too (the re-feed below keeps none)
            self.mtp.cut(snapshot[0][0] + kept)
        for c, (offset, conv, state) in zip(self.cache, snapshot):
            if c.trimmable:
                c.offset = offset if recurrent else offset + kept
            else:
                c.conv, c.recurrent, c.offset = conv, state, offset
        if recurrent and kept:
            self.model(mx.array([list(fed[:kept])], dtype=mx.int32), self.cache)
            mx.eval([c.state for c in self.cache])

    @property
    def cache_length(self) -> int:
        return self.cache[0].offset

    def trim(self, length: int) -> None:
        at = trim_caches(self.cache, length)
        if self.mtp is not None:
            self.mtp.cut(at)

    def peak_memory_gb(self) -> float:
        return mx.get_peak_memory() / 1e9

    def batched(self, max_batch: int):
        """This model as a continuous-batching backend (qwen_mlx.backends.mlx_batch), or None where batching
        would change the math: dynamic NTK RoPE rescales by each sequence's own length, and Dual Chunk
        Attention cuts each sequence at its own chunk boundaries (one sequence at a time, served in turn)."""
        if self.args.rope_type == "dynamic" or self.args.dual_chunk is not None:
            return None
        if self.kv_bits:  # the batch's left-padded cache is float: one sequence at a time on this cache
            return None
        from .mlx_batch import HybridBatch, MLXBatch
        return (HybridBatch if self.args.hybrid else MLXBatch)(self.model, self.args, self.device, max_batch)
