"""Dual Chunk Attention in PyTorch: the twin of qwen_mlx/models/dual_chunk.py (the definition:
qwen_mlx/dual_chunk.py).

The twin's cache is explicit tensors and its inputs carry `position_ids` and an `attention_mask`, so here the
chunk of every query and key comes from positions (a key's position: the real tokens before it), and the
three attentions are one softmax over all keys, each key scored against the query rotation of its kind
(intra-chunk, successive, inter-chunk): the kinds are disjoint, so this is exactly their log-sum-exp merge.
Shapes: B batch, L new tokens, P cached, T = P + L, H heads, K kv heads, G = H / K, D head_dim.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from qwen_mlx.dual_chunk import DualChunk

CosSin = tuple[torch.Tensor, torch.Tensor]


class DualChunkTables(NamedTuple):
    """What every layer shares in one forward: the rotations and scales of keys and queries, and which
    kind of attention each (query, key) pair takes."""
    key: CosSin           # cos, sin B 1 L D at position mod chunk_len
    intra: CosSin         # the queries' three rotations
    succ: CosSin
    inter: CosSin
    scale: torch.Tensor   # B 1 L 1: m(p + 1) on query and key
    distance: torch.Tensor  # B 1 L T: the query's chunk less the key's (0 intra, 1 successive, >= 2 inter)


def dual_chunk_tables(dc: DualChunk, rope, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                      dtype: torch.dtype) -> DualChunkTables:
    c = dc.chunk_len
    key_positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)                        # B T
    within = position_ids % c                                                          # B L
    scale = torch.ones_like(position_ids, dtype=torch.float32)
    if dc.original_max_position_embeddings:
        n = (position_ids.to(torch.float32) + 1) / dc.original_max_position_embeddings
        scale = (0.1 * torch.log(n) + 1).clamp(min=1)
    distance = (position_ids // c)[:, :, None] - (key_positions // c)[:, None, :]      # B L T
    key = rope.cos_sin(within, dtype)  # intra-chunk queries sit where keys do
    return DualChunkTables(key, key,
                           rope.cos_sin((within + c).clamp(max=dc.chunk_size), dtype),
                           rope.cos_sin(torch.full_like(position_ids, dc.inter_position), dtype),
                           scale[:, None, :, None].to(dtype), distance[:, None])


def dual_chunk_attention(rope, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                         tables: DualChunkTables, past: tuple[torch.Tensor, torch.Tensor],
                         scale: float) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """q B H L D, k/v B K L D (projected, not rotated), mask B 1 L T additive -> o B H L D, present K/V."""
    B, H, L, D = q.shape
    K = k.shape[1]
    G = H // K
    k = torch.cat([past[0], rope(k * tables.scale, *tables.key)], dim=2)               # B K T D
    v = torch.cat([past[1], v], dim=2)                                                 # B K T D
    q = q * tables.scale
    scores = []
    for cos_sin in (tables.intra, tables.succ, tables.inter):
        qg = (rope(q, *cos_sin) * scale).reshape(B, K, G * L, D)                       # B K GL D
        scores.append(torch.matmul(qg, k.transpose(2, 3)).float().reshape(B, K, G, L, -1))  # B K G L T
    d = tables.distance[:, :, None]                                                    # B 1 1 L T
    s = torch.where(d == 0, scores[0], torch.where(d == 1, scores[1], scores[2])) + mask[:, :, None]
    probs = torch.softmax(s, dim=-1).to(v.dtype).reshape(B, K, G * L, -1)             # softmax in float32
    return torch.matmul(probs, v).reshape(B, H, L, D), (k, v)
