"""Qwen3-Next, Qwen3.5 and Qwen3.6 in MLX: the hybrid family, attribute names equal to the checkpoint's keys.

Most layers are Gated DeltaNet (`linear_attention` in `layer_types`): linear attention whose past is a
fixed-size recurrent state, not keys and values. Every `full_attention_interval`-th layer is gated softmax
attention. What differs from the Qwen2/Qwen3 decoder (qwen2.py, whose MLP, experts, RoPE and forward are reused):
- GatedDeltaNet: q, k, v (and the output gate z, and per value head b and a) are projected; q, k, v pass a
  causal depthwise conv of `linear_conv_kernel_dim` taps and SiLU; q and k are L2-normalized; with
  beta = sigmoid(b) and the decay g = -exp(A_log) * softplus(a + dt_bias), the state S [Dk, Dv] of each value
  head follows the gated delta rule S <- exp(g) S + beta k (v - exp(g) S^T k)^T, read as o = S^T q. Prompts
  run it in chunks (`chunked_delta_rule`), a decode step as one update (`recurrent_delta_rule`): the same
  arithmetic in another order. Its output is RMS-normed per head and gated by SiLU(z).
- Qwen3-Next packs the projections per key head (`in_proj_qkvz`, `in_proj_ba`); Qwen3.5 stores them apart
  (`in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`). Value heads may outnumber key heads.
- Attention: q_proj also yields a sigmoid output gate per head; q and k are RMS-normed per head; RoPE turns
  only the first `partial_rotary_factor` of each head (text-only input: Qwen3.5's three position streams
  are equal, so its multimodal RoPE is this one).
- RMSNorm is zero-centred: checkpoints store w and the norm scales by 1 + w (the gated norm excepted).
- MoE layers: Qwen3-MoE's routed experts plus a sigmoid-gated shared expert.
Caches (qwen_mlx/models/cache.py): a `RecurrentCache` per linear layer, a KV cache per attention layer.
The reference is HF transformers' modeling_qwen3_next.py / modeling_qwen3_5.py; tests/test_hybrid.py checks it.
Shapes: B batch, L new tokens, E hidden size, H heads, K kv heads, D head_dim; Hk/Hv key/value heads of a
linear layer, Dk/Dv their dims, C = 2 Hk Dk + Hv Dv conv channels, N chunks of Q positions.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelArgs
from ..errors import QwenError
from .base import attention_weights, scaled_dot_product_attention
from .cache import KV_GROUP_SIZE, Cache, KVCache, QuantizedKVCache, RecurrentCache
from .layers import Linear
from .qwen2 import MLP, Qwen2ForCausalLM, Qwen2Model, RoPE, SparseMoeBlock

CHUNK = 64  # positions per chunk of the delta rule's parallel form (the reference's chunk size)
# A few new positions (a speculative step's drafts) run token by token: a decode step's own arithmetic, so
# verifying drafts rounds as decoding them one at a time would.
RECURRENT_UP_TO = 16


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: x / rms(x) * (1 + weight)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)


class RMSNormGated(nn.Module):
    """The linear layer's output norm: x / rms(x) * weight * silu(z), per value head."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array, z: mx.array) -> mx.array:
        y = mx.fast.rms_norm(x, self.weight, self.eps)
        return (y.astype(mx.float32) * nn.silu(z.astype(mx.float32))).astype(x.dtype)


class DepthwiseConv1d(nn.Module):
    """The causal conv over q, k, v: `weight` C 1 K as the checkpoint stores it, one filter per channel."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = mx.zeros((channels, 1, kernel))

    def __call__(self, x: mx.array, window: mx.array | None) -> tuple[mx.array, mx.array]:
        """x B L C after the last K-1 inputs `window` (B K-1 C, zeros at the start) -> (out B L C, new window)."""
        B, L, C = x.shape
        K = self.weight.shape[-1]
        if window is None:
            window = mx.zeros((B, K - 1, C), x.dtype)
        xs = mx.concatenate([window, x], axis=1)                                      # B K-1+L C
        w = self.weight[:, 0, :].T                                                    # K C
        out = xs[:, 0:L] * w[0]
        for j in range(1, K):  # K is 4: four shifted multiply-adds beat a general conv here
            out = out + xs[:, j:j + L] * w[j]
        return out, mx.contiguous(xs[:, L:])  # its own K-1 positions: a view would keep the whole chunk alive


def _l2norm(x: mx.array) -> mx.array:
    return x * mx.rsqrt((x * x).sum(axis=-1, keepdims=True) + 1e-6)  # the reference's (FLA's) epsilon


def recurrent_delta_rule(q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array,
                         state: mx.array) -> tuple[mx.array, mx.array]:
    """Token by token: q, k B H L Dk, v B H L Dv, g, beta B H L, state B H Dk Dv -> (o B H L Dv, state)."""
    outs = []
    for t in range(q.shape[2]):
        state = state * mx.exp(g[:, :, t])[..., None, None]
        kt = k[:, :, t, :, None]                                                      # B H Dk 1
        memory = (state * kt).sum(axis=-2)                                            # B H Dv
        delta = (v[:, :, t] - memory) * beta[:, :, t, None]
        state = state + kt * delta[:, :, None, :]
        outs.append((state * q[:, :, t, :, None]).sum(axis=-2))
    return mx.stack(outs, axis=2), state


def chunked_delta_rule(q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array,
                       state: mx.array) -> tuple[mx.array, mx.array]:
    """The same rule over chunks of Q positions: within a chunk the updates are one triangular system (the
    UT transform), solved by inverting I + A, A strictly lower and nilpotent, as the product of
    I + (-A)^(2^i); across chunks the state is carried once per chunk. Shapes as recurrent_delta_rule."""
    B, H, L, Dk = q.shape
    Q = CHUNK
    pad = -L % Q
    if pad:  # padded positions have beta = 0 and g = 0: they neither write the state nor decay it
        q, k, v = (mx.pad(x, [(0, 0), (0, 0), (0, pad), (0, 0)]) for x in (q, k, v))
        g, beta = (mx.pad(x, [(0, 0), (0, 0), (0, pad)]) for x in (g, beta))
    N = (L + pad) // Q
    q, k, v = (x.reshape(B, H, N, Q, x.shape[-1]) for x in (q, k, v))                # B H N Q D
    g, beta = g.reshape(B, H, N, Q), beta.reshape(B, H, N, Q)
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    cum = mx.cumsum(g, axis=-1)                                                       # B H N Q
    lower, strict = mx.tril(mx.ones((Q, Q))) > 0, mx.tril(mx.ones((Q, Q)), -1) > 0
    decay = mx.where(lower, mx.exp(mx.where(lower, cum[..., :, None] - cum[..., None, :], 0)), 0)  # B H N Q Q
    a = mx.where(strict, (k_beta @ k.swapaxes(-1, -2)) * decay, 0)
    inverse, power = mx.eye(Q) - a, -a
    for _ in range(Q.bit_length() - 2):  # (-a)^(2^i) for 2^i < Q; (-a)^Q = 0
        power = power @ power
        inverse = inverse + inverse @ power
    new_values = inverse @ v_beta                                                     # B H N Q Dv
    k_decayed = inverse @ (k_beta * mx.exp(cum)[..., None])                           # B H N Q Dk
    intra = (q @ k.swapaxes(-1, -2)) * decay                                          # B H N Q Q
    q = q * mx.exp(cum)[..., None]
    k = k * mx.exp(cum[..., -1:] - cum)[..., None]
    chunk_decay = mx.exp(cum[..., -1])[..., None, None]                               # B H N 1 1
    outs = []
    for n in range(N):
        v_new = new_values[:, :, n] - k_decayed[:, :, n] @ state                      # B H Q Dv
        outs.append(q[:, :, n] @ state + intra[:, :, n] @ v_new)
        state = state * chunk_decay[:, :, n] + k[:, :, n].swapaxes(-1, -2) @ v_new
    return mx.concatenate(outs, axis=2)[:, :, :L], state


class GatedDeltaNet(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        E = args.hidden_size
        self.Hk, self.Hv = args.linear_num_key_heads, args.linear_num_value_heads
        self.Dk, self.Dv = args.linear_key_head_dim, args.linear_value_head_dim
        kd, vd = self.Hk * self.Dk, self.Hv * self.Dv
        self.packed = args.packed_linear_projections
        if self.packed:  # Qwen3-Next: [q k v z] and [b a] grouped per key head
            self.in_proj_qkvz = Linear(E, 2 * kd + 2 * vd, bias=False)
            self.in_proj_ba = Linear(E, 2 * self.Hv, bias=False)
        else:  # Qwen3.5
            self.in_proj_qkv = Linear(E, 2 * kd + vd, bias=False)
            self.in_proj_z = Linear(E, vd, bias=False)
            self.in_proj_b = Linear(E, self.Hv, bias=False)
            self.in_proj_a = Linear(E, self.Hv, bias=False)
        self.conv1d = DepthwiseConv1d(2 * kd + vd, args.linear_conv_kernel_dim)
        self.dt_bias = mx.ones((self.Hv,))
        self.A_log = mx.zeros((self.Hv,))
        self.norm = RMSNormGated(self.Dv, args.rms_norm_eps)
        self.out_proj = Linear(vd, E, bias=False)

    def _project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        """x B L E -> (qkv B L C in the conv's channel order, z B L Hv Dv, b and a B L Hv)."""
        B, L, _ = x.shape
        Hk, Hv, Dk, Dv = self.Hk, self.Hv, self.Dk, self.Dv
        if not self.packed:
            return (self.in_proj_qkv(x), self.in_proj_z(x).reshape(B, L, Hv, Dv), self.in_proj_b(x),
                    self.in_proj_a(x))
        r = Hv // Hk
        qkvz = self.in_proj_qkvz(x).reshape(B, L, Hk, 2 * Dk + 2 * r * Dv)
        q, k, v, z = mx.split(qkvz, [Dk, 2 * Dk, 2 * Dk + r * Dv], axis=-1)
        ba = self.in_proj_ba(x).reshape(B, L, Hk, 2 * r)
        qkv = mx.concatenate([q.reshape(B, L, -1), k.reshape(B, L, -1), v.reshape(B, L, -1)], axis=-1)
        return qkv, z.reshape(B, L, Hv, Dv), ba[..., :r].reshape(B, L, Hv), ba[..., r:].reshape(B, L, Hv)

    def __call__(self, x: mx.array, cache: RecurrentCache) -> mx.array:
        B, L, _ = x.shape
        Hk, Hv, Dk, Dv = self.Hk, self.Hv, self.Dk, self.Dv
        qkv, z, b, a = self._project(x)
        qkv, window = self.conv1d(qkv, cache.conv)
        qkv = nn.silu(qkv)
        q, k, v = mx.split(qkv, [Hk * Dk, 2 * Hk * Dk], axis=-1)
        f32 = mx.float32  # the rule runs in float32 whatever the weights, as the reference does
        q = _l2norm(q.reshape(B, L, Hk, Dk).astype(f32)) * Dk ** -0.5
        k = _l2norm(k.reshape(B, L, Hk, Dk).astype(f32))
        if Hv > Hk:  # each key head serves Hv / Hk consecutive value heads
            q, k = mx.repeat(q, Hv // Hk, axis=2), mx.repeat(k, Hv // Hk, axis=2)
        v = v.reshape(B, L, Hv, Dv).astype(f32)
        beta = mx.sigmoid(b.astype(f32))
        g = -mx.exp(self.A_log.astype(f32)) * nn.softplus(a.astype(f32) + self.dt_bias.astype(f32))
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))                        # B Hv L D
        g, beta = g.transpose(0, 2, 1), beta.transpose(0, 2, 1)                        # B Hv L
        state = cache.recurrent if cache.recurrent is not None else mx.zeros((B, Hv, Dk, Dv), f32)
        rule = recurrent_delta_rule if L <= RECURRENT_UP_TO else chunked_delta_rule
        o, state = rule(q, k, v, g, beta, state)
        cache.update(window, state, L)
        o = self.norm(o.transpose(0, 2, 1, 3).astype(x.dtype), z)                     # B L Hv Dv
        return self.out_proj(o.reshape(B, L, -1))


class Attention(nn.Module):
    """Gated attention: softmax attention whose output is scaled by sigmoid(gate), a second half of q_proj."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        E, H, K, D = args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, K, D
        self.scale = D ** -0.5
        self.q_proj = Linear(E, 2 * H * D, bias=args.qkv_has_bias)
        self.k_proj = Linear(E, K * D, bias=args.qkv_has_bias)
        self.v_proj = Linear(E, K * D, bias=args.qkv_has_bias)
        self.o_proj = Linear(H * D, E, bias=args.o_has_bias)
        self.q_norm = RMSNorm(D, args.rms_norm_eps)
        self.k_norm = RMSNorm(D, args.rms_norm_eps)
        self.rope = RoPE(args)
        self.on_weights: Callable[[mx.array], None] | None = None  # attention maps, as qwen2.Attention's

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache: Cache) -> mx.array:
        B, L, _ = x.shape
        q, gate = mx.split(self.q_proj(x).reshape(B, L, self.n_heads, 2 * self.head_dim), 2, axis=-1)  # B L H D
        q = self.q_norm(q).transpose(0, 2, 1, 3)                                      # B H L D
        k = self.k_norm(self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)  # B K L D
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q, k = self.rope(q, cache.offset), self.rope(k, cache.offset)
        k, v = cache.update(k, v)                                                     # B K T D
        if self.on_weights is not None:
            self.on_weights(attention_weights(q, k, self.scale, mask))
        o = scaled_dot_product_attention(q, k, v, cache, self.scale, mask)           # B H L D
        o = o.transpose(0, 2, 1, 3).reshape(B, L, -1) * mx.sigmoid(gate.reshape(B, L, -1))
        return self.o_proj(o)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, index: int):
        super().__init__()
        self.linear = args.layer_types[index] == "linear_attention"
        if self.linear:
            self.linear_attn = GatedDeltaNet(args)
        else:
            self.self_attn = Attention(args)
        self.mlp = SparseMoeBlock(args) if args.is_moe_layer(index) else MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache: Cache, last_only: bool = False) -> mx.array:
        y = self.input_layernorm(x)
        h = x + (self.linear_attn(y, cache) if self.linear else self.self_attn(y, mask, cache))
        if last_only:  # the caches took every position; the rest only feeds the next token's logits
            h = h[:, -1:, :]
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3NextModel(Qwen2Model):
    """The decoder stack: the dense family's forward over this family's layers and zero-centred final norm."""

    def __init__(self, args: ModelArgs):
        nn.Module.__init__(self)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Qwen3NextForCausalLM(Qwen2ForCausalLM):
    """The dense family's head and forward over Qwen3NextModel; its own checkpoint renames and caches."""

    def __init__(self, args: ModelArgs):
        nn.Module.__init__(self)
        self.args = args
        self.model = Qwen3NextModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """The checkpoint's keys as this model names them: experts stored fused (transformers 5's
        `experts.gate_up_proj` X 2I E and `experts.down_proj` X E I) or mlx-lm's `switch_mlp` become the stacked
        `experts.<proj>.weight`, and experts stored one by one are stacked. A folder mlx-lm wrote is turned back
        into the checkpoint's layout first (`from_mlx_lm`)."""
        if stored_by_mlx_lm(weights):
            weights = from_mlx_lm(weights)
        out = {}
        for key, value in weights.items():
            if key.endswith(".mlp.experts.gate_up_proj"):
                prefix, i = key.removesuffix("gate_up_proj"), value.shape[1] // 2
                out[prefix + "gate_proj.weight"], out[prefix + "up_proj.weight"] = value[:, :i], value[:, i:]
            elif key.endswith(".mlp.experts.down_proj"):
                out[key + ".weight"] = value
            else:
                out[key] = value
        return super().sanitize(out)  # switch_mlp renamed, experts stored one by one stacked

    def make_cache(self, kv_bits: int | None = None, kv_group_size: int = KV_GROUP_SIZE) -> list[Cache]:
        """A recurrent state per linear layer; per attention layer a KV cache (quantized with `kv_bits`)."""
        return [RecurrentCache() if layer.linear else
                QuantizedKVCache(kv_bits, kv_group_size) if kv_bits else KVCache() for layer in self.model.layers]


# The zero-centred norms (scaled by 1 + w here): mlx-lm runs them as plain RMSNorm, so it stores 1 + w. The linear
# layer's gated norm (`linear_attn.norm`) scales by w in both.
MLX_LM_PLUS_ONE_NORMS = (".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight",
                         ".q_norm.weight", ".k_norm.weight")


def stored_by_mlx_lm(weights: dict[str, mx.array]) -> bool:
    """Whether the weights are in mlx-lm's layout, told as mlx-lm's own sanitize tells it: the depthwise conv weight
    is C K 1 (MLX's Conv1d) there, C 1 K in HF checkpoints. mlx-lm sanitizes the norms in the same step, so the
    conv's layout says theirs too. A folder mixing both is refused: its norms could be read either way."""
    convs = [v.shape for k, v in weights.items() if k.endswith(".conv1d.weight")]
    mlx_lm = [s[-1] == 1 and s[1] != 1 for s in convs]
    if any(mlx_lm) and not all(mlx_lm):
        raise QwenError("the linear layers' conv1d weights are stored in both HF's C 1 K and mlx-lm's C K 1 "
                        "layouts; a checkpoint holds one")
    return any(mlx_lm)


def from_mlx_lm(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """mlx-lm's layout -> the checkpoint's: conv weight C K 1 -> C 1 K, and w back from the stored 1 + w of the
    zero-centred norms (exact where 1 + w >= 0.5, as a subtraction of 1 is, so the norm's 1 + w is the stored
    value again)."""
    def undo(key: str, value: mx.array) -> mx.array:
        if key.endswith(".conv1d.weight"):
            return value.swapaxes(1, 2)
        return value - 1 if key.endswith(MLX_LM_PLUS_ONE_NORMS) else value
    return {key: undo(key, value) for key, value in weights.items()}


Model = Qwen3NextForCausalLM  # the family's entry point (qwen_mlx/models/__init__.py)
