"""Qwen3-Next, Qwen3.5 and Qwen3.6 in PyTorch: the twin of qwen_mlx/models/qwen3_next.py, traced to ONNX and run
as the torch backend.

Class for class and name for name the same as the MLX file: diff the two (the architecture is described there).
What differs is the state, as in the dense twin (export/models/qwen2.py): ONNX graphs hold none, so each layer's
past is explicit tensors in and out. A linear layer's past is (conv window B C K-1, recurrent state B Hv Dk Dv),
channels first as HF's cache and the edge runtimes hold it (the MLX file keeps B K-1 C); a full-attention layer's
is (keys, values) B K P D. The attention mask and position ids are inputs: padded positions are zeroed before
a linear layer (as HF does), so left padding leaves a fresh state at zero.
Tracing: the delta rule's loop over chunks is a `scan` (an ONNX Scan), so one graph serves any length; there the
chunked form serves decode steps too (see `delta_rule`).
Shapes: B batch, L new tokens, P cached tokens, E hidden size, H heads, K kv heads, D head_dim; Hk/Hv key/value
heads of a linear layer, Dk/Dv their dims, C = 2 Hk Dk + Hv Dv conv channels, N chunks of Q positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._higher_order_ops.scan import scan

from qwen_mlx.config import ModelArgs
from qwen_mlx.errors import QwenError

from .qwen2 import KV, MLP, RoPE, SparseMoeBlock, attention_bias, stack_experts

CHUNK = 64  # positions per chunk of the delta rule's parallel form (the reference's chunk size)
# A few new positions (a decode step, a speculative step's drafts) run token by token, as on MLX.
RECURRENT_UP_TO = 16
# The chunk of a traced graph, whose one form serves prompts and decode steps alike: small, so that a decode step
# (one position padded to a chunk) costs little, at more carried chunks per prompt. The result does not depend on it.
EXPORT_CHUNK = 16
# The zero-centred norms, which mlx-lm stores as 1 + w (as MLX_LM_PLUS_ONE_NORMS in the MLX file, which this module
# does not import: the twin runs where MLX is not installed).
MLX_LM_PLUS_ONE_NORMS = (".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight",
                         ".q_norm.weight", ".k_norm.weight")


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: x / rms(x) * (1 + weight), the variance in float32."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dims))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class RMSNormGated(nn.Module):
    """The linear layer's output norm: x / rms(x) * weight * silu(z), per value head."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dims))
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return (h.float() * F.silu(z.float())).to(x.dtype)


class DepthwiseConv1d(nn.Module):
    """The causal conv over q, k, v: `weight` C 1 K as the checkpoint stores it, one filter per channel."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels, 1, kernel))

    def forward(self, x: torch.Tensor, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x B L C after the last K-1 inputs `window` (B C K-1, zeros at the start) -> (out B L C, new window)."""
        L, K = x.shape[1], self.weight.shape[-1]
        xs = torch.cat([window, x.transpose(1, 2)], dim=2)                             # B C K-1+L
        w = self.weight[:, 0, :]                                                       # C K
        out = xs[:, :, 0:L] * w[:, 0:1]
        for j in range(1, K):  # K is 4: shifted multiply-adds, as on MLX (torch's grouped conv1d: 30 ms a step)
            out = out + xs[:, :, j:j + L] * w[:, j:j + 1]
        return out.transpose(1, 2), xs[:, :, L:]                                       # the last K-1 inputs


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)  # the reference's (FLA's) epsilon


def _carry(step: Callable[..., tuple[torch.Tensor, torch.Tensor]], state: torch.Tensor,
           xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """state, outs = step(state, *x) along the first axis of every `xs`, outs stacked. While exporting, a `scan`
    (ONNX Scan: the graph takes any count); in eager torch a plain loop (scan would compile the step)."""
    if torch.compiler.is_exporting():
        return scan(lambda s, x: step(s, *x), state.clone(), xs)
    outs = []
    for n in range(xs[0].shape[0]):
        state, out = step(state, *(x[n] for x in xs))
        outs.append(out)
    return state, torch.stack(outs)


def _token_step(state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One position: state B H Dk Dv, q k B H Dk, v B H Dv, g beta B H -> (new state, o B H Dv)."""
    state = state * torch.exp(g)[..., None, None]
    memory = (k[:, :, None, :] @ state)[:, :, 0]                                        # B H Dv
    delta = (v - memory) * beta[..., None]
    state = state + k[..., None] * delta[:, :, None, :]
    # the reads as matmuls (MLX multiplies and sums): one pass over the state each, not a product materialized
    return state, (q[:, :, None, :] @ state)[:, :, 0]


def recurrent_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                         state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token: q, k B H L Dk, v B H L Dv, g, beta B H L, state B H Dk Dv -> (o B H L Dv, state).
    Eager torch only (a traced graph takes the chunked form for every length: see delta_rule)."""
    xs = [t.movedim(2, 0) for t in (q, k, v, g, beta)]                                  # L B H ...
    state, outs = _carry(_token_step, state, xs)
    return outs.movedim(0, 2), state


def _chunk_step(state: torch.Tensor, v_new_base: torch.Tensor, k_decayed: torch.Tensor, q: torch.Tensor,
                intra: torch.Tensor, k: torch.Tensor, chunk_decay: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk given its precomputed terms (see chunked_delta_rule) -> (state after it, o B H Q Dv)."""
    v_new = v_new_base - k_decayed @ state                                              # B H Q Dv
    out = q @ state + intra @ v_new
    return state * chunk_decay + k.transpose(-1, -2) @ v_new, out


def chunked_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                       state: torch.Tensor, Q: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rule over chunks of Q positions: within a chunk the updates are one triangular system (the
    UT transform), solved by inverting I + A, A strictly lower and nilpotent, as the product of
    I + (-A)^(2^i); across chunks the state is carried by a loop (a scan when traced). Shapes as
    recurrent_delta_rule."""
    B, H, L, Dk = q.shape
    pad = (Q - L % Q) % Q  # padded positions have beta = 0 and g = 0: they neither write the state nor decay it
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    N = (L + pad) // Q
    q, k, v = (x.reshape(B, H, N, Q, x.shape[-1]) for x in (q, k, v))                  # B H N Q D
    g, beta = g.reshape(B, H, N, Q), beta.reshape(B, H, N, Q)
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    cum = torch.cumsum(g, dim=-1)                                                       # B H N Q
    ones = torch.ones(Q, Q, dtype=torch.bool, device=q.device)
    lower, strict = torch.tril(ones), torch.tril(ones, -1)
    diff = torch.where(lower, cum[..., :, None] - cum[..., None, :], torch.zeros((), dtype=cum.dtype))
    decay = torch.where(lower, torch.exp(diff), torch.zeros((), dtype=cum.dtype))       # B H N Q Q
    a = torch.where(strict, (k_beta @ k.transpose(-1, -2)) * decay, torch.zeros((), dtype=cum.dtype))
    inverse, power = torch.eye(Q, dtype=a.dtype, device=a.device) - a, -a
    for _ in range(Q.bit_length() - 2):  # (-a)^(2^i) for 2^i < Q; (-a)^Q = 0
        power = power @ power
        inverse = inverse + inverse @ power
    new_values = inverse @ v_beta                                                       # B H N Q Dv
    k_decayed = inverse @ (k_beta * torch.exp(cum)[..., None])                          # B H N Q Dk
    intra = (q @ k.transpose(-1, -2)) * decay                                           # B H N Q Q
    q = q * torch.exp(cum)[..., None]
    k = k * torch.exp(cum[..., -1:] - cum)[..., None]
    chunk_decay = torch.exp(cum[..., -1])[..., None, None]                              # B H N 1 1
    xs = [t.movedim(2, 0) for t in (new_values, k_decayed, q, intra, k, chunk_decay)]   # N B H ...
    state, outs = _carry(_chunk_step, state, xs)
    o = outs.movedim(0, 2).reshape(B, H, N * Q, -1)
    return o.narrow(2, 0, L), state  # narrow, not a slice: the traced length is L exactly


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
               state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager torch, as MLX: the recurrent form for up to RECURRENT_UP_TO new positions, else the chunked one.
    A traced graph takes one form for every length: the chunked rule over chunks of EXPORT_CHUNK, so a decode
    step is one small padded chunk. (A `torch.cond` between the two forms does not trace in torch 2.13: it
    cannot merge the padded branch's symbolic strides.)"""
    if torch.compiler.is_exporting():
        return chunked_delta_rule(q, k, v, g, beta, state, EXPORT_CHUNK)
    rule = recurrent_delta_rule if q.shape[2] <= RECURRENT_UP_TO else chunked_delta_rule
    return rule(q, k, v, g, beta, state)


class GatedDeltaNet(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        E = args.hidden_size
        self.Hk, self.Hv = args.linear_num_key_heads, args.linear_num_value_heads
        self.Dk, self.Dv = args.linear_key_head_dim, args.linear_value_head_dim
        kd, vd = self.Hk * self.Dk, self.Hv * self.Dv
        self.packed = args.packed_linear_projections
        if self.packed:  # Qwen3-Next: [q k v z] and [b a] grouped per key head
            self.in_proj_qkvz = nn.Linear(E, 2 * kd + 2 * vd, bias=False)
            self.in_proj_ba = nn.Linear(E, 2 * self.Hv, bias=False)
        else:  # Qwen3.5
            self.in_proj_qkv = nn.Linear(E, 2 * kd + vd, bias=False)
            self.in_proj_z = nn.Linear(E, vd, bias=False)
            self.in_proj_b = nn.Linear(E, self.Hv, bias=False)
            self.in_proj_a = nn.Linear(E, self.Hv, bias=False)
        self.conv1d = DepthwiseConv1d(2 * kd + vd, args.linear_conv_kernel_dim)
        self.dt_bias = nn.Parameter(torch.ones(self.Hv))
        self.A_log = nn.Parameter(torch.zeros(self.Hv))
        self.norm = RMSNormGated(self.Dv, args.rms_norm_eps)
        self.out_proj = nn.Linear(vd, E, bias=False)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x B L E -> (qkv B L C in the conv's channel order, z B L Hv Dv, b and a B L Hv)."""
        B, L, _ = x.shape
        Hk, Hv, Dk, Dv = self.Hk, self.Hv, self.Dk, self.Dv
        if not self.packed:
            return (self.in_proj_qkv(x), self.in_proj_z(x).reshape(B, L, Hv, Dv), self.in_proj_b(x),
                    self.in_proj_a(x))
        r = Hv // Hk
        qkvz = self.in_proj_qkvz(x).reshape(B, L, Hk, 2 * Dk + 2 * r * Dv)
        q, k, v, z = torch.split(qkvz, [Dk, Dk, r * Dv, r * Dv], dim=-1)
        ba = self.in_proj_ba(x).reshape(B, L, Hk, 2 * r)
        qkv = torch.cat([q.reshape(B, L, -1), k.reshape(B, L, -1), v.reshape(B, L, -1)], dim=-1)
        return qkv, z.reshape(B, L, Hv, Dv), ba[..., :r].reshape(B, L, Hv), ba[..., r:].reshape(B, L, Hv)

    def forward(self, x: torch.Tensor, past: KV) -> tuple[torch.Tensor, KV]:
        """x B L E, past (window B C K-1, state B Hv Dk Dv) -> (out B L E, present of the same shapes)."""
        B, L, _ = x.shape
        Hk, Hv, Dk, Dv = self.Hk, self.Hv, self.Dk, self.Dv
        qkv, z, b, a = self._project(x)
        qkv, window = self.conv1d(qkv, past[0])
        qkv = F.silu(qkv)
        q, k, v = torch.split(qkv, [Hk * Dk, Hk * Dk, Hv * Dv], dim=-1)
        f32 = torch.float32  # the rule runs in float32 whatever the weights, as the reference does
        q = _l2norm(q.reshape(B, L, Hk, Dk).to(f32)) * Dk ** -0.5
        k = _l2norm(k.reshape(B, L, Hk, Dk).to(f32))
        if Hv > Hk:  # each key head serves Hv / Hk consecutive value heads
            q, k = q.repeat_interleave(Hv // Hk, dim=2), k.repeat_interleave(Hv // Hk, dim=2)
        v = v.reshape(B, L, Hv, Dv).to(f32)
        beta = torch.sigmoid(b.to(f32))
        g = -torch.exp(self.A_log.to(f32)) * F.softplus(a.to(f32) + self.dt_bias.to(f32))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                                # B Hv L D
        g, beta = g.transpose(1, 2), beta.transpose(1, 2)                               # B Hv L
        o, state = delta_rule(q, k, v, g, beta, past[1].to(f32))
        o = self.norm(o.transpose(1, 2).to(x.dtype), z)                                 # B L Hv Dv
        return self.out_proj(o.reshape(B, L, -1)), (window, state.to(past[1].dtype))


class Attention(nn.Module):
    """Gated attention: softmax attention whose output is scaled by sigmoid(gate), a second half of q_proj."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        E, H, K, D = args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, K, D
        self.scale = D ** -0.5
        self.q_proj = nn.Linear(E, 2 * H * D, bias=args.qkv_has_bias)
        self.k_proj = nn.Linear(E, K * D, bias=args.qkv_has_bias)
        self.v_proj = nn.Linear(E, K * D, bias=args.qkv_has_bias)
        self.o_proj = nn.Linear(H * D, E, bias=args.o_has_bias)
        self.q_norm = RMSNorm(D, args.rms_norm_eps)
        self.k_norm = RMSNorm(D, args.rms_norm_eps)
        self.rope = RoPE(args)
        self.rotary_dim = args.rotary_dim  # RoPE turns the first rotary_dim features of each head

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        d = self.rotary_dim
        return self.rope(x, cos, sin) if d == self.head_dim else torch.cat([self.rope(x[..., :d], cos, sin),
                                                                             x[..., d:]], dim=-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                past: KV) -> tuple[torch.Tensor, KV]:
        B, L, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, gate = torch.chunk(self.q_proj(x).reshape(B, L, H, 2 * D), 2, dim=-1)      # B L H D
        q = self.q_norm(q).transpose(1, 2)                                            # B H L D
        k = self.k_norm(self.k_proj(x).reshape(B, L, K, D)).transpose(1, 2)           # B K L D
        v = self.v_proj(x).reshape(B, L, K, D).transpose(1, 2)
        q, k = self._rope(q, *cos_sin), self._rope(k, *cos_sin)
        k = torch.cat([past[0], k], dim=2)                                            # B K T D
        v = torch.cat([past[1], v], dim=2)
        G = H // K  # GQA without tiling the cache, as the dense twin
        qg = (q * self.scale).reshape(B, K, G * L, D)                                 # B K GL D
        scores = torch.matmul(qg, k.transpose(2, 3)).float().reshape(B, K, G, L, -1) + mask[:, :, None]
        probs = torch.softmax(scores, dim=-1).to(v.dtype).reshape(B, K, G * L, -1)
        o = torch.matmul(probs, v).reshape(B, H, L, D).transpose(1, 2).reshape(B, L, H * D)
        return self.o_proj(o * torch.sigmoid(gate.reshape(B, L, -1))), (k, v)


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor,
                cos_sin: tuple[torch.Tensor, torch.Tensor], past: KV) -> tuple[torch.Tensor, KV]:
        """`keep` B L 1: 0 at padded new positions, which a linear layer must not see (HF zeroes them too)."""
        y = self.input_layernorm(x)
        if self.linear:
            a, present = self.linear_attn(y * keep, past)
        else:
            a, present = self.self_attn(y, mask, cos_sin, past)
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h)), present


class Qwen3NextModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(args, i) for i in range(args.num_hidden_layers)])
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past_key_values: list[KV]) -> tuple[torch.Tensor, list[KV]]:
        h = self.embed_tokens(input_ids)                                               # B L E
        L = input_ids.shape[1]
        mask = attention_bias(attention_mask, L)
        keep = (attention_mask[:, -L:] != 0).to(h.dtype)[..., None]                    # B L 1
        attn = next(layer.self_attn for layer in self.layers if not layer.linear)
        cos_sin = attn.rope.cos_sin(position_ids, h.dtype)  # once per forward, shared by the attention layers
        presents = []
        for layer, past in zip(self.layers, past_key_values):
            h, present = layer(h, mask, keep, cos_sin, past)
            presents.append(present)
        return self.norm(h), presents


class Qwen3NextForCausalLM(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Qwen3NextModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.last_only = False  # the torch backend sets it: prefill needs only the next token's logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past_key_values: list[KV]) -> tuple[torch.Tensor, list[KV]]:
        """input_ids B L, attention_mask B T, position_ids B L, past per layer (window, state) or (keys, values)
        -> logits B L V (B 1 V when `last_only`), presents of the same kinds."""
        h, presents = self.model(input_ids, attention_mask, position_ids, past_key_values)
        if self.last_only:
            h = h[:, -1:, :]
        if self.args.tie_word_embeddings:  # one tensor: the embedding is the output projection too
            return F.linear(h, self.model.embed_tokens.weight), presents
        return self.lm_head(h), presents

    def sanitize(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The checkpoint's keys as this model names them: mlx-lm's layout undone (qwen_mlx's `from_mlx_lm`),
        experts stored fused (`experts.gate_up_proj` X 2I E, `experts.down_proj` X E I) split into the stacked
        `experts.<proj>.weight`, and experts stored one by one stacked."""
        mlx_lm = [v.shape[-1] == 1 and v.shape[1] != 1 for k, v in weights.items() if k.endswith(".conv1d.weight")]
        if any(mlx_lm) and not all(mlx_lm):
            raise QwenError("the linear layers' conv1d weights are stored in both HF's C 1 K and mlx-lm's C K 1 "
                            "layouts; a checkpoint holds one")
        if any(mlx_lm):  # mlx-lm's C K 1 conv, and its zero-centred norms stored as 1 + w
            weights = {k: v.transpose(1, 2) if k.endswith(".conv1d.weight") else
                       v - 1 if k.endswith(MLX_LM_PLUS_ONE_NORMS) else v for k, v in weights.items()}
        out = {}
        for key, value in weights.items():
            if key.endswith(".mlp.experts.gate_up_proj"):
                prefix, i = key.removesuffix("gate_up_proj"), value.shape[1] // 2
                out[prefix + "gate_proj.weight"], out[prefix + "up_proj.weight"] = value[:, :i], value[:, i:]
            elif key.endswith(".mlp.experts.down_proj"):
                out[key + ".weight"] = value
            else:
                out[key] = value
        return stack_experts(out, self.args)

    def empty_cache(self, batch: int = 1) -> list[KV]:
        """Per layer: a zero window and state (linear), or empty keys and values (attention)."""
        a = self.args
        p = next(self.parameters())
        C = 2 * a.linear_num_key_heads * a.linear_key_head_dim + a.linear_num_value_heads * a.linear_value_head_dim
        conv = (batch, C, a.linear_conv_kernel_dim - 1)
        state = (batch, a.linear_num_value_heads, a.linear_key_head_dim, a.linear_value_head_dim)
        kv = (batch, a.num_key_value_heads, 0, a.head_dim)
        return [(p.new_zeros(conv), p.new_zeros(state, dtype=torch.float32)) if layer.linear else
                (p.new_zeros(kv), p.new_zeros(kv)) for layer in self.model.layers]


Model = Qwen3NextForCausalLM  # the family's entry point (export/models/__init__.py)
