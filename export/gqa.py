"""The `--attention gqa` graph form: one com.microsoft GroupQueryAttention node per layer, RoPE inside it.

onnxruntime-genai's model builder writes attention this way; its runtime then shares one KV buffer between
past and present (`past_present_share_buffer`). The twin is traced as usual except that each layer's
attention core (RoPE, the cache concatenation, masking, softmax) is one torch custom op,
`qwen_mlx::group_query_attention`, which the dynamo exporter translates to the contrib op
(custom_translation_table). The projections, Qwen3's q/k norms and everything else stay the twin's.

What the op assumes, and so what this form can represent (check_gqa_supported refuses the rest):
- Lengths come from the attention mask as the builder derives them: seqlens_k = sum(mask, -1) - 1 (int32,
  [B]), total_sequence_length = mask.shape[1] (int32 scalar). Every row's tokens sit at the start of its
  cache (right padding); row b's new tokens take positions seqlens_k[b] + 1 - L ... seqlens_k[b] (a first
  prompt, total == L, takes 0 ... L - 1). A left-padded batch breaks that: its positions and masked keys
  come out wrong, so runners of this graph must not left-pad (OnnxBackend runs one sequence, and its
  batched engine steps aside for this graph). The builder's GQA graphs assume the same. `position_ids` is
  not an input: the op derives positions from seqlens_k.
- RoPE is a [context, head_dim / 2] cos/sin table indexed by position: default, linear and yarn scalings
  (yarn's attention factor multiplies both tables) are exact; dynamic NTK, whose frequencies depend on the
  sequence length, is not representable. Dual Chunk Attention remaps positions per chunk: refused too.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from qwen_mlx.config import ModelArgs
from qwen_mlx.errors import QwenError

from .models.qwen2 import KV, Attention, Qwen2ForCausalLM

ATTENTION_FORMS = ("standard", "gqa")


def check_gqa_supported(args: ModelArgs) -> None:
    """QwenError naming the reason when GroupQueryAttention cannot compute this model exactly."""
    if args.hybrid:
        raise QwenError(f"--attention gqa: {args.model_type}'s gated attention (a sigmoid output gate, partial "
                        "RoPE) and its Gated DeltaNet layers are not in GroupQueryAttention's form; export with "
                        "--attention standard")
    if args.rope_type == "dynamic":
        raise QwenError("--attention gqa: dynamic NTK RoPE scaling changes the frequencies with the sequence "
                        "length, and GroupQueryAttention reads a fixed cos/sin table; export with "
                        "--attention standard")
    if args.dual_chunk is not None:  # export_onnx refuses it first; kept so the check stands on its own
        raise QwenError("--attention gqa: Dual Chunk Attention remaps positions per chunk, which "
                        "GroupQueryAttention's rotary cannot express")
    if args.head_dim % 16:  # onnxruntime's kernels (CPU included) refuse other head sizes at run time
        raise QwenError(f"--attention gqa: onnxruntime's GroupQueryAttention needs head_dim to be a multiple of "
                        f"16 (this model has {args.head_dim}); export with --attention standard")
    if args.num_attention_heads % args.num_key_value_heads:
        raise QwenError("--attention gqa: GroupQueryAttention needs num_attention_heads to be a multiple of "
                        "num_key_value_heads")


def rope_tables(args: ModelArgs, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [context, head_dim / 2]: the op rotates split halves (rotary_interleaved=0), as the twin."""
    inv_freq, factor = args.rope_frequencies()
    positions = np.arange(args.context_length, dtype=np.float32)[:, None]
    freqs = positions * inv_freq[None]                                                # C D/2, float32
    cos, sin = np.cos(freqs) * np.float32(factor), np.sin(freqs) * np.float32(factor)
    return torch.from_numpy(cos.astype(np.float32)).to(dtype), torch.from_numpy(sin.astype(np.float32)).to(dtype)


# ---- the custom op: eager reference, shape function, ONNX translation --------------------------------------

@torch.library.custom_op("qwen_mlx::group_query_attention", mutates_args=())
def group_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                          past_value: torch.Tensor, seqlens_k: torch.Tensor, total_sequence_length: torch.Tensor,
                          cos_cache: torch.Tensor, sin_cache: torch.Tensor, num_heads: int, kv_num_heads: int,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupQueryAttention's semantics (do_rotary=1, split-half rotary, no share buffer), in torch:
    query B L H*D, key/value B L K*D, past B K P D -> output B L H*D, present key/value B K P+L D."""
    B, L, _ = query.shape
    H, K, D = num_heads, kv_num_heads, past_key.shape[-1]
    P = past_key.shape[2]
    first = int(total_sequence_length) == L  # the op's "first prompt": positions start at 0
    q = query.reshape(B, L, H, D).transpose(1, 2)                                     # B H L D
    k = key.reshape(B, L, K, D).transpose(1, 2)                                       # B K L D
    v = value.reshape(B, L, K, D).transpose(1, 2)                                     # B K L D
    out = query.new_zeros(B, H, L, D)
    present_k = torch.cat([past_key, torch.zeros_like(k)], dim=2)                     # B K T D
    present_v = torch.cat([past_value, torch.zeros_like(v)], dim=2)
    for b in range(B):
        T = int(seqlens_k[b]) + 1                                                     # valid keys of row b
        start = 0 if first else T - L
        cos, sin = cos_cache[start:start + L], sin_cache[start:start + L]             # L D/2
        rot = lambda x: _rotate(x, cos, sin)  # noqa: E731
        present_k[b, :, start:start + L], present_v[b, :, start:start + L] = rot(k[b]), v[b]
        keys = present_k[b].repeat_interleave(H // K, dim=0)                          # H T D
        values = present_v[b].repeat_interleave(H // K, dim=0)
        scores = (rot(q[b]) @ keys.transpose(1, 2)).float() * scale                   # H L T
        allowed = torch.arange(P + L)[None] <= torch.arange(start, start + L)[:, None]
        allowed &= torch.arange(P + L)[None] < T
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        out[b] = probs.to(values.dtype) @ values
    return out.transpose(1, 2).reshape(B, L, H * D), present_k, present_v


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ... L D, cos/sin L D/2 -> x rotated by split halves (the twin's RoPE.forward)."""
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
      num_heads, kv_num_heads, scale):
    B, K, P, D = past_key.shape
    present = past_key.new_empty(B, K, P + query.shape[1], D)
    return query.new_empty(query.shape), present, torch.empty_like(present)


def _op_schema():
    """The part of com.microsoft GroupQueryAttention's schema this graph uses. The `onnx` package knows only
    the standard domains, and the exporter builds a node from a schema: this one is handed to it directly
    (never registered globally)."""
    from onnx.defs import OpSchema

    optional = OpSchema.FormalParameterOption.Optional
    inputs = [OpSchema.FormalParameter(n, t) for n, t in (("query", "T"), ("key", "T"), ("value", "T"))]
    inputs[1:] = [OpSchema.FormalParameter(n, "T", param_option=optional) for n in ("key", "value")]
    inputs += [OpSchema.FormalParameter(n, "T", param_option=optional) for n in ("past_key", "past_value")]
    inputs += [OpSchema.FormalParameter("seqlens_k", "M"), OpSchema.FormalParameter("total_sequence_length", "M")]
    inputs += [OpSchema.FormalParameter(n, "T", param_option=optional) for n in ("cos_cache", "sin_cache")]
    outputs = [OpSchema.FormalParameter(n, "T") for n in ("output", "present_key", "present_value")]
    ints, floats = OpSchema.AttrType.INT, OpSchema.AttrType.FLOAT
    attributes = [OpSchema.Attribute(n, ints, "") for n in ("num_heads", "kv_num_heads", "do_rotary",
                                                             "rotary_interleaved")]
    attributes.append(OpSchema.Attribute("scale", floats, ""))
    return OpSchema("GroupQueryAttention", "com.microsoft", 1, inputs=inputs, outputs=outputs,
                    type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
                    attributes=attributes)


def _onnx_group_query_attention(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                                cos_cache, sin_cache, num_heads: int, kv_num_heads: int, scale: float):
    from onnxscript.values import Op, Opset

    gqa = Op(Opset("com.microsoft", 1), "GroupQueryAttention", _op_schema())
    return gqa(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
               num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale, do_rotary=1, rotary_interleaved=0)


def translation_table() -> dict:
    """For torch.onnx.export(custom_translation_table=...)."""
    return {torch.ops.qwen_mlx.group_query_attention.default: _onnx_group_query_attention}


# ---- the twin with the fused attention core ------------------------------------------------------------

class FusedAttention(nn.Module):
    """An Attention whose core is the op; holds the same projections under the same names (the traced
    weights keep their `model.layers.N.self_attn.q_proj` scope)."""

    def __init__(self, attn: Attention, cos: torch.Tensor, sin: torch.Tensor):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.scale = attn.n_heads, attn.n_kv_heads, attn.head_dim, attn.scale
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.qk_norm = attn.qk_norm
        if self.qk_norm:
            self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.cos, self.sin = cos, sin  # plain attributes shared by every layer: one initializer each

    def forward(self, x: torch.Tensor, lengths: tuple[torch.Tensor, torch.Tensor], _cos_sin, past: KV
                ) -> tuple[torch.Tensor, KV]:
        B, L, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)                     # B L H*D, B L K*D
        if self.qk_norm:  # Qwen3: per-head RMSNorm before RoPE (which the op applies)
            q = self.q_norm(q.reshape(B, L, H, D)).reshape(B, L, H * D)
            k = self.k_norm(k.reshape(B, L, K, D)).reshape(B, L, K * D)
        o, present_k, present_v = torch.ops.qwen_mlx.group_query_attention(
            q, k, v, past[0], past[1], *lengths, self.cos, self.sin, H, K, self.scale)
        return self.o_proj(o), (present_k, present_v)


class GQAForCausalLM(nn.Module):
    """Qwen2ForCausalLM with FusedAttention in every layer. Inputs: input_ids, attention_mask, past (no
    position_ids: the op derives positions from the mask's lengths)."""

    def __init__(self, model: Qwen2ForCausalLM):
        super().__init__()
        check_gqa_supported(model.args)
        self.args = model.args
        self.model = model.model
        if not model.args.tie_word_embeddings:
            self.lm_head = model.lm_head
        cos, sin = rope_tables(model.args, self.model.norm.weight.dtype)
        for layer in self.model.layers:
            layer.self_attn = FusedAttention(layer.self_attn, cos, sin)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past_key_values: list[KV]
                ) -> tuple[torch.Tensor, list[KV]]:
        h = self.model.embed_tokens(input_ids)                                       # B L E
        # The builder's lengths: seqlens_k = valid tokens per row - 1, total = the mask's width.
        seqlens_k = (attention_mask.sum(-1) - 1).to(torch.int32)                     # B
        total = torch.full((), attention_mask.shape[1], dtype=torch.int32)           # scalar
        presents = []
        for layer, past in zip(self.model.layers, past_key_values):
            h, present = layer(h, (seqlens_k, total), None, past)
            presents.append(present)
        h = self.model.norm(h)
        if self.args.tie_word_embeddings:
            return F.linear(h, self.model.embed_tokens.weight), presents
        return self.lm_head(h), presents


__all__ = ["ATTENTION_FORMS", "check_gqa_supported", "rope_tables", "group_query_attention", "translation_table",
           "FusedAttention", "GQAForCausalLM"]
