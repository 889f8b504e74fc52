"""Dual Chunk Attention (DCA): the definition both models implement, read from config.json.

Qwen2.5-7B/14B-Instruct-1M ship `dual_chunk_attention_config` = {chunk_size, local_size,
original_max_position_embeddings}. DCA (An et al. 2024, arXiv 2402.17463, "ChunkLlama") keeps every relative
position RoPE sees below what the model was trained on, however long the sequence. What is computed here is
what vLLM serves the -1M models with (its DualChunkRotaryEmbedding and dual-chunk attention backend):

    c = chunk_len = chunk_size - local_size          the sequence is cut into chunks of c tokens
    key at absolute position j:        rotated at   j mod c
    query at absolute position i, and a key j <= i of chunk  i//c - d:
      d = 0  intra-chunk:              rotated at   i mod c                        (relative i - j, exact)
      d = 1  successive chunk:         rotated at   min(i mod c + c, chunk_size)
      d >= 2 inter-chunk:              rotated at   min(2c - 1, chunk_size)        (one position for all i)
    the three kinds of keys are disjoint, so one softmax over all keys j <= i, each scored with its own
    query rotation, is exactly the log-sum-exp merge of the three partial attentions.

The paper writes the same with a pre-training length `c_pt` where Qwen has `chunk_size`: successive
positions clamp at c_pt - 1 and inter-chunk queries sit at c_pt - 1; Qwen's implementation clamps at
chunk_size itself (one position further) and puts inter-chunk queries at min(2c - 1, chunk_size). The
greatest relative position ever seen is chunk_size.

Attention scaling (the -1M models' `original_max_position_embeddings`, vLLM's `scaling_factor`): past that
many tokens the logits sharpen as YaRN's do, by m(n) = max(1, 0.1 ln(n / original) + 1) on the query and on
the key. Here a token at position p takes m(p + 1) on its query and on its key (what vLLM does while
decoding). vLLM's prefill instead gives every prompt token m(prompt length); the per-position rule keeps a
cache independent of how the prompt was split (chunked prefill, saved prompt caches, recompute), and the two
agree everywhere below `original` tokens (262,144 for the -1M models) and for every decoded token.

Below the first boundary nothing differs from plain attention: while i < c only intra-chunk keys exist, and
up to i = chunk_size the successive positions are still exact (i mod c + c = i), so a sequence of at most
min(chunk_size, 2c, original) tokens gets plain causal attention's result. Past it the model never sees a
position beyond chunk_size, which is how the -1M models reach `max_position_embeddings` (1,010,000).

vLLM's optional sparse attention (`sparse_attention_config`, MInference's vertical-and-slash pattern past
`sparse_attention_threshold` tokens) approximates this dense attention for speed; the dense attention it
approximates is what both models compute.

RoPE scaling composes as the config says: a linear or YaRN `rope_scaling` sets the frequencies (and YaRN's
attention factor) of the rotation that DCA applies at its positions. Dynamic NTK is refused with DCA: its
base follows the sequence length, and no implementation says which length remapped positions should take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import QwenError


@dataclass(frozen=True)
class DualChunk:
    chunk_size: int
    local_size: int
    original_max_position_embeddings: int = 0  # 0: no attention scaling (vLLM's default)
    sparse: bool = False  # a sparse_attention_config is present (and not used: see the module docstring)

    @classmethod
    def from_config(cls, value: Any) -> "DualChunk":
        """config.json's `dual_chunk_attention_config`, checked: a malformed one is refused at load."""
        if not isinstance(value, dict):
            raise QwenError("config.json: dual_chunk_attention_config must be an object")

        def integer(key: str, default: int | None = None) -> int:
            v = value.get(key, default)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise QwenError(f"config.json: dual_chunk_attention_config.{key} must be a non-negative integer, "
                                f"got {v!r}")
            return v

        sparse = bool(value.get("sparse_attention_config")) and value.get("sparse_attention_enabled", True) is not False
        dc = cls(integer("chunk_size"), integer("local_size"), integer("original_max_position_embeddings", 0), sparse)
        if not 0 <= dc.local_size < dc.chunk_size:
            raise QwenError(f"config.json: dual_chunk_attention_config needs 0 <= local_size < chunk_size, got "
                            f"local_size {dc.local_size} and chunk_size {dc.chunk_size}")
        return dc

    @property
    def chunk_len(self) -> int:
        """c: the tokens of one chunk (chunk_size less the local window kept for successive chunks)."""
        return self.chunk_size - self.local_size

    @property
    def inter_position(self) -> int:
        return min(2 * self.chunk_len - 1, self.chunk_size)

    @property
    def plain_up_to(self) -> int:
        """The longest sequence whose every query needs only intra-chunk keys and no scaling: the models
        take their plain attention path (the very same kernel) up to here."""
        n = self.chunk_len
        return min(n, self.original_max_position_embeddings) if self.original_max_position_embeddings else n

    def scaling(self, positions: np.ndarray) -> np.ndarray:
        """m(p + 1) for each position p (float32): 1 up to `original_max_position_embeddings` tokens."""
        if not self.original_max_position_embeddings:
            return np.ones(len(positions), np.float32)
        n = (np.asarray(positions, np.float64) + 1) / self.original_max_position_embeddings
        return np.maximum(1.0, 0.1 * np.log(n) + 1.0).astype(np.float32)

    def describe(self) -> str:
        scaled = (f", logits sharpened past {self.original_max_position_embeddings} tokens"
                  if self.original_max_position_embeddings else "")
        sparse = "; dense, not the sparse approximation its config names" if self.sparse else ""
        return (f"Dual Chunk Attention: chunks of {self.chunk_len} tokens (chunk_size {self.chunk_size}, "
                f"local {self.local_size}){scaled}{sparse}")

