"""Continuous batching on the PyTorch twin: the BatchBackend (qwen_mlx.backends.batching) of a TorchBackend.

The twin already takes what batching needs: `attention_mask` (0 marks padding) and `position_ids` per
row. Rows are right-aligned on a shared cache length, shorter ones padded on the left; a sequence
prefills alone, then joins at a token boundary, and finished rows leave at the next step (the padding
they all share is cut). The same prefix LRU as MLX's keeps recent prompts and conversations.
Shapes: B rows, K kv heads, T cached positions (padding included), D head_dim.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from qwen_mlx.backends.batching import PrefixCache, regroup

from qwen_mlx.config import ModelArgs

from ..models.qwen2 import KV, Qwen2ForCausalLM


class TorchSeq:
    def __init__(self, past: list[KV]):
        self.past: list[KV] | None = past  # its own cache until it joins the batch
        self.length = past[0][0].shape[2]


class TorchBatch:
    def __init__(self, model: Qwen2ForCausalLM, args: ModelArgs, device: str, torch_device: torch.device,
                 max_batch: int, peak_memory_gb: Callable[[], float], prefix_tokens: int = 16384):
        self.model, self.args, self.device, self.dev = model, args, device, torch_device
        self.max_batch = max_batch
        self.peak_memory_gb = peak_memory_gb  # the backend's count (CUDA's or the process's)
        self.rows: list[TorchSeq] = []
        self.past: list[KV] = []
        self.left: list[int] = []
        self.prefixes = PrefixCache(prefix_tokens, lambda layers: [(k.clone(), v.clone()) for k, v in layers])

    def start(self, prompt: Sequence[int]) -> tuple[TorchSeq, int]:
        layers, cached = self.prefixes.lookup(prompt)
        return TorchSeq(self.model.empty_cache() if layers is None else layers), cached

    @torch.inference_mode()
    def prefill(self, seq: TorchSeq, tokens: Sequence[int]) -> np.ndarray:
        P, L = seq.length, len(tokens)
        ids = torch.tensor([list(tokens)], dtype=torch.int64, device=self.dev)
        mask = torch.ones((1, P + L), dtype=torch.int64, device=self.dev)
        pos = torch.arange(P, P + L, dtype=torch.int64, device=self.dev)[None]
        logits, seq.past = self.model(ids, mask, pos, seq.past)
        seq.length += L
        return logits[0, -1].float().cpu().numpy()

    def remember(self, seq: TorchSeq, tokens: Sequence[int]) -> None:
        self.prefixes.store(tokens[:seq.length], self._layers(seq))

    def release(self, seq: TorchSeq, tokens: Sequence[int] | None = None) -> None:
        if tokens is not None and seq.length > 0:
            self.prefixes.store(tokens[:seq.length], self._layers(seq))
        seq.past = None

    def _layers(self, seq: TorchSeq) -> list[KV]:
        if seq.past is not None:
            return seq.past
        b = self.rows.index(seq)
        start = self.left[b]
        return [(k[b:b + 1, :, start:], v[b:b + 1, :, start:]) for k, v in self.past]

    @torch.inference_mode()
    def decode(self, seqs: Sequence[TorchSeq], tokens: Sequence[int]) -> np.ndarray:
        if [id(s) for s in seqs] != [id(r) for r in self.rows]:
            self._reshape(seqs)
        T = self.past[0][0].shape[2]
        mask = torch.ones((len(seqs), T + 1), dtype=torch.int64, device=self.dev)
        for b, pad in enumerate(self.left):
            mask[b, :pad] = 0
        pos = torch.tensor([[s.length] for s in seqs], dtype=torch.int64, device=self.dev)
        ids = torch.tensor([[t] for t in tokens], dtype=torch.int64, device=self.dev)
        logits, self.past = self.model(ids, mask, pos, self.past)
        for s in seqs:
            s.length += 1
        return logits[:, -1].float().cpu().numpy()

    def _reshape(self, seqs: Sequence[TorchSeq]) -> None:
        """Drop the rows not in `seqs`, append the sequences that joined, in the order of `seqs`."""
        keep, joining = regroup(self.rows, seqs, lambda s: s.past is not None)
        parts = []  # (layers, left pads, T)
        if keep:
            idx = torch.tensor(keep, device=self.dev)
            parts.append(([(k[idx], v[idx]) for k, v in self.past], [self.left[i] for i in keep],
                          self.past[0][0].shape[2]))
        for s in joining:
            parts.append((s.past, [0], s.length))
            s.past = None
        T = max(t for _, _, t in parts)
        cut = min(pad + T - t for _, lefts, t in parts for pad in lefts)  # padding every row shares

        def align(x: torch.Tensor, t: int) -> torch.Tensor:
            pad = T - t - cut
            if pad >= 0:
                return torch.cat([x.new_zeros((*x.shape[:2], pad, x.shape[3])), x], dim=2)
            return x[:, :, -pad:]

        self.past = [(torch.cat([align(p[0][i][0], p[2]) for p in parts]),
                      torch.cat([align(p[0][i][1], p[2]) for p in parts])) for i in range(len(parts[0][0]))]
        self.left = [pad + T - t - cut for _, lefts, t in parts for pad in lefts]
        self.rows = list(seqs)

    def reset(self) -> None:
        self.rows, self.past, self.left = [], [], []
