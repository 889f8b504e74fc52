"""Qwen2 in MLX: one readable file, attribute names equal to the checkpoint's keys.

export/model.py is its PyTorch twin, class for class and name for name: diff the two files.
Shapes: B batch, L new tokens, T cached + new tokens, H heads, K kv heads, D head_dim, E hidden size.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import ModelArgs


class KVCache:
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

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]


class RoPE(nn.Module):
    """Rotary embedding with the checkpoint's scaling, on MLX's fused kernel (`mx.fast.rope`)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        inv_freq, self.attention_factor = args.rope_frequencies()
        self._freqs = mx.array(1.0 / inv_freq)  # mx.fast.rope takes periods, not inverse frequencies
        self.dynamic = args.rope_type == "dynamic"

    def __call__(self, x: mx.array, offset: int) -> mx.array:
        freqs = self._freqs
        if self.dynamic and offset + x.shape[2] > self.args.max_position_embeddings:
            # Dynamic NTK: the base grows with the sequence, as HF recomputes it past the trained length.
            freqs = mx.array(1.0 / self.args.rope_frequencies(offset + x.shape[2])[0])
        if self.attention_factor != 1.0:  # yarn scales cos and sin, i.e. the rotated vector
            x = x * self.attention_factor
        return mx.fast.rope(x, x.shape[-1], traditional=False, base=None, scale=1.0, offset=offset,
                            freqs=freqs)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        E, H, K, D = args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, K, D
        self.scale = D ** -0.5
        self.q_proj = nn.Linear(E, H * D, bias=True)
        self.k_proj = nn.Linear(E, K * D, bias=True)
        self.v_proj = nn.Linear(E, K * D, bias=True)
        self.o_proj = nn.Linear(H * D, E, bias=False)
        self.rope = RoPE(args)

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache: KVCache) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)     # B H L D
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)  # B K L D
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)  # B K L D
        q = self.rope(q, cache.offset)
        k = self.rope(k, cache.offset)
        k, v = cache.update(k, v)                                                     # B K T D
        # GQA without tiling: the fused kernel maps each group of H/K query heads to its kv head.
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)  # B H L D
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache: KVCache) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen2Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, input_ids: mx.array, cache: list[KVCache], mask: mx.array | None = None) -> mx.array:
        h = self.embed_tokens(input_ids)                                              # B L E
        if mask is None and input_ids.shape[1] > 1:
            mask = "causal"  # lower-right aligned: new tokens see the whole cache and their own past
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.norm(h)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Qwen2Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, input_ids: mx.array, cache: list[KVCache], mask: mx.array | None = None,
                 last_only: bool = True) -> mx.array:
        """input_ids B L -> logits B L V, or B 1 V when `last_only` (prefill needs only the next token,
        and the vocabulary projection is the largest matmul of the model)."""
        h = self.model(input_ids, cache, mask)
        if last_only:
            h = h[:, -1:, :]
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.model.layers]
