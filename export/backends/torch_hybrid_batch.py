"""Continuous batching on the hybrid family's PyTorch twin (Qwen3-Next, Qwen3.5): TorchBatch
(export/backends/torch_batch.py) whose linear layers carry a conv window and a recurrent state per row instead of
keys and values, as export/backends/onnx_hybrid_batch.py does for the exported graph.

Windows and states have a fixed size per row: rows are stacked along the batch axis as they are; the attention
layers' keys and values are right-aligned with left padding as in TorchBatch. The prefix LRU reuses an entry whole
(a recurrent state is valid at its own length only). No batched prefill: its filler tokens would enter a state.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from qwen_mlx.backends.batching import PrefixCache, regroup
from qwen_mlx.config import ModelArgs

from ..models.qwen2 import KV
from .torch_batch import TorchBatch, TorchSeq


class TorchHybridSeq(TorchSeq):
    def __init__(self, past: list[KV], length: int):
        self.past: list[KV] | None = past
        self.length = length  # not readable from a linear layer's tensors


class TorchHybridBatch(TorchBatch):
    prefill_batch = None  # see the module's docstring

    def __init__(self, model, args: ModelArgs, device: str, torch_device: torch.device, max_batch: int,
                 peak_memory_gb: Callable[[], float], prefix_tokens: int = 16384):
        super().__init__(model, args, device, torch_device, max_batch, peak_memory_gb, prefix_tokens)
        self.fixed = [layer.linear for layer in model.model.layers]  # a window and state per row
        self.attention = self.fixed.index(False)  # a layer whose axis 2 is the cached length
        self.prefixes = PrefixCache(prefix_tokens, lambda layers: [(a.clone(), b.clone()) for a, b in layers],
                                    cut=self._cut, whole=True)

    def _cut(self, layers: list[KV], n: int) -> list[KV]:
        return [pair if fixed else (pair[0][:, :, :n], pair[1][:, :, :n]) for pair, fixed in zip(layers, self.fixed)]

    def start(self, prompt: Sequence[int]) -> tuple[TorchHybridSeq, int]:
        layers, cached = self.prefixes.lookup(prompt)
        return TorchHybridSeq(self.model.empty_cache() if layers is None else layers, cached), cached

    def _layers(self, seq: TorchSeq) -> list[KV]:
        if seq.past is not None:
            return seq.past
        return self._row(self.rows.index(seq))

    def _row(self, b: int) -> list[KV]:
        """Row b of the batch as one sequence's past (keys and values without its padding)."""
        start, length = self.left[b], self.rows[b].length
        return [(a[b:b + 1], c[b:b + 1]) if fixed else (a[b:b + 1, :, start:start + length],
                                                        c[b:b + 1, :, start:start + length])
                for (a, c), fixed in zip(self.past, self.fixed)]

    @torch.inference_mode()
    def decode(self, seqs: Sequence[TorchSeq], tokens: Sequence[int]) -> np.ndarray:
        if [id(s) for s in seqs] != [id(r) for r in self.rows]:
            self._reshape(seqs)
        T = self.past[self.attention][0].shape[2]
        mask = (torch.arange(T + 1, device=self.dev)[None] >= torch.tensor(self.left, device=self.dev)[:, None])
        pos = torch.tensor([[s.length] for s in seqs], dtype=torch.int64, device=self.dev)
        ids = torch.tensor([[t] for t in tokens], dtype=torch.int64, device=self.dev)
        logits, self.past = self.model(ids, mask.to(torch.int64), pos, self.past)
        for s in seqs:
            s.length += 1
        return logits[:, -1].float().cpu().numpy()

    def _reshape(self, seqs: Sequence[TorchSeq]) -> None:
        """As TorchBatch._reshape; a linear layer's rows are stacked, not aligned."""
        keep, joining = regroup(self.rows, seqs, lambda s: s.past is not None)
        T = max(s.length for s in seqs)
        rows = [(self.rows[i], self._row(i)) for i in keep] + [(s, s.past) for s in joining]

        def aligned(x: torch.Tensor, length: int) -> torch.Tensor:  # 1 K length D -> 1 K T D, padded on the left
            return torch.cat([x.new_zeros((*x.shape[:2], T - length, x.shape[3])), x], dim=2)

        self.past = [(torch.cat([own[j][0] for _, own in rows]), torch.cat([own[j][1] for _, own in rows])) if fixed
                     else (torch.cat([aligned(own[j][0], s.length) for s, own in rows]),
                           torch.cat([aligned(own[j][1], s.length) for s, own in rows]))
                     for j, fixed in enumerate(self.fixed)]
        for s in joining:
            s.past = None
        self.left, self.rows = [T - s.length for s in seqs], list(seqs)
