"""Qwen2, Qwen2-MoE, Qwen3 and Qwen3-MoE in PyTorch: the twin of qwen_mlx/models/qwen2.py, traced to ONNX and run
as the torch backend.

Class for class and name for name the same as the MLX model: diff the two files. What differs is the
cache: ONNX graphs cannot hold state, so the KV cache is explicit tensors in (`past_key_values`) and out
(`presents`), and the attention mask and position ids are inputs, which is how left-padded batches work.
The routed experts gather the selected experts' stacked matrices (`weight[indices]`, an ONNX Gather) and
multiply by them: standard ONNX ops that read k experts per token, never all of them.
A `dual_chunk_attention_config` swaps each layer's attention for Dual Chunk Attention (qwen_mlx/dual_chunk.py;
the code: export/models/dual_chunk.py); the ONNX export refuses such a model.
Shapes: B batch, L new tokens, P cached tokens, T = P + L, H heads, K kv heads, G = H / K, D head_dim,
E hidden size, V vocabulary, X experts, k experts per token, I an MLP's intermediate size.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from qwen_mlx.config import ModelArgs

from .dual_chunk import dual_chunk_attention, dual_chunk_tables

KV = tuple[torch.Tensor, torch.Tensor]
MASKED = -1e30  # additive mask value: finite, so a fully padded query row softmaxes to uniform, not NaN


class RMSNorm(nn.Module):
    """HF's Qwen2RMSNorm: the variance in float32 whatever the dtype (float16 squares overflow)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dims))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RoPE(nn.Module):
    """Rotary embedding with the checkpoint's scaling. cos/sin come from `position_ids` in float32 inside
    the graph, so one export serves any position; dynamic NTK grows the base from the length in-graph."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        inv_freq, self.attention_factor = args.rope_frequencies()
        # A plain attribute, not a buffer: it is not a checkpoint weight, and the tracer makes it a constant.
        self._inv_freq = torch.from_numpy(inv_freq)
        self.dynamic = args.rope_type == "dynamic"

    def inv_freq(self, position_ids: torch.Tensor) -> torch.Tensor:
        if not self.dynamic:
            return self._inv_freq
        # Dynamic NTK as HF does it: the base follows the longest sequence seen, max(position) + 1, once it
        # passes max_position_embeddings (config.rope_frequencies, written with traceable torch ops).
        a = self.args
        dim, mpe, factor = a.rotary_dim, float(a.max_position_embeddings), float(a.rope_scaling["factor"])
        n = torch.clamp(position_ids.max().to(torch.float32) + 1.0, min=mpe)
        base = a.rope_theta * ((factor * n / mpe) - (factor - 1.0)) ** (dim / (dim - 2))
        exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=position_ids.device) / dim
        return 1.0 / torch.pow(base, exponents)

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids B L -> cos, sin B 1 L D (computed once per forward and shared by every layer)."""
        freqs = position_ids.to(torch.float32)[..., None] * self.inv_freq(position_ids).to(position_ids.device)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]                                  # B 1 L D
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:  # yarn's mscale multiplies the rotated vector
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # non-traditional (split-half) rope
        return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        E, H, K, D = args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, K, D
        self.scale = D ** -0.5
        self.q_proj = nn.Linear(E, H * D, bias=args.qkv_has_bias)
        self.k_proj = nn.Linear(E, K * D, bias=args.qkv_has_bias)
        self.v_proj = nn.Linear(E, K * D, bias=args.qkv_has_bias)
        self.o_proj = nn.Linear(H * D, E, bias=args.o_has_bias)
        self.qk_norm = args.qk_norm
        if self.qk_norm:  # Qwen3: RMSNorm over each head's D features of q and k, before RoPE
            self.q_norm = RMSNorm(D, eps=args.rms_norm_eps)
            self.k_norm = RMSNorm(D, eps=args.rms_norm_eps)
        self.rope = RoPE(args)
        # Dual Chunk Attention (qwen_mlx/dual_chunk.py): `cos_sin` is then the model's DualChunkTables.
        self.dual_chunk = args.dual_chunk

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                past: KV) -> tuple[torch.Tensor, KV]:
        B, L, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).reshape(B, L, H, D)                                       # B L H D
        k = self.k_proj(x).reshape(B, L, K, D)                                       # B L K D
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                                  # B H L D, B K L D
        v = self.v_proj(x).reshape(B, L, K, D).transpose(1, 2)                       # B K L D
        if self.dual_chunk is not None:
            o, present = dual_chunk_attention(self.rope, q, k, v, mask, cos_sin, past, self.scale)
            return self.o_proj(o.transpose(1, 2).reshape(B, L, H * D)), present
        q = self.rope(q, *cos_sin)
        k = self.rope(k, *cos_sin)
        k = torch.cat([past[0], k], dim=2)                                           # B K T D
        v = torch.cat([past[1], v], dim=2)                                           # B K T D
        # GQA without tiling the cache: the G query heads of one kv head become extra rows of one matmul.
        G = H // K
        qg = (q * self.scale).reshape(B, K, G * L, D)                                # B K GL D
        scores = torch.matmul(qg, k.transpose(2, 3)).float()                         # B K GL T
        scores = scores.reshape(B, K, G, L, -1) + mask[:, :, None]                   # B K G L T
        probs = torch.softmax(scores, dim=-1).to(v.dtype).reshape(B, K, G * L, -1)  # softmax in float32
        o = torch.matmul(probs, v).reshape(B, H, L, D)                               # B H L D
        return self.o_proj(o.transpose(1, 2).reshape(B, L, H * D)), (k, v)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, intermediate_size: int | None = None):
        super().__init__()
        I = intermediate_size or args.intermediate_size
        self.gate_proj = nn.Linear(args.hidden_size, I, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, I, bias=False)
        self.down_proj = nn.Linear(I, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class SwitchLinear(nn.Module):
    """One projection of every expert, stacked X out in (the checkpoint's `experts.{j}.<proj>.weight`
    [out, in] stacked along j). Each row is multiplied by the matrices of the experts `indices` names,
    gathered from the stack (ONNX Gather + MatMul): no other expert's matrix is read."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, output_dims, input_dims))

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x ... 1|k in, indices ... k -> ... k out"""
        # index_select traces to an ONNX Gather on axis 0 (int4: onnxruntime's GatherBlockQuantized).
        w = torch.index_select(self.weight, 0, indices.reshape(-1)).reshape(*indices.shape, *self.weight.shape[1:])
        return torch.matmul(w, x[..., None]).squeeze(-1)                              # ... k out


class Experts(nn.Module):
    """The routed experts' SwiGLUs; only the k chosen per token are computed."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        E, I, X = args.hidden_size, args.moe_intermediate_size, args.num_experts
        self.gate_proj = SwitchLinear(E, I, X)
        self.up_proj = SwitchLinear(E, I, X)
        self.down_proj = SwitchLinear(I, E, X)

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x B L E, indices B L k -> B L k E (each token through each of its k experts)."""
        x = x[:, :, None, :]                                                          # B L 1 E
        h = F.silu(self.gate_proj(x, indices)) * self.up_proj(x, indices)            # B L k I
        return self.down_proj(h, indices)                                            # B L k E


class SparseMoeBlock(nn.Module):
    """Router softmax over the X experts, the top k of them per token (renormalized with `norm_topk_prob`),
    and Qwen2-MoE's shared expert scaled by sigmoid(shared_expert_gate(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k, self.norm_topk_prob = args.num_experts_per_tok, args.norm_topk_prob
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)        # the router
        self.experts = Experts(args)
        self.has_shared_expert = args.shared_expert
        if self.has_shared_expert:
            self.shared_expert = MLP(args, args.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(args.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.gate(x).float(), dim=-1)                          # B L X, float32 as in HF
        weights, indices = torch.topk(probs, self.top_k, dim=-1)                     # B L k
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        y = self.experts(x, indices)                                                 # B L k E
        y = (y * weights[..., None].to(y.dtype)).sum(dim=-2)                         # B L E
        if self.has_shared_expert:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y


def stack_experts(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """`...mlp.experts.{j}.<proj>.weight` [out, in] for j < X -> `...mlp.experts.<proj>.weight` [X, out, in]."""
    out, groups = {}, {}
    for key, value in weights.items():
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(\w+\.weight)", key)
        if m:
            groups.setdefault(f"{m[1]}.{m[3]}", {})[int(m[2])] = value
        else:
            out[key] = value
    for key, parts in groups.items():
        out[key] = torch.stack([parts[j] for j in range(args.num_experts)])
    return out


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, index: int):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = SparseMoeBlock(args) if args.is_moe_layer(index) else MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                past: KV) -> tuple[torch.Tensor, KV]:
        a, present = self.self_attn(self.input_layernorm(x), mask, cos_sin, past)
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h)), present


def attention_bias(attention_mask: torch.Tensor, L: int) -> torch.Tensor:
    """attention_mask B T (1 = real token, 0 = padding) -> additive float32 mask B 1 L T.

    The L new tokens are the last L of the T positions: query i may see key j when j <= T - L + i
    (causal, lower-right aligned) and key j is not padding.
    """
    T = attention_mask.shape[1]
    query = torch.arange(L, device=attention_mask.device)[:, None] + (T - L)         # L 1
    key = torch.arange(T, device=attention_mask.device)[None, :]                     # 1 T
    allowed = (key <= query)[None] & (attention_mask[:, None, :] != 0)               # B L T
    return torch.where(allowed, 0.0, MASKED).to(torch.float32)[:, None]              # B 1 L T


class Qwen2Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(args, i) for i in range(args.num_hidden_layers)])
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past_key_values: list[KV]) -> tuple[torch.Tensor, list[KV]]:
        h = self.embed_tokens(input_ids)                                              # B L E
        mask = attention_bias(attention_mask, input_ids.shape[1])
        # Every layer's RoPE is the same: compute cos/sin once rather than once per layer in the graph.
        attn = self.layers[0].self_attn
        if attn.dual_chunk is not None:
            cos_sin = dual_chunk_tables(attn.dual_chunk, attn.rope, position_ids, attention_mask, h.dtype)
        else:
            cos_sin = attn.rope.cos_sin(position_ids, h.dtype)
        presents = []
        for layer, past in zip(self.layers, past_key_values):
            h, present = layer(h, mask, cos_sin, past)
            presents.append(present)
        return self.norm(h), presents


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Qwen2Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.last_only = False  # the torch backend sets it: prefill needs only the next token's logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past_key_values: list[KV]) -> tuple[torch.Tensor, list[KV]]:
        """input_ids B L, attention_mask B T, position_ids B L, past K/V B K P D each
        -> logits B L V (B 1 V when `last_only`), presents K/V B K T D each."""
        h, presents = self.model(input_ids, attention_mask, position_ids, past_key_values)
        if self.last_only:
            h = h[:, -1:, :]
        if self.args.tie_word_embeddings:  # one tensor: the embedding is the output projection too
            return F.linear(h, self.model.embed_tokens.weight), presents
        return self.lm_head(h), presents

    def sanitize(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The checkpoint's keys as this model names them: experts stored one by one are stacked."""
        return stack_experts(weights, self.args)

    def empty_cache(self, batch: int = 1) -> list[KV]:
        a = self.args
        p = next(self.parameters())
        shape = (batch, a.num_key_value_heads, 0, a.head_dim)
        return [(p.new_zeros(shape), p.new_zeros(shape)) for _ in range(a.num_hidden_layers)]


Model = Qwen2ForCausalLM  # the family's entry point (export/models/__init__.py)
