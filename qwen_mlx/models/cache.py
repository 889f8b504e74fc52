"""Every cache kind a model attends over, in one module, each with the same small protocol.

A cache holds one layer's past. `update` takes the new positions (keys and values, or a recurrent state);
`offset` is the positions it holds, what RoPE reads (an int, or a vector of per-row positions in a batch);
`restorable(length)` says how many of the first `length` positions it can go back to and `trim(length)` goes
there (a KV cache anywhere, in O(1); a recurrent state only to a `mark()`ed position), `trim_caches` moves a
model's layers back together; `state` lists its arrays (to evaluate or save them). The model never asks which
kind it holds: attention goes through `qwen_mlx.models.base.scaled_dot_product_attention`, which dispatches
on the cache.

- `KVCache`: float keys and values in a buffer that grows in steps (one sequence).
- `QuantizedKVCache` (`--kv-bits 4|8`): keys and values stored as affine codes on entry with `mx.quantize`
  (groups of `group_size` features along head_dim, a scale and a bias per group, in the activations' dtype),
  the scheme and default group size of mlx-lm's QuantizedKVCache. A cache of T positions holds, per layer and
  kv head, T * D * bits / 8 bytes of codes plus 2 * T * D / group_size scales and biases, instead of T * D
  floats. Attention reads the codes in place (models/base.py: quantized_attention).
- `RecurrentCache`: a Gated DeltaNet layer's conv window and delta-rule state (qwen_mlx/models/qwen3_next.py),
  constant in size whatever the context; it keeps a few snapshots, since an earlier state cannot be cut out.
- `BatchKVCache`: many rows of one continuous batch, right-aligned on a shared write index, each row with its
  own RoPE position (qwen_mlx/backends/mlx_batch.py builds and reshapes it).

Shapes: B batch, K kv heads, L new tokens, T cached + new tokens, D head_dim,
P packed uint32 words per vector (D * bits / 32), S groups per vector (D / group_size).
"""

from __future__ import annotations

import mlx.core as mx

from ..errors import QwenError

KV_BITS = (4, 8)
KV_GROUP_SIZE = 64  # mlx-lm's default for kv_group_size
KV_GROUP_SIZES = (32, 64, 128)  # what mx.quantize accepts

Quantized = tuple[mx.array, mx.array, mx.array]  # codes B K T P (uint32), scales B K T S, biases B K T S


def check_kv_bits(bits: int | None, group_size: int, head_dim: int) -> None:
    """Refuse what mx.quantize cannot store: other bit widths, group sizes, or a head_dim not split in groups."""
    if bits is None:
        return
    if bits not in KV_BITS:
        raise QwenError(f"--kv-bits must be 4 or 8, got {bits}")
    if group_size not in KV_GROUP_SIZES:
        raise QwenError(f"--kv-group-size must be one of {', '.join(map(str, KV_GROUP_SIZES))}, got {group_size}")
    if head_dim % group_size:
        raise QwenError(f"--kv-group-size {group_size} does not divide this model's head_dim {head_dim}; "
                        f"pick one of {', '.join(str(g) for g in KV_GROUP_SIZES if head_dim % g == 0) or 'none'}")


class _Positions:
    """What KV caches share: `offset` positions, any prefix of which they can be cut back to in O(1) (the
    buffers keep their contents; the next update overwrites past `offset`)."""

    offset: int
    trimmable = True

    def restorable(self, length: int) -> int:
        return min(self.offset, length)

    def trim(self, length: int) -> int:
        self.offset = min(self.offset, length)
        return self.offset

    def mark(self) -> None:
        """Nothing to keep: any earlier position can be trimmed back to."""


class KVCache(_Positions):
    """Keys and values of one layer in a preallocated buffer that grows in steps, so decoding does not
    copy the whole cache every token. `offset` is the number of valid positions; trimming is O(1)."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        B, K, L, D = k.shape
        end = self.offset + L
        if self.keys is None or end > self.keys.shape[2]:
            # The new buffer is sized from `end` (the valid prefix plus the new tokens), rounded up to a
            # step; only the valid prefix is copied (positions past `offset` were trimmed away).
            capacity = ((end + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((B, K, capacity, D), k.dtype)
            new_v = mx.zeros((B, K, capacity, v.shape[3]), v.dtype)
            if self.keys is not None and self.offset:
                new_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
                new_v[..., : self.offset, :] = self.values[..., : self.offset, :]
            self.keys, self.values = new_k, new_v
        self.keys[..., self.offset:end, :] = k
        self.values[..., self.offset:end, :] = v
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def fill(self, keys: mx.array, values: mx.array) -> None:
        """Replace the contents with keys and values B K T D (a saved prompt cache, a batch row leaving)."""
        self.keys, self.values, self.offset = keys, values, keys.shape[2]

    def saved(self) -> dict[str, mx.array]:
        """What a prompt cache file holds for this layer (qwen_mlx/prompt_cache.py)."""
        return {"keys": self.keys[..., :self.offset, :], "values": self.values[..., :self.offset, :]}

    def load_saved(self, arrays: dict[str, mx.array], length: int) -> None:
        self.fill(arrays["keys"], arrays["values"])

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]


class QuantizedKVCache(_Positions):
    """KVCache's interface (`update`, `offset`, O(1) trim by lowering `offset`) over quantized buffers that
    grow in steps; `update` returns the valid prefix as (codes, scales, biases) triples."""

    step = 256

    def __init__(self, bits: int, group_size: int = KV_GROUP_SIZE) -> None:
        self.bits, self.group_size = bits, group_size
        self.keys: list[mx.array] | None = None  # [codes, scales, biases]
        self.values: list[mx.array] | None = None
        self.offset = 0

    def quantize(self, x: mx.array) -> Quantized:
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def update(self, k: mx.array, v: mx.array) -> tuple[Quantized, Quantized]:
        qk, qv = self.quantize(k), self.quantize(v)
        end = self.offset + k.shape[2]
        if self.keys is None or end > self.keys[0].shape[2]:
            # As KVCache: a new buffer sized from `end`, only the valid prefix copied.
            capacity = ((end + self.step - 1) // self.step) * self.step
            self.keys = self._grown(self.keys, qk, capacity)
            self.values = self._grown(self.values, qv, capacity)
        for buf, new in zip(self.keys + self.values, qk + qv):
            buf[..., self.offset:end, :] = new
        self.offset = end
        return tuple(x[..., :end, :] for x in self.keys), tuple(x[..., :end, :] for x in self.values)

    def _grown(self, old: list[mx.array] | None, like: Quantized, capacity: int) -> list[mx.array]:
        new = [mx.zeros((*x.shape[:2], capacity, x.shape[3]), x.dtype) for x in like]
        if old is not None and self.offset:
            for n, o in zip(new, old):
                n[..., :self.offset, :] = o[..., :self.offset, :]
        return new

    def fill(self, keys: mx.array, values: mx.array) -> None:
        """Replace the contents with float keys and values B K T D (a saved prompt cache), quantized."""
        self.keys, self.values = list(self.quantize(keys)), list(self.quantize(values))
        self.offset = keys.shape[2]

    def load_saved(self, arrays: dict[str, mx.array], length: int) -> None:
        self.fill(arrays["keys"], arrays["values"])  # a prompt cache file is float: quantized here

    @property
    def nbytes(self) -> int:
        """Bytes of the valid positions (codes, scales and biases of keys and values)."""
        if self.keys is None:
            return 0
        return sum(x[..., :self.offset, :].nbytes for x in self.keys + self.values)

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [*self.keys, *self.values]


class RecurrentCache:
    """One Gated DeltaNet layer's state for B sequences: the last K-1 inputs of its causal depthwise conv
    (`conv` B K-1 C) and the delta rule's matrix per value head (`recurrent` B Hv Dk Dv), after `offset`
    positions. Unlike keys and values, an earlier position's state cannot be cut out of it, so `mark()`
    records the state at the current position (references, not copies: MLX arrays are immutable and each
    update makes new ones) and `trim` goes back to the latest mark at or before the length asked. The backend
    marks after each prompt chunk, which is where a chat's next turn or an interrupted reply goes back to."""

    trimmable = False
    max_marks = 4  # a mark holds one state per layer; the newest few cover a chat's turns

    def __init__(self) -> None:
        self.conv: mx.array | None = None
        self.recurrent: mx.array | None = None
        self.offset = 0
        self.marks: list[tuple[int, mx.array | None, mx.array | None]] = []

    def update(self, conv: mx.array, recurrent: mx.array, length: int) -> None:
        self.conv, self.recurrent = conv, recurrent
        self.offset += length

    def mark(self) -> None:
        if self.marks and self.marks[-1][0] == self.offset:
            self.marks.pop()
        self.marks = [*self.marks, (self.offset, self.conv, self.recurrent)][-self.max_marks:]

    def restorable(self, length: int) -> int:
        if self.offset <= length:
            return self.offset
        return max((at for at, _, _ in self.marks if at <= length), default=0)

    def trim(self, length: int) -> int:
        at = self.restorable(length)
        if at != self.offset:
            found = [m for m in self.marks if m[0] == at]
            self.offset, self.conv, self.recurrent = found[-1] if found else (0, None, None)
            self.marks = [m for m in self.marks if m[0] <= at]
        return self.offset

    def saved(self) -> dict[str, mx.array]:
        """What a prompt cache file holds for this layer: the state after its `offset` positions."""
        return {"conv": self.conv, "recurrent": self.recurrent}

    def load_saved(self, arrays: dict[str, mx.array], length: int) -> None:
        self.conv, self.recurrent, self.offset, self.marks = arrays["conv"], arrays["recurrent"], length, []
        self.mark()

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.state)

    @property
    def state(self) -> list[mx.array]:
        return [x for x in (self.conv, self.recurrent) if x is not None]


class BatchKVCache:
    """One layer's keys and values for B rows, right-aligned: row b is valid in [left[b], idx)."""

    step = 256
    trimmable = False  # rows end at different positions; a row leaves the batch instead

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

    @property
    def state(self) -> list[mx.array]:
        return [self.keys, self.values]


Cache = KVCache | QuantizedKVCache | RecurrentCache | BatchKVCache


def trim_caches(caches: list[Cache], length: int) -> int:
    """Move every layer back to the longest prefix of at most `length` positions that all of them can reach
    (a recurrent layer only to a mark); returns its length."""
    at = min((c.restorable(length) for c in caches), default=0)
    for c in caches:
        c.trim(at)
    return at


def make_cache(num_layers: int, kv_bits: int | None = None, kv_group_size: int = KV_GROUP_SIZE) -> list[Cache]:
    """One cache per layer for one sequence: float, or with `kv_bits` quantized."""
    if kv_bits:
        return [QuantizedKVCache(kv_bits, kv_group_size) for _ in range(num_layers)]
    return [KVCache() for _ in range(num_layers)]
