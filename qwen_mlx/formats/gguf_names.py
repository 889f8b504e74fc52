"""llama.cpp's GGUF names for the Qwen families, in one place for both directions: the reader
(qwen_mlx/formats/gguf.py, gguf_hybrid.py) maps GGUF -> HF with these tables, the writer (gguf_write.py) inverts
them. Which values each name holds rewritten (norms as 1 + w, A_log as -exp(A_log), ...) is gguf_hybrid.py's
subject; these are names only.

Pure data: no imports beyond the standard library.
"""

from __future__ import annotations

# gguf leaf name -> HF name inside a decoder layer. llama.cpp's converter does NOT permute q/k rows for
# qwen2 (it only does for llama-family models), and transformers' GGUF loader agrees: plain renames.
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    # The other architectures' extra tensors.
    "attn_output.bias": "self_attn.o_proj.bias",  # Qwen3 with attention_bias
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",  # the MoE router
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
}
TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# One [X, out, in] GGUF tensor <-> X HF tensors `mlp.experts.{j}.<leaf>` (the MLX model's stacked
# `mlp.experts.<leaf>`).
EXPERT_NAMES = {
    "ffn_gate_exps.weight": "gate_proj.weight",
    "ffn_up_exps.weight": "up_proj.weight",
    "ffn_down_exps.weight": "down_proj.weight",
}
# The hybrid family's tensors (linear layers, gated attention), and the fused ones llama.cpp's converter writes
# on request. The zero-centred norms among them hold 1 + w (PLUS_ONE).
HYBRID_LAYER_NAMES = {
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ssm_ba.weight": "linear_attn.in_proj_ba.weight",
    "ssm_beta.weight": "linear_attn.in_proj_b.weight",
    "ssm_alpha.weight": "linear_attn.in_proj_a.weight",
    "ssm_a": "linear_attn.A_log",
    "ssm_dt.bias": "linear_attn.dt_bias",
    "ssm_conv1d.weight": "linear_attn.conv1d.weight",
    "ssm_norm.weight": "linear_attn.norm.weight",
    "ssm_out.weight": "linear_attn.out_proj.weight",
    "attn_gate.weight": "linear_attn.in_proj_z.weight",  # Qwen3.5; Qwen3-Next's joins attn_qkv (qkvz_rows)
}
# The hybrid family's zero-centred norms (HF names' endings), which llama.cpp stores as 1 + w; the linear layer's
# gated `linear_attn.norm` scales by w and is stored as it is.
PLUS_ONE = ("input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight", "q_norm.weight",
            "k_norm.weight", "mtp.norm.weight", "pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight")
# The nextn block's own tensors <-> the release's `mtp.*` names (the rest of the block is a decoder layer).
MTP_NAMES = {
    "nextn.eh_proj.weight": "mtp.fc.weight",
    "nextn.enorm.weight": "mtp.pre_fc_norm_embedding.weight",
    "nextn.hnorm.weight": "mtp.pre_fc_norm_hidden.weight",
    "nextn.shared_head_norm.weight": "mtp.norm.weight",
}
# GGUF architecture <-> (HF model_type, HF class). Qwen3.5's GGUF holds the text model only (its vision tower
# goes to a separate mmproj file), so it reads back as the text-only class.
ARCHITECTURES = {
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen2moe": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "qwen3next": ("qwen3_next", "Qwen3NextForCausalLM"),
    "qwen35": ("qwen3_5_text", "Qwen3_5ForCausalLM"),
    "qwen35moe": ("qwen3_5_moe_text", "Qwen3_5MoeForCausalLM"),
}
HYBRID_ARCHITECTURES = ("qwen3next", "qwen35", "qwen35moe")
MOE_ARCHITECTURES = ("qwen2moe", "qwen3moe", "qwen3next", "qwen35moe")
