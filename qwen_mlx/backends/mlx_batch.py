"""Continuous batching on MLX: many sequences in one left-padded KV cache, one forward per decode step.

Each sequence prefills alone into its own `KVCache` (chunked by the engine), then joins the running batch
at a token boundary: the batch cache is rebuilt with every row right-aligned on a shared write index, the
shorter rows padded on the left. Rows carry their own RoPE positions (`mx.fast.rope` takes a vector of
offsets) and a mask hides each row's padding, so a row computes what it would alone. Finished rows leave
at the next step and the padding every row shares is cut. A small LRU keeps the KV of recent prompts
(and of finished conversations) so a request sharing a prefix with one (a system prompt, the next turn of
a chat) prefills only the rest. On a GPU, rows are sampled on the device and the next step is queued
before the host reads the tokens (`decode_sampled`, qwen_mlx/sampling/device.py).

The hybrid family (`HybridBatch`): its Gated DeltaNet layers hold one recurrent state per row instead of keys
and values, stacked along the batch with no padding (a decode step feeds every row one token, so no row's state
sees another's filler); the attention layers batch as above. Its prefix LRU keeps whole entries only: the state
after a prompt, or after a finished conversation, is valid at that length and no shorter one.

Shapes: B rows, K kv heads, T cached positions (padding included), D head_dim, V vocabulary.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import numpy as np

from ..config import ModelArgs
import mlx.nn as nn

from ..models.cache import BatchKVCache, KVCache, RecurrentCache
from ..models.mtp import MTPState, forward_hidden
from ..sampling import SamplingParams
from .batching import Draw, PrefixCache, regroup
from ..sampling.device import sample, seen_mask


Layer = tuple[mx.array, mx.array]  # keys and values B K T D, or a linear layer's (conv window, state)


class MLXSeq:
    def __init__(self, cache: list[KVCache | RecurrentCache]):
        self.cache: list[KVCache | RecurrentCache] | None = cache  # its own cache until it joins the batch
        self.length = cache[0].offset                               # positions its cache holds
        # The last `verify`: (positions before it, each recurrent layer's state then, the tokens it fed).
        self.verified: tuple[int, list[tuple[mx.array, mx.array] | None], list[int]] | None = None
        self.mtp: MTPState | None = None  # with an MTP drafter: its hidden states and the MTP layer's cache


def _own(layers: list[Layer]) -> list[Layer]:
    layers = [(mx.contiguous(a), mx.contiguous(b)) for a, b in layers]
    mx.eval(layers)
    return layers


class Pending:
    """A queued step's sampled tokens, still on the device, and the rows' seen-token masks after it."""

    def __init__(self, tokens: mx.array, seen: mx.array | None):
        self.tokens, self.seen = tokens, seen  # B int32; B V bool or None (no repetition penalty)


class MLXBatch:
    """The BatchBackend (qwen_mlx.backends.batching) of an MLXBackend: shares its model, keeps its own caches.

    Where rows are sampled, `device_sampling`, is measured (docs/BENCHMARKS.md): "always" on a GPU, where
    logits stay there and steps are pipelined; "greedy" on a CPU, where MLX's argmax (and pipelining)
    beats numpy but numpy's top-k/top-p beat MLX's CPU sort; "never" copies every row's logits to numpy."""

    def __init__(self, model: nn.Module, args: ModelArgs, device: str, max_batch: int,
                 prefix_tokens: int = 16384, device_sampling: str | None = None):
        self.model, self.args, self.device = model, args, device
        self.linear = [getattr(layer, "linear", False) for layer in model.model.layers]  # recurrent layers
        self.max_batch = max_batch
        if device_sampling not in (None, "always", "greedy", "never"):
            raise ValueError(f"device_sampling must be always, greedy or never, got {device_sampling!r}")
        self.device_sampling = device_sampling or ("always" if mx.default_device() == mx.gpu else "greedy")
        self.rows: list[MLXSeq] = []
        self.cache: list[BatchKVCache | RecurrentCache] = []
        # A recurrent state holds for its whole entry only: such entries are reused whole or not at all.
        self.prefixes = PrefixCache(prefix_tokens, _own, cut=self._cut, whole=any(self.linear))
        # An MTP layer attached to the model (qwen_mlx/models/mtp.py) drafts from each sequence's hidden states.
        self.keeps_hidden = getattr(model, "mtp", None) is not None

    def _cut(self, layers: list[Layer], n: int) -> list[Layer]:
        """The first n positions of each layer (a recurrent state is kept as it is)."""
        return [pair if linear else (pair[0][..., :n, :], pair[1][..., :n, :])
                for linear, pair in zip(self.linear, layers)]

    def _kv0(self) -> BatchKVCache | None:
        """The batch's first attention layer: its write index and padding are every attention layer's."""
        return next((c for c in self.cache if isinstance(c, BatchKVCache)), None)

    # --- one sequence ------------------------------------------------------------------------------

    def start(self, prompt: Sequence[int]) -> tuple[MLXSeq, int]:
        layers, cached = self.prefixes.lookup(prompt)
        seq = MLXSeq(self.model.make_cache() if layers is None else self._single_cache(layers, cached))
        if self.keeps_hidden:
            seq.mtp = MTPState(cached)
        return seq, cached

    def _run(self, seqs: Sequence[MLXSeq], ids: mx.array, cache: list, mask: mx.array | None = None,
             last_only: bool = True) -> mx.array:
        """The model's forward over rows `seqs` (before their `length` moves on); with an MTP layer attached,
        each row's hidden states are kept for it."""
        if not self.keeps_hidden:
            return self.model(ids, cache, mask, last_only)
        logits, h = forward_hidden(self.model, ids, cache, mask, last_only)
        for b, s in enumerate(seqs):
            if s.mtp is not None:
                s.mtp.add(s.length, h[b:b + 1])
        return logits

    def _single_cache(self, layers: list[Layer], length: int) -> list[KVCache | RecurrentCache]:
        cache: list[KVCache | RecurrentCache] = []
        for linear, (a, b) in zip(self.linear, layers):
            c = RecurrentCache() if linear else KVCache()
            if linear:
                c.update(a, b, length)
            else:
                c.fill(a[..., :length, :], b[..., :length, :])
            cache.append(c)
        return cache

    def prefill(self, seq: MLXSeq, tokens: Sequence[int]) -> np.ndarray:
        logits = self._run([seq], mx.array([list(tokens)], dtype=mx.int32), seq.cache)  # 1 1 V
        seq.length += len(tokens)
        return np.array(logits[0, -1].astype(mx.float32))

    def prefill_batch(self, seqs: Sequence[MLXSeq], chunks: Sequence[Sequence[int]]) -> np.ndarray:
        """Several sequences' next chunks in one forward (their weights read once): logits [len, vocab].

        Row b holds P_b cached positions and gets L_b new tokens. In a temporary batch cache, its cached
        KV is right-aligned on T0 = max P_b (zeros before it) and the Lmax new inputs are appended to
        every row, row b's real tokens last: the Lmax - L_b inputs before them are filler that the mask
        hides from every real query (and that attend only to themselves, so nothing is NaN). RoPE
        offsets put each real token at P_b + i. Each row's cached and new KV is then copied out again."""
        Lmax = max(len(c) for c in chunks)
        P, L = [s.length for s in seqs], [len(c) for c in chunks]
        T0, T = max(P), max(P) + Lmax
        layers = []
        for i in range(len(self.model.model.layers)):
            ks, vs = [], []
            for s, p in zip(seqs, P):
                c = s.cache[i]
                k = c.keys[..., :p, :] if p else None
                v = c.values[..., :p, :] if p else None
                # the layer's own KV heads: a rank of a tensor-parallel group holds a share of them
                shape = (1, self.model.model.layers[i].self_attn.n_kv_heads, T0 - p, self.args.head_dim)
                dtype = self.model.model.norm.weight.dtype  # the activations' (a quantized embedding's is not)
                pad = mx.zeros(shape, dtype)
                ks.append(pad if k is None else mx.concatenate([pad, k], axis=2))
                vs.append(pad if v is None else mx.concatenate([pad, v], axis=2))
            layers.append(BatchKVCache(mx.concatenate(ks, axis=0), mx.concatenate(vs, axis=0), [T0 - p for p in P]))
        offsets = mx.array([p - (Lmax - n) for p, n in zip(P, L)], dtype=mx.int32)
        for c in layers:
            c.positions = offsets  # the filler's positions do not matter; each real token's do
        ids = mx.array([[0] * (Lmax - len(c)) + list(c) for c in chunks], dtype=mx.int32)
        t = mx.arange(T)[None, None, :]                                                # 1 1 T
        q = (T0 + mx.arange(Lmax))[None, :, None]                                       # 1 Lmax 1
        lo, start = mx.array([T0 - p for p in P])[:, None, None], mx.array([T - n for n in L])[:, None, None]
        valid = ((t >= lo) & (t < T0)) | (t >= start)                                  # B 1 T
        mask = ((valid & (t <= q)) | (t == q))[:, None]                                # B 1 Lmax T
        logits = self.model(ids, layers, mask)                                         # B 1 V
        for b, (s, p, n) in enumerate(zip(seqs, P, L)):
            cache: list[KVCache | RecurrentCache] = []
            for c in layers:
                k = mx.concatenate([c.keys[b:b + 1, :, T0 - p:T0, :], c.keys[b:b + 1, :, T - n:T, :]], axis=2)
                v = mx.concatenate([c.values[b:b + 1, :, T0 - p:T0, :], c.values[b:b + 1, :, T - n:T, :]], axis=2)
                one = KVCache()
                one.fill(k, v)
                cache.append(one)
            s.cache, s.length = cache, p + n
        out = np.array(logits[:, -1].astype(mx.float32))
        mx.eval([c.keys for s in seqs for c in s.cache], [c.values for s in seqs for c in s.cache])
        return out

    def remember(self, seq: MLXSeq, tokens: Sequence[int]) -> None:
        self.prefixes.store(tokens[:seq.length], self._layers(seq))

    def release(self, seq: MLXSeq, tokens: Sequence[int] | None = None) -> None:
        if tokens is not None and seq.length > 0:
            self.prefixes.store(tokens[:seq.length], self._layers(seq))
        seq.cache = None  # a row still in the batch leaves at the next decode

    def _layers(self, seq: MLXSeq) -> list[Layer]:
        if seq.cache is not None:
            return [(c.conv, c.recurrent) if linear else (c.keys[..., :seq.length, :], c.values[..., :seq.length, :])
                    for linear, c in zip(self.linear, seq.cache)]
        b = self.rows.index(seq)
        return [(c.conv[b:b + 1], c.recurrent[b:b + 1]) if linear else c.row(b, seq.length)
                for linear, c in zip(self.linear, self.cache)]

    # --- speculative decoding: one sequence alone (qwen_mlx/engine/speculative.py) -------------------

    def verify(self, seq: MLXSeq, tokens: Sequence[int]) -> np.ndarray:
        """Feed `tokens` (the next token and the drafts after it) after the sequence's cache, alone: float32
        logits of every position [len(tokens), V]. A sequence in the batch leaves it for its own cache (it
        rejoins at its next plain step); the recurrent states before the step are kept for `rollback`."""
        self._alone(seq)
        states = [(c.conv, c.recurrent) if linear else None for linear, c in zip(self.linear, seq.cache)]
        seq.verified = (seq.length, states, list(tokens))
        logits = self._run([seq], mx.array([list(tokens)], dtype=mx.int32), seq.cache, last_only=False)  # 1 L V
        seq.length += len(tokens)
        return np.array(logits[0].astype(mx.float32))

    def rollback(self, seq: MLXSeq, kept: int) -> None:
        """Keep the first `kept` of the tokens the last `verify` fed. Keys and values are cut; a recurrent
        state cannot be, so it goes back to before the step and the kept tokens are fed again (one forward)."""
        start, states, fed = seq.verified
        if start + kept >= seq.length:
            return
        if seq.mtp is not None:  # the rejected positions' hidden states go too (the re-feed below keeps none)
            seq.mtp.cut(start + kept)
        if not any(self.linear):
            for c in seq.cache:
                c.trim(start + kept)
        else:
            for c, state in zip(seq.cache, states):
                if state is None:
                    c.trim(start)
                else:
                    c.conv, c.recurrent, c.offset = state[0], state[1], start
            if kept:
                self.model(mx.array([fed[:kept]], dtype=mx.int32), seq.cache)
                mx.eval([c.state for c in seq.cache])
        seq.length = start + kept

    def _alone(self, seq: MLXSeq) -> None:
        """Give `seq` its own cache again, out of the batch (the rows left keep theirs)."""
        if seq.cache is not None:
            return
        layers = self._layers(seq)
        rest = [r for r in self.rows if r is not seq]
        seq.cache = self._single_cache(layers, seq.length)
        if rest:
            self._reshape(rest)
        else:
            self.rows, self.cache = [], []

    # --- the batch ---------------------------------------------------------------------------------

    def decode(self, seqs: Sequence[MLXSeq], tokens: Sequence[int]) -> np.ndarray:
        return np.array(self._forward(seqs, mx.array(list(tokens), dtype=mx.int32)))

    def samples_on_device(self, params: Sequence[SamplingParams]) -> bool:
        return self.device_sampling == "always" or (self.device_sampling == "greedy"
                                                    and all(p.greedy for p in params))

    def decode_sampled(self, seqs: Sequence[MLXSeq], tokens: Sequence[int] | Pending,
                       draws: Sequence[Draw]) -> Pending:
        if isinstance(tokens, Pending):  # the previous step's tokens, never read by the host
            ids, seen = tokens.tokens, tokens.seen
        else:
            ids, seen = mx.array(list(tokens), dtype=mx.int32), None
        logits = self._forward(seqs, ids)
        if any(d.params.repetition_penalty != 1.0 for d in draws):
            # each row's prompt and generated tokens, this step's input included
            seen = seen_mask([d.history for d in draws], logits.shape[-1]) if seen is None else \
                mx.put_along_axis(seen, ids[:, None], mx.array(True), axis=-1)
        else:
            seen = None
        nxt = sample(logits, draws, seen)
        mx.async_eval(nxt, *([] if seen is None else [seen]))
        return Pending(nxt, seen)

    def read(self, pending: Pending) -> list[int]:
        return pending.tokens.tolist()

    def _forward(self, seqs: Sequence[MLXSeq], tokens: mx.array) -> mx.array:
        """One token per row (B int32) -> float32 logits B V, lazy."""
        if [id(s) for s in seqs] != [id(r) for r in self.rows]:
            self._reshape(seqs)
        B = len(seqs)
        kv0 = self._kv0()
        idx, left = (kv0.idx, kv0.left) if kv0 is not None else (0, [0] * B)
        mask = None
        if any(left):  # B 1 1 T+1: a row sees its own positions and the new token, never its left padding
            mask = (mx.arange(idx + 1)[None] >= mx.array(left)[:, None]).reshape(B, 1, 1, idx + 1)
        logits = self._run(seqs, tokens[:, None], self.cache, mask)  # B 1 V
        for s in seqs:
            s.length += 1
        return logits[:, -1].astype(mx.float32)

    def _reshape(self, seqs: Sequence[MLXSeq]) -> None:
        """Drop the rows not in `seqs`, append the sequences that joined, in the order of `seqs`."""
        keep, joining = regroup(self.rows, seqs, lambda s: s.cache is not None)
        parts: list[tuple[list[Layer], list[int], int]] = []  # (layers, left, T)
        if keep:
            take = mx.array(keep)
            kv0 = self._kv0()
            idx = kv0.idx if kv0 is not None else 0
            layers = [(c.conv[take], c.recurrent[take]) if linear
                      else (c.keys[take, :, :idx, :], c.values[take, :, :idx, :])
                      for linear, c in zip(self.linear, self.cache)]
            parts.append((layers, [kv0.left[i] for i in keep] if kv0 is not None else [0] * len(keep), idx))
        for s in joining:
            parts.append((self._layers(s), [0], s.length))
            s.cache, s.verified = None, None
        T = max(t for _, _, t in parts)
        cut = min(pad + T - t for _, lefts, t in parts for pad in lefts)  # padding every row shares
        left = [pad + T - t - cut for _, lefts, t in parts for pad in lefts]
        self.cache = []
        for layer, linear in enumerate(self.linear):
            firsts, seconds = [], []
            for layers, _, t in parts:
                a, b = layers[layer]
                pad = T - t - cut
                if not linear and pad > 0:
                    a = mx.concatenate([mx.zeros((*a.shape[:2], pad, a.shape[3]), a.dtype), a], axis=2)
                    b = mx.concatenate([mx.zeros((*b.shape[:2], pad, b.shape[3]), b.dtype), b], axis=2)
                elif not linear and pad < 0:
                    a, b = a[..., -pad:, :], b[..., -pad:, :]
                firsts.append(a)
                seconds.append(b)
            a, b = mx.concatenate(firsts, axis=0), mx.concatenate(seconds, axis=0)
            if linear:  # the rows' states, stacked
                c = RecurrentCache()
                c.update(a, b, 0)
                self.cache.append(c)
            else:
                self.cache.append(BatchKVCache(a, b, left))
        mx.eval([c.state for c in self.cache])
        self.rows = list(seqs)

    def reset(self) -> None:
        self.rows, self.cache = [], []

    def peak_memory_gb(self) -> float:
        return mx.get_peak_memory() / 1e9


class HybridBatch(MLXBatch):
    """MLXBatch for the hybrid family. It has no batched prefill: there the chunks of different lengths are
    left-padded with filler tokens, which the attention mask hides but which would enter a recurrent state."""

    prefill_batch = None
