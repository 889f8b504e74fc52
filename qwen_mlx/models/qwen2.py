"""Qwen2, Qwen2-MoE, Qwen3 and Qwen3-MoE in MLX: one readable file, attribute names equal to the checkpoint's keys.

The four architectures are one decoder with a few flags from `ModelArgs`: `qkv_has_bias` / `o_has_bias`,
`qk_norm` (Qwen3's per-head RMSNorm of q and k before RoPE) and, per layer, `is_moe_layer` (a
SparseMoeBlock of routed experts, with Qwen2-MoE's gated shared expert, in place of the dense MLP).
export/models/qwen2.py is its PyTorch twin, class for class and name for name: diff the two files.
A `dual_chunk_attention_config` swaps each layer's attention for Dual Chunk Attention once the sequence outgrows
its plain prefix (qwen_mlx/dual_chunk.py; the code: qwen_mlx/models/dual_chunk.py).
`Linear` is nn.Linear whose quantized form runs prefill chunks through BLAS on a CPU (qwen_mlx/models/layers.py).
Shapes: B batch, L new tokens, T cached + new tokens, H heads, K kv heads, D head_dim, E hidden size,
X experts, k experts per token, I an MLP's intermediate size.
"""

from __future__ import annotations

import re
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelArgs
from .base import attention_weights, scaled_dot_product_attention
from .cache import KV_GROUP_SIZE, Cache, make_cache
from .dual_chunk import dual_chunk_attention
from .layers import Linear, QuantizedSwitchLinear


class RoPE(nn.Module):
    """Rotary embedding with the checkpoint's scaling, on MLX's fused kernel (`mx.fast.rope`)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        inv_freq, self.attention_factor = args.rope_frequencies()
        self._freqs = mx.array(1.0 / inv_freq)  # mx.fast.rope takes periods, not inverse frequencies
        self.dynamic = args.rope_type == "dynamic"
        self.dims = args.rotary_dim  # the first features of a head are rotated (all but in the hybrid family)

    def __call__(self, x: mx.array, offset: int) -> mx.array:
        freqs = self._freqs
        if self.dynamic and offset + x.shape[2] > self.args.max_position_embeddings:
            # Dynamic NTK: the base grows with the sequence, as HF recomputes it past the trained length.
            freqs = mx.array(1.0 / self.args.rope_frequencies(offset + x.shape[2])[0])
        if self.attention_factor != 1.0:  # yarn scales cos and sin, i.e. the rotated features
            d = self.dims
            x = x * self.attention_factor if d == x.shape[-1] else \
                mx.concatenate([x[..., :d] * self.attention_factor, x[..., d:]], axis=-1)
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=freqs)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        E, H, K, D = args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, K, D
        self.scale = D ** -0.5
        self.q_proj = Linear(E, H * D, bias=args.qkv_has_bias)
        self.k_proj = Linear(E, K * D, bias=args.qkv_has_bias)
        self.v_proj = Linear(E, K * D, bias=args.qkv_has_bias)
        self.o_proj = Linear(H * D, E, bias=args.o_has_bias)
        self.qk_norm = args.qk_norm
        if self.qk_norm:  # Qwen3: RMSNorm over each head's D features of q and k, before RoPE
            self.q_norm = nn.RMSNorm(D, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(D, eps=args.rms_norm_eps)
        self.rope = RoPE(args)
        # Dual Chunk Attention (qwen_mlx/dual_chunk.py): taken once the sequence outgrows its plain prefix.
        self.dual_chunk = args.dual_chunk
        # Attention maps (qwen_mlx/attention_maps.py): when set, called with the probabilities B H L T that
        # the fused kernel computes but does not return. A callable, not a list: nn.Module would adopt a list.
        self.on_weights: Callable[[mx.array], None] | None = None

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache: Cache) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1)                            # B L H D
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)                         # B L K D
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)                       # B H L D, B K L D
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)  # B K L D
        if self.dual_chunk is not None and cache.offset + L > self.dual_chunk.plain_up_to:
            o = dual_chunk_attention(self.dual_chunk, self.rope, q, k, v, cache, self.scale, self.on_weights)
            return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))
        q = self.rope(q, cache.offset)
        k = self.rope(k, cache.offset)
        k, v = cache.update(k, v)                                                     # B K T D
        if self.on_weights is not None:
            self.on_weights(attention_weights(q, k, self.scale, mask))
        o = scaled_dot_product_attention(q, k, v, cache, self.scale, mask)           # B H L D
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, intermediate_size: int | None = None):
        super().__init__()
        I = intermediate_size or args.intermediate_size
        self.gate_proj = Linear(args.hidden_size, I, bias=False)
        self.up_proj = Linear(args.hidden_size, I, bias=False)
        self.down_proj = Linear(I, args.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class SwitchLinear(nn.Module):
    """One projection of every expert, stacked X out in (the checkpoint's `experts.{j}.<proj>.weight`
    [out, in] stacked along j). `mx.gather_mm` multiplies each row by the experts `indices` name and
    reads no other expert's matrix."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        self.weight = mx.zeros((num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine") -> "QuantizedSwitchLinear":
        return QuantizedSwitchLinear(self.weight, group_size, bits, mode)


class Experts(nn.Module):
    """The routed experts' SwiGLUs; only the k chosen per token are computed."""

    sort_above = 64  # (token, expert) pairs from which grouping rows by expert pays (mlx-lm's threshold)

    def __init__(self, args: ModelArgs):
        super().__init__()
        E, I, X = args.hidden_size, args.moe_intermediate_size, args.num_experts
        self.gate_proj = SwitchLinear(E, I, X)
        self.up_proj = SwitchLinear(E, I, X)
        self.down_proj = SwitchLinear(I, E, X)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x B L E, indices B L k -> B L k E (each token through each of its k experts)."""
        B, L, k = indices.shape
        x = mx.expand_dims(x, (-2, -3))                                               # B L 1 1 E
        idx, order = indices, None
        if indices.size >= self.sort_above:
            # Prefill: sort the (token, expert) pairs by expert so each expert's matrix is read once.
            flat = indices.flatten()
            order = mx.argsort(flat)
            x, idx = x.reshape(-1, 1, x.shape[-1])[order // k], flat[order]          # N 1 E, N (N = B L k)
        h = nn.silu(self.gate_proj(x, idx, order is not None)) * self.up_proj(x, idx, order is not None)
        y = self.down_proj(h, idx, order is not None)
        if order is not None:
            y = y[mx.argsort(order)].reshape(B, L, k, 1, -1)                          # back to token order
        return y.squeeze(-2)                                                          # B L k E


class SparseMoeBlock(nn.Module):
    """Router softmax over the X experts, the top k of them per token (renormalized with `norm_topk_prob`),
    and Qwen2-MoE's shared expert scaled by sigmoid(shared_expert_gate(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k, self.norm_topk_prob = args.num_experts_per_tok, args.norm_topk_prob
        self.gate = Linear(args.hidden_size, args.num_experts, bias=False)           # the router
        self.experts = Experts(args)
        self.has_shared_expert = args.shared_expert
        if self.has_shared_expert:
            self.shared_expert = MLP(args, args.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(args.hidden_size, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        k = self.top_k
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)                  # B L X, float32 as in HF
        indices = mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k]               # B L k, in any order
        weights = mx.take_along_axis(probs, indices, axis=-1)                        # B L k
        if self.norm_topk_prob:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        y = self.experts(x, indices)                                                 # B L k E
        y = (y * weights[..., None].astype(y.dtype)).sum(axis=-2)                    # B L E
        if self.has_shared_expert:
            y = y + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y


def stack_experts(weights: dict[str, mx.array], args: ModelArgs) -> dict[str, mx.array]:
    """`...mlp.experts.{j}.<proj>.weight` [out, in] for j < X -> `...mlp.experts.<proj>.weight` [X, out, in]
    (the layout gather_mm reads; mlx-lm's `sanitize` does the same)."""
    out, groups = {}, {}
    for key, value in weights.items():
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(\w+\.weight)", key)
        if m:
            groups.setdefault(f"{m[1]}.{m[3]}", {})[int(m[2])] = value
        else:
            out[key] = value
    for key, parts in groups.items():
        out[key] = mx.stack([parts[j] for j in range(args.num_experts)])
    return out


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, index: int):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = SparseMoeBlock(args) if args.is_moe_layer(index) else MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache: Cache, last_only: bool = False) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        if last_only:  # the cache took every position's keys; the rest only feeds the next token's logits
            h = h[:, -1:, :]
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen2Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, input_ids: mx.array, cache: list[Cache], mask: mx.array | None = None,
                 last_only: bool = False) -> mx.array:
        """input_ids B L -> hidden states B L E, or B 1 E when `last_only`: then the last layer's MLP runs for
        the last position alone (MLX evaluates whole arrays, so slicing after the norm would not spare it)."""
        h = self.embed_tokens(input_ids)                                              # B L E
        if mask is None and input_ids.shape[1] > 1:
            mask = "causal"  # lower-right aligned: new tokens see the whole cache and their own past
        for i, (layer, c) in enumerate(zip(self.layers, cache)):
            h = layer(h, mask, c, last_only and i == len(self.layers) - 1)
        return self.norm(h)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Qwen2Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, input_ids: mx.array, cache: list[Cache], mask: mx.array | None = None,
                 last_only: bool = True) -> mx.array:
        """input_ids B L -> logits B L V, or B 1 V when `last_only` (prefill needs only the next token,
        and the vocabulary projection is the largest matmul of the model)."""
        h = self.model(input_ids, cache, mask, last_only)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """The checkpoint's keys as this model names them: mlx-lm's stacked `switch_mlp` experts are this
        model's `experts`, and experts stored one by one are stacked."""
        return stack_experts({k.replace(".mlp.switch_mlp.", ".mlp.experts."): v for k, v in weights.items()},
                             self.args)

    def make_cache(self, kv_bits: int | None = None, kv_group_size: int = KV_GROUP_SIZE) -> list[Cache]:
        """One cache per layer; with `kv_bits`, keys and values are stored quantized (qwen_mlx/models/cache.py)."""
        return make_cache(len(self.model.layers), kv_bits, kv_group_size)


Model = Qwen2ForCausalLM  # the family's entry point (qwen_mlx/models/__init__.py)
