"""`info`: what a checkpoint is, from its config and headers alone (no weights read, no MLX, no torch).

Architecture, experts, parameters by component (embedding, attention, MLP, MoE router, routed and shared
experts, norms, lm_head), the parameters active per token, and the memory the weights need in each dtype:
all of them, and, for MoE models, what one token reads.
"""

from __future__ import annotations

import math
from typing import Callable

from .checkpoint import Checkpoint
from .dtypes import BYTES
from .files import read_json
from .formats.affine import describe


def model_report(ckpt: Checkpoint) -> list[str]:
    """The lines `cli.py info` prints for a checked checkpoint."""
    lines: list[str] = []
    out = lines.append
    a = ckpt.args
    counts = a.parameter_counts()
    total, active = sum(counts.values()), a.active_parameters()
    moe = bool(a.num_experts)
    out(f"model          {ckpt.folder}")
    out(f"architecture   {a.model_type}: {a.num_hidden_layers} layers, hidden {a.hidden_size}, "
        f"MLP {a.intermediate_size}, {a.num_attention_heads} heads / {a.num_key_value_heads} KV heads x "
        f"{a.head_dim}" + (", q/k RMSNorm" if a.qk_norm else ""))
    if moe:
        per_expert = 3 * a.hidden_size * a.moe_intermediate_size
        dense = [i for i in range(a.num_hidden_layers) if i not in a.moe_layers]
        out(f"experts        {a.num_experts} per MoE layer, {a.num_experts_per_tok} per token "
            f"({'renormalized' if a.norm_topk_prob else 'softmax'} weights), each {a.moe_intermediate_size} wide "
            f"({per_expert:,} parameters); MoE in {len(a.moe_layers)} of {a.num_hidden_layers} layers"
            + (f", dense MLP in {dense}" if dense else ""))
        if a.shared_expert:
            out(f"               shared expert {a.shared_expert_intermediate_size} wide, sigmoid-gated, on every token")
    out(f"vocabulary     {a.vocab_size}, embeddings {'tied' if a.tie_word_embeddings else 'untied'}")
    out(f"rope           {a.rope_type}, theta {a.rope_theta:g}; context {a.context_length}")
    if a.dual_chunk is not None:
        out(f"attention      {a.dual_chunk.describe()}: active, reaching the full {a.context_length} tokens "
            f"with no relative position past {a.dual_chunk.chunk_size}")
    for cap, reason in a.context_caps():
        out(f"               context capped at {cap} by {reason}; config.json says "
            f"{a.max_position_embeddings}")
    out("parameters")
    for name, n in counts.items():
        if n or name in ("embedding", "attention", "mlp", "norms", "lm_head"):
            out(f"  {name:<14} {n:>14,}  {100 * n / total:5.1f}%")
    out(f"  {'total':<14} {total:>14,}")
    if moe:
        out(f"  {'active/token':<14} {active:>14,}  {100 * active / total:5.1f}%  "
            f"({a.num_experts_per_tok} of {a.num_experts} experts)")
    # Quantized (--quantize): matrices at `bits` plus a 16-bit scale and bias per group of 64; norms and the
    # MoE router stay in 16 bits.
    matrices = sum(n for k, n in counts.items() if k not in ("norms", "router"))
    active_matrices = matrices - (total - active)
    out("weights memory" + ("           all    read per token" if moe else ""))

    def row(label: str, everything: float, per_token: float) -> None:
        out(f"  {label:<12} {everything / 1e9:8.2f} GB" + (f"   {per_token / 1e9:8.2f} GB" if moe else ""))

    if ckpt.quantization is not None:
        _stored_quantization_rows(ckpt, out)
    for label, size in BYTES.items():
        row(label, total * size, active * size)
    for bits in (8, 4):
        row(f"{bits}-bit", (matrices * (bits + 0.5) + (total - matrices) * 16) / 8,
            (active_matrices * (bits + 0.5) + (active - active_matrices) * 16) / 8)
    linear = len(a.linear_layers)  # the hybrids' Gated DeltaNet layers keep a state, not keys and values
    kv = 2 * (a.num_hidden_layers - linear) * a.num_key_value_heads * a.head_dim
    out(f"KV cache       {kv * 2 / 1024:.1f} KiB per token in 16-bit ({kv * 2 * a.context_length / 1e9:.2f} GB "
        f"for the full context)" + (f", in the {a.num_hidden_layers - linear} attention layers" if linear else ""))
    if linear:
        conv = (a.linear_conv_kernel_dim - 1) * (2 * a.linear_num_key_heads * a.linear_key_head_dim
                                                 + a.linear_num_value_heads * a.linear_value_head_dim)
        delta = a.linear_num_value_heads * a.linear_key_head_dim * a.linear_value_head_dim
        out(f"state          {linear * (conv + delta) * 4 / 2**20:.1f} MiB in float32 for the {linear} linear layers, "
            "whatever the context")
    return lines


def _stored_quantization_rows(ckpt: Checkpoint, out: Callable[[str], None]) -> None:
    """`info` on a quantized folder: the stored quantization, then its weights as stored and as MLX loads
    them (packed codes kept; scales, biases and float tensors in the load dtype)."""
    out(f"  {'quantized':<12} {describe(ckpt.quantization)}")
    origin = read_json(ckpt.folder / "config.json").get("repacked_from")
    if origin:  # an AWQ/GPTQ checkpoint (qwen_mlx/formats/awq_gptq.py)
        out(f"  {'repacked':<12} exactly, from {origin}")
    itemsize = {"U32": 4, "F32": 4, "F16": 2, "BF16": 2}
    stored = sum(math.prod(t.shape) * itemsize.get(t.dtype, 4) for t in ckpt.tensors.values())
    packed = sum(math.prod(t.shape) * 4 for t in ckpt.tensors.values() if t.dtype == "U32")
    floats = sum(math.prod(t.shape) for t in ckpt.tensors.values() if t.dtype != "U32")
    out(f"  {'as stored':<12} {stored / 1e9:8.2f} GB")
    for label, size in BYTES.items():
        out(f"  {label:<12} {(packed + floats * size) / 1e9:8.2f} GB   MLX, quantized as stored")
    out("  dequantized (the torch twin and the ONNX export):")
