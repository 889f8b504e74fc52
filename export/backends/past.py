"""One sequence's past as the torch and ONNX backends hold it: a tensor pair per layer, keys and values (B K T D,
cut anywhere) or, in the hybrid family's linear layers, a conv window and a recurrent state (a fixed size whatever
the length, so an earlier position's state cannot be cut out of it).

`HybridPast` keeps the same small protocol as qwen_mlx/models/cache.py's RecurrentCache: a few marks (the whole
past at the end of a prompt chunk, held by reference: a forward returns new tensors and never writes into old
ones), and `trim` goes back to the latest mark at or before the length asked. Arrays are torch tensors or numpy
arrays alike (only slicing is used).
"""

from __future__ import annotations

from typing import Any, Sequence

Pair = tuple[Any, Any]


class HybridPast:
    max_marks = 4  # a mark holds one state per layer; the newest few cover a chat's turns

    def __init__(self, layers: list[Pair], linear: Sequence[bool]):
        self.layers, self.linear, self.length = layers, list(linear), 0
        self.fresh = layers  # the empty past: trim(0) goes back to it
        self.marks: list[tuple[int, list[Pair]]] = []

    def update(self, layers: list[Pair], new: int, mark: bool) -> None:
        """The forward's presents after `new` tokens; `mark` at the end of a prompt chunk."""
        self.layers, self.length = layers, self.length + new
        if mark:
            kept = [m for m in self.marks if m[0] != self.length]
            self.marks = [*kept, (self.length, layers)][-self.max_marks:]

    def trim(self, length: int) -> None:
        """Back to the latest mark at or before `length` (nothing to do at or past the end)."""
        if length >= self.length:
            return
        at, layers = max([(0, self.fresh), *(m for m in self.marks if m[0] <= length)], key=lambda m: m[0])
        self.layers = [state if lin else (state[0][:, :, :at], state[1][:, :, :at])
                       for lin, state in zip(self.linear, layers)]
        self.length = at
        self.marks = [m for m in self.marks if m[0] <= at]
