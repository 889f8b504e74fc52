"""Continuous batching on an exported hybrid graph (Qwen3-Next, Qwen3.5): OnnxBatch (export/backends/onnx_batch.py)
whose linear layers carry a conv window and a recurrent state per row instead of keys and values.

Those have a fixed size per row, so rows are stacked along the batch axis as they are; the attention layers' keys
and values are right-aligned with left padding exactly as in OnnxBatch. A recurrent state is valid at its own
length only: the prefix LRU reuses an entry whole (a chat's prompt, a finished conversation), as MLX's HybridBatch
does. There is no batched prefill: its filler tokens would enter a recurrent state.
Shapes: B rows, K kv heads, T cached positions (padding included), D head_dim; C conv channels, W = kernel - 1.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from qwen_mlx.backends.batching import PrefixCache, regroup
from qwen_mlx.config import ModelArgs

from .onnx_batch import Layers, OnnxBatch, OnnxSeq, _pairs


class OnnxHybridSeq(OnnxSeq):
    def __init__(self, past: Layers, length: int):
        self.past: Layers | None = past
        self.length = length  # not readable from a linear layer's arrays


class OnnxHybridBatch(OnnxBatch):
    prefill_batch = None  # see the module's docstring

    def __init__(self, session: Any, args: ModelArgs, device: str, past_names: list[str], outputs: list[str],
                 kv_dtype: type, max_batch: int, peak_memory_gb: Callable[[], float], empty: Layers,
                 prefix_tokens: int = 16384):
        """`empty`: one row's fresh past, in the order of `past_names` (OnnxBackend._empty_hybrid)."""
        super().__init__(session, args, device, past_names, outputs, kv_dtype, max_batch, peak_memory_gb,
                         prefix_tokens)
        self.empty = empty
        self.fixed = [name.startswith(("past_conv", "past_recurrent")) for name in past_names]  # per-row size
        self.attention = self.fixed.index(False)  # an input whose axis 2 is the cached length
        self.prefixes = PrefixCache(prefix_tokens, self._own, cut=self._cut, whole=True)

    def _cut(self, layers: list[tuple[np.ndarray, np.ndarray]], n: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return [pair if self.fixed[2 * i] else (pair[0][:, :, :n], pair[1][:, :, :n]) for i, pair in enumerate(layers)]

    @staticmethod
    def _own(layers: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(a.copy(), b.copy()) for a, b in layers]

    def start(self, prompt: Sequence[int]) -> tuple[OnnxHybridSeq, int]:
        layers, cached = self.prefixes.lookup(prompt)
        if layers is None:
            return OnnxHybridSeq(list(self.empty), 0), 0
        return OnnxHybridSeq([x for pair in layers for x in pair], cached), cached

    def _layers(self, seq: OnnxSeq) -> list[tuple[np.ndarray, np.ndarray]]:
        if seq.past is not None:
            return _pairs(seq.past)
        b = self.rows.index(seq)
        start = self.left[b]
        return _pairs([x[b:b + 1] if fixed else x[b:b + 1, :, start:start + seq.length]
                       for x, fixed in zip(self.past, self.fixed)])

    def decode(self, seqs: Sequence[OnnxSeq], tokens: Sequence[int]) -> np.ndarray:
        if [id(s) for s in seqs] != [id(r) for r in self.rows]:
            self._reshape(seqs)
        T = self.past[self.attention].shape[2]
        mask = (np.arange(T + 1)[None] >= np.array(self.left)[:, None]).astype(np.int64)  # B T+1
        positions = np.array([[s.length] for s in seqs], np.int64)
        logits, self.past = self._run(np.array([[t] for t in tokens], np.int64), mask, positions, self.past)
        for s in seqs:
            s.length += 1
        return logits[:, -1].astype(np.float32)

    def _reshape(self, seqs: Sequence[OnnxSeq]) -> None:
        """As OnnxBatch._reshape; a linear layer's rows are stacked, not aligned."""
        keep, joining = regroup(self.rows, seqs, lambda s: s.past is not None)
        T = max(s.length for s in seqs)
        rows: list[tuple[OnnxSeq, Layers]] = [(self.rows[i], self._row(i)) for i in keep]
        rows += [(s, s.past) for s in joining]
        past = []
        for j, fixed in enumerate(self.fixed):
            if fixed:
                past.append(np.concatenate([own[j] for _, own in rows]))
                continue
            x = np.zeros((len(seqs), *self.empty[j].shape[1:2], T, self.empty[j].shape[3]), self.empty[j].dtype)
            for b, (s, own) in enumerate(rows):
                x[b, :, T - s.length:] = own[j][0]
            past.append(x)
        for s in joining:
            s.past = None
        self.past, self.left, self.rows = past, [T - s.length for s in seqs], list(seqs)

    def _row(self, i: int) -> Layers:
        """Row i of the batch arrays as one sequence's past (1 ... each, keys and values without padding)."""
        s, start = self.rows[i], self.left[i]
        return [x[i:i + 1] if fixed else x[i:i + 1, :, start:start + s.length]
                for x, fixed in zip(self.past, self.fixed)]
