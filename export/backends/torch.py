"""The PyTorch twin as a backend of the shared generation loop (qwen_mlx.backends.base.Backend).

The KV cache is the list of (key, value) tensors the twin returns; trimming slices it. The hybrid family's past
(conv windows and recurrent states beside keys and values) is a HybridPast (export/backends/past.py), marked at the
end of each prompt chunk as on MLX. CUDA is used when torch has it, else the CPU.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from qwen_mlx.checkpoint import Checkpoint
from qwen_mlx.backends.base import process_peak_rss_gb

from ..models.load import load_model
from ..models.qwen2 import KV
from .past import HybridPast


class TorchBackend:
    name = "torch"

    def __init__(self, ckpt: Checkpoint, dtype: str = "float32"):
        self.args = ckpt.args
        self.dtype = dtype
        self.torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(ckpt, dtype, self.torch_device)
        self.model.last_only = True  # only the last position's logits are ever returned
        self.past: list[KV] = self.model.empty_cache()
        self.hybrid = HybridPast(self.past, [layer.linear for layer in self.model.model.layers]) \
            if self.args.hybrid else None
        self.device = f"torch {self.torch_device.type}, {dtype}"

    @torch.inference_mode()
    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        P, L = self.cache_length, len(tokens)
        dev = self.torch_device
        input_ids = torch.tensor([list(tokens)], dtype=torch.int64, device=dev)
        attention_mask = torch.ones((1, P + L), dtype=torch.int64, device=dev)
        position_ids = torch.arange(P, P + L, dtype=torch.int64, device=dev)[None]
        logits, self.past = self.model(input_ids, attention_mask, position_ids, self.past)
        if self.hybrid is not None:  # the end of a prompt chunk: where a recurrent state can be brought back to
            self.hybrid.update(self.past, L, mark=L > 1)
        return logits[0, -1].float().cpu().numpy()

    @property
    def cache_length(self) -> int:
        return self.hybrid.length if self.hybrid is not None else self.past[0][0].shape[2]

    def trim(self, length: int) -> None:
        if self.hybrid is not None:
            self.hybrid.trim(length)
            self.past = self.hybrid.layers
        elif length < self.cache_length:
            self.past = [(k[:, :, :length], v[:, :, :length]) for k, v in self.past]

    def peak_memory_gb(self) -> float:
        if self.torch_device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 1e9
        return process_peak_rss_gb()

    def batched(self, max_batch: int):
        """This model as a continuous-batching backend (export.backends.torch_batch), or None where batching would
        change the math: dynamic NTK RoPE rescales by the longest position in the batch; Dual Chunk
        Attention runs one sequence at a time, as on MLX. The hybrid family's: export/backends/torch_hybrid_batch.py."""
        if self.args.rope_type == "dynamic" or self.args.dual_chunk is not None:
            return None
        if self.args.hybrid:
            from .torch_hybrid_batch import TorchHybridBatch
            return TorchHybridBatch(self.model, self.args, self.device, self.torch_device, max_batch,
                                    self.peak_memory_gb)
        from .torch_batch import TorchBatch
        return TorchBatch(self.model, self.args, self.device, self.torch_device, max_batch, self.peak_memory_gb)
