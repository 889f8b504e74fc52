"""Continuous batching on MLX: many sequences in one left-padded KV cache, one forward per decode step.

Each sequence prefills alone into its own `KVCache` (chunked by the engine), then joins the running batch
at a token boundary: the batch cache is rebuilt with every row right-aligned on a shared write index, the
shorter rows padded on the left. Rows carry their own RoPE positions (`mx.fast.rope` takes a vector of
offsets) and a mask hides each row's padding, so a row computes what it would alone. Finished rows leave
at the next step and the padding every row shares is cut. A small LRU keeps the KV of recent prompts
(and of finished conversations) so a request sharing a prefix with one (a system prompt, the next turn of
a chat) prefills only the rest.

Shapes: B rows, K kv heads, T cached positions (padding included), D head_dim, V vocabulary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import mlx.core as mx
import numpy as np

from ..model import KVCache
from .batching import PrefixCache

if TYPE_CHECKING:
    from ..mlx_backend import MLXBackend


class BatchKVCache:
    """One layer's keys and values for B rows, right-aligned: row b is valid in [left[b], idx)."""

    step = 256

    def __init__(self, keys: mx.array, values: mx.array, left: list[int]):
        self.keys, self.values = keys, values                                  # B K T D
        self.idx = keys.shape[2]
        self.left = left
        self.positions = mx.array([self.idx - pad for pad in left], dtype=mx.int32)  # B: next RoPE position

    @property
    def offset(self) -> mx.array:
        """What the model's RoPE reads: each row's own position (a vector offset to `mx.fast.rope`)."""
        return self.positions

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        B, K, L, D = k.shape
        end = self.idx + L
        if end > self.keys.shape[2]:
            grow = -(-end // self.step) * self.step - self.keys.shape[2]
            self.keys = mx.concatenate([self.keys[..., :self.idx, :], mx.zeros((B, K, grow, D), k.dtype)], axis=2)
            self.values = mx.concatenate(
                [self.values[..., :self.idx, :], mx.zeros((B, K, grow, v.shape[3]), v.dtype)], axis=2)
        self.keys[..., self.idx:end, :] = k
        self.values[..., self.idx:end, :] = v
        self.idx = end
        self.positions = self.positions + L
        return self.keys[..., :end, :], self.values[..., :end, :]

    def row(self, b: int, length: int) -> tuple[mx.array, mx.array]:
        """Row b's first `length` valid positions (a view of the batch buffer)."""
        start = self.left[b]
        return self.keys[b:b + 1, :, start:start + length, :], self.values[b:b + 1, :, start:start + length, :]


class MLXSeq:
    def __init__(self, cache: list[KVCache]):
        self.cache: list[KVCache] | None = cache  # its own cache until it joins the batch
        self.length = cache[0].offset             # positions its KV holds


def _own(layers: list[tuple[mx.array, mx.array]]) -> list[tuple[mx.array, mx.array]]:
    layers = [(mx.contiguous(k), mx.contiguous(v)) for k, v in layers]
    mx.eval(layers)
    return layers


def _single_cache(layers: list[tuple[mx.array, mx.array]], length: int) -> list[KVCache]:
    cache = []
    for k, v in layers:
        c = KVCache()
        c.keys, c.values, c.offset = k[..., :length, :], v[..., :length, :], length
        cache.append(c)
    return cache


class MLXBatch:
    """The BatchBackend (qwen_mlx.engine.batching) of an MLXBackend: shares its model, keeps its own caches."""

    def __init__(self, backend: MLXBackend, max_batch: int, prefix_tokens: int = 16384):
        self.model = backend.model
        self.args = backend.args
        self.device = backend.device
        self.max_batch = max_batch
        self.rows: list[MLXSeq] = []
        self.cache: list[BatchKVCache] = []
        self.prefixes = PrefixCache(prefix_tokens, _own)

    # --- one sequence ------------------------------------------------------------------------------

    def start(self, prompt: Sequence[int]) -> tuple[MLXSeq, int]:
        layers, cached = self.prefixes.lookup(prompt)
        return MLXSeq(self.model.make_cache() if layers is None else _single_cache(layers, cached)), cached

    def prefill(self, seq: MLXSeq, tokens: Sequence[int]) -> np.ndarray:
        logits = self.model(mx.array([list(tokens)], dtype=mx.int32), seq.cache)  # 1 1 V
        seq.length += len(tokens)
        return np.array(logits[0, -1].astype(mx.float32))

    def remember(self, seq: MLXSeq, tokens: Sequence[int]) -> None:
        self.prefixes.store(tokens[:seq.length], self._layers(seq))

    def release(self, seq: MLXSeq, tokens: Sequence[int] | None = None) -> None:
        if tokens is not None and seq.length > 0:
            self.prefixes.store(tokens[:seq.length], self._layers(seq))
        seq.cache = None  # a row still in the batch leaves at the next decode

    def _layers(self, seq: MLXSeq) -> list[tuple[mx.array, mx.array]]:
        if seq.cache is not None:
            return [(c.keys[..., :seq.length, :], c.values[..., :seq.length, :]) for c in seq.cache]
        b = self.rows.index(seq)
        return [c.row(b, seq.length) for c in self.cache]

    # --- the batch ---------------------------------------------------------------------------------

    def decode(self, seqs: Sequence[MLXSeq], tokens: Sequence[int]) -> np.ndarray:
        if [id(s) for s in seqs] != [id(r) for r in self.rows]:
            self._reshape(seqs)
        B = len(seqs)
        idx, left = self.cache[0].idx, self.cache[0].left
        # B 1 1 T+1: a row sees its own positions and the new token, never its left padding
        mask = (mx.arange(idx + 1)[None] >= mx.array(left)[:, None]).reshape(B, 1, 1, idx + 1)
        logits = self.model(mx.array(list(tokens), dtype=mx.int32)[:, None], self.cache, mask)  # B 1 V
        for s in seqs:
            s.length += 1
        return np.array(logits[:, -1].astype(mx.float32))

    def _reshape(self, seqs: Sequence[MLXSeq]) -> None:
        """Drop the rows not in `seqs`, append the sequences that joined, in the order of `seqs`."""
        wanted = {id(s) for s in seqs}
        keep = [i for i, r in enumerate(self.rows) if id(r) in wanted]
        kept = [self.rows[i] for i in keep]
        joining = [s for s in seqs if s.cache is not None]
        if kept + joining != list(seqs):
            raise ValueError("sequences must keep their order and new ones come last")
        parts: list[tuple[list[tuple[mx.array, mx.array]], list[int], int]] = []  # (layers, left, T)
        if kept:
            take = mx.array(keep)
            idx = self.cache[0].idx
            layers = [(c.keys[take, :, :idx, :], c.values[take, :, :idx, :]) for c in self.cache]
            parts.append((layers, [self.cache[0].left[i] for i in keep], idx))
        for s in joining:
            parts.append(([(c.keys[..., :s.length, :], c.values[..., :s.length, :]) for c in s.cache], [0], s.length))
            s.cache = None
        T = max(t for _, _, t in parts)
        cut = min(pad + T - t for _, lefts, t in parts for pad in lefts)  # padding every row shares
        new_layers = []
        for layer in range(len(parts[0][0])):
            ks, vs = [], []
            for layers, _, t in parts:
                k, v = layers[layer]
                pad = T - t - cut
                if pad > 0:
                    k = mx.concatenate([mx.zeros((*k.shape[:2], pad, k.shape[3]), k.dtype), k], axis=2)
                    v = mx.concatenate([mx.zeros((*v.shape[:2], pad, v.shape[3]), v.dtype), v], axis=2)
                elif pad < 0:
                    k, v = k[..., -pad:, :], v[..., -pad:, :]
                ks.append(k)
                vs.append(v)
            new_layers.append((mx.concatenate(ks, axis=0), mx.concatenate(vs, axis=0)))
        left = [pad + T - t - cut for _, lefts, t in parts for pad in lefts]
        self.cache = [BatchKVCache(k, v, left) for k, v in new_layers]
        mx.eval([c.keys for c in self.cache], [c.values for c in self.cache])
        self.rows = list(seqs)

    def reset(self) -> None:
        self.rows, self.cache = [], []
