"""Continuous batching on an exported ONNX graph: the BatchBackend (qwen_mlx.backends.batching) of an OnnxBackend.

The graph already takes what batching needs (export/onnx_format.py, the optimum/genai names):
`attention_mask` [B, past + new] with 0 on padding, `position_ids` [B, new] per row, and each layer's past
K/V [B, K, past, D], returned grown by the new tokens as `present.*`. So, as on the torch twin, rows are
right-aligned on a shared cache length, the shorter ones padded on the left, each at its own positions.
A sequence prefills alone (or with others waiting, `prefill_batch`) into its own arrays, then joins at a
token boundary; finished rows leave at the next step. Both rebuild the batch arrays once with numpy, each
row copied to its new place: on a CPU that is one memory copy of the cache, which the graph's own
concatenation of past and present already pays on every step. The same prefix LRU as MLX's and torch's
keeps recent prompts and conversations.

Runs on the CPU provider. On CUDA the backend keeps the single sequence's cache on the device with IO
binding (export/backends/cuda.py); moving every row's cache through numpy there would cost more than batching
gains, so `OnnxBackend.batched` leaves CUDA to the serial path.
Shapes: B rows, K kv heads, T cached positions (padding included), D head_dim, V vocabulary.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from qwen_mlx.backends.batching import PrefixCache, regroup
from qwen_mlx.config import ModelArgs

Layers = list[np.ndarray]  # the graph's past inputs in order: layer 0 key, layer 0 value, layer 1 key, ...


def _pairs(past: Layers) -> list[tuple[np.ndarray, np.ndarray]]:
    return list(zip(past[0::2], past[1::2]))


def _own(layers: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(k.copy(), v.copy()) for k, v in layers]  # a cached prefix must not pin a whole batch array


class OnnxSeq:
    def __init__(self, past: Layers):
        self.past: Layers | None = past  # its own 1 K P D arrays until it joins the batch
        self.length = past[0].shape[2]


class OnnxBatch:
    def __init__(self, session: Any, args: ModelArgs, device: str, past_names: list[str], outputs: list[str],
                 kv_dtype: type, max_batch: int, peak_memory_gb: Callable[[], float], prefix_tokens: int = 16384):
        """`session` an onnxruntime InferenceSession of the graph; `past_names` its past inputs in order,
        `outputs` logits then the presents; `kv_dtype` the numpy dtype of its cache."""
        self.session, self.args, self.device = session, args, device
        self.max_batch = max_batch
        self.past_names, self.outputs, self.kv_dtype = past_names, outputs, kv_dtype
        self.peak_memory_gb = peak_memory_gb
        self.kv_shape = (self.args.num_key_value_heads, self.args.head_dim)
        self.rows: list[OnnxSeq] = []
        self.past: Layers = []   # B K T D each
        self.left: list[int] = []
        self.prefixes = PrefixCache(prefix_tokens, _own)

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: Layers) -> tuple[np.ndarray, Layers]:
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        feed.update(zip(self.past_names, past))
        logits, *present = self.session.run(self.outputs, feed)
        return logits, present  # B L V, B K T+L D each

    def _zeros(self, B: int, T: int) -> np.ndarray:
        return np.zeros((B, self.kv_shape[0], T, self.kv_shape[1]), self.kv_dtype)

    # --- one sequence ------------------------------------------------------------------------------

    def start(self, prompt: Sequence[int]) -> tuple[OnnxSeq, int]:
        layers, cached = self.prefixes.lookup(prompt)
        if layers is None:
            return OnnxSeq([self._zeros(1, 0) for _ in self.past_names]), 0
        return OnnxSeq([x for kv in layers for x in kv]), cached

    def prefill(self, seq: OnnxSeq, tokens: Sequence[int]) -> np.ndarray:
        P, L = seq.length, len(tokens)
        logits, seq.past = self._run(np.array([list(tokens)], np.int64), np.ones((1, P + L), np.int64),
                                     np.arange(P, P + L, dtype=np.int64)[None], seq.past)
        seq.length += L
        return logits[0, -1].astype(np.float32)

    def prefill_batch(self, seqs: Sequence[OnnxSeq], chunks: Sequence[Sequence[int]]) -> np.ndarray:
        """Several sequences' next chunks in one forward (the weights read once): logits [len, vocab].

        Row b holds P_b cached positions and gets L_b new tokens. Its cache is right-aligned on
        T0 = max P_b (masked zeros before it); its chunk follows at T0, then Lmax - L_b filler copies of
        its last token, masked. A real token never sees a filler (they come after it, and the causal
        mask hides the future); a filler sees the row's real tokens, so no query is fully masked. Each
        row's cached and new KV, one contiguous span of T, is then copied out of the presents."""
        B, Lmax = len(seqs), max(len(c) for c in chunks)
        P, L = [s.length for s in seqs], [len(c) for c in chunks]
        T0 = max(P)
        past = [self._zeros(B, T0) for _ in self.past_names]
        for b, (s, p) in enumerate(zip(seqs, P)):
            for x, own in zip(past, s.past):
                x[b, :, T0 - p:] = own[0]
        ids = np.array([list(c) + [c[-1]] * (Lmax - len(c)) for c in chunks], np.int64)             # B Lmax
        t = np.arange(T0 + Lmax)[None]                                                               # 1 T
        start, end = np.array([T0 - p for p in P])[:, None], np.array([T0 + n for n in L])[:, None]
        mask = ((t >= start) & (t < end)).astype(np.int64)                                           # B T
        positions = np.array(P)[:, None] + np.minimum(np.arange(Lmax)[None], np.array(L)[:, None] - 1)
        logits, present = self._run(ids, mask, positions.astype(np.int64), past)
        for b, (s, p, n) in enumerate(zip(seqs, P, L)):
            s.past = [np.ascontiguousarray(x[b:b + 1, :, T0 - p:T0 + n]) for x in present]
            s.length = p + n
        return logits[np.arange(B), np.array(L) - 1].astype(np.float32)

    def remember(self, seq: OnnxSeq, tokens: Sequence[int]) -> None:
        self.prefixes.store(tokens[:seq.length], self._layers(seq))

    def release(self, seq: OnnxSeq, tokens: Sequence[int] | None = None) -> None:
        if tokens is not None and seq.length > 0:
            self.prefixes.store(tokens[:seq.length], self._layers(seq))
        seq.past = None  # a row still in the batch leaves at the next decode

    def _layers(self, seq: OnnxSeq) -> list[tuple[np.ndarray, np.ndarray]]:
        if seq.past is not None:
            return _pairs(seq.past)
        b = self.rows.index(seq)
        start = self.left[b]
        return _pairs([x[b:b + 1, :, start:start + seq.length] for x in self.past])

    # --- the batch ---------------------------------------------------------------------------------

    def decode(self, seqs: Sequence[OnnxSeq], tokens: Sequence[int]) -> np.ndarray:
        if [id(s) for s in seqs] != [id(r) for r in self.rows]:
            self._reshape(seqs)
        T = self.past[0].shape[2]
        mask = (np.arange(T + 1)[None] >= np.array(self.left)[:, None]).astype(np.int64)  # B T+1
        positions = np.array([[s.length] for s in seqs], np.int64)
        logits, self.past = self._run(np.array([[t] for t in tokens], np.int64), mask, positions, self.past)
        for s in seqs:
            s.length += 1
        return logits[:, -1].astype(np.float32)

    def _reshape(self, seqs: Sequence[OnnxSeq]) -> None:
        """Drop the rows not in `seqs`, append the sequences that joined, in the order of `seqs`: every
        row right-aligned on the longest, its KV copied once into the new arrays."""
        keep, joining = regroup(self.rows, seqs, lambda s: s.past is not None)
        T = max(s.length for s in seqs)
        past = [self._zeros(len(seqs), T) for _ in self.past_names]
        for b, i in enumerate(keep):
            s, start = self.rows[i], self.left[i]
            for new, old in zip(past, self.past):
                new[b, :, T - s.length:] = old[i, :, start:start + s.length]
        for b, s in enumerate(joining, len(keep)):
            for new, own in zip(past, s.past):
                new[b, :, T - s.length:] = own[0]
            s.past = None
        self.past, self.left, self.rows = past, [T - s.length for s in seqs], list(seqs)

    def reset(self) -> None:
        self.rows, self.past, self.left = [], [], []
