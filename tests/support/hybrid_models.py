"""Tiny random checkpoints of the hybrid family (Qwen3-Next, Qwen3.5, Qwen3.5-MoE) saved by transformers itself,
as the releases are: Qwen3.5's multimodal class with its vision tower, and a multi-token-prediction layer
(`mtp.*`, which transformers ignores) in a second safetensors file.

Shapes cover what the releases vary: value heads outnumbering key heads (Qwen3-Next, Qwen3.5-MoE) or not,
partial RoPE, tied and untied embeddings, MoE with a shared expert, a dense MLP layer among MoE ones
(`mlp_only_layers`), and 3 linear : 1 full attention layers as released or 1 : 1.

The `mtp.*` layer is whole, as released (llama.cpp's converter turns it into its "nextn" block): `mtp.fc`
[H, 2H], its three norms, and `mtp.layers.0.*` shaped as a full-attention decoder layer with the model's MLP
or MoE (experts one by one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_TEXT = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
             linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4, max_position_embeddings=1024,
             rms_norm_eps=1e-6, eos_token_id=2)
_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
               spatial_merge_size=1, temporal_patch_size=1)

HYBRID_CONFIGS: dict[str, dict[str, Any]] = {
    # Qwen3-Next: packed projections, MoE with a dense layer 3, value heads 2x key heads, 1 : 1 layers
    "next-moe": dict(model_type="qwen3_next", **_TEXT, **_MOE, full_attention_interval=2, mlp_only_layers=[3],
                     tie_word_embeddings=False),
    # Qwen3.5 dense, tied, as many value heads as key heads, 3 : 1 layers as released
    "q35-tied": dict(model_type="qwen3_5", **{**_TEXT, "linear_num_value_heads": 2}, full_attention_interval=4,
                     tie_word_embeddings=True),
    # Qwen3.5-MoE (Qwen3.6's type), untied, 3 : 1
    "q35-moe": dict(model_type="qwen3_5_moe", **_TEXT, **_MOE, full_attention_interval=4, tie_word_embeddings=False),
}
HF_CLASSES = {"qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM"),
              "qwen3_5": ("Qwen3_5Config", "Qwen3_5ForConditionalGeneration"),
              "qwen3_5_moe": ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration")}


def write_hybrid_model(folder: Path, name: str, seed: int = 0, **overrides: Any) -> Path:
    """Save `name`'s random model with transformers (float32), an `mtp.*` layer beside it, and the tiny
    tokenizer. Weights are drawn wider than the init (norms and decay parameters kept in their ranges), so
    logits differ clearly between tokens. `overrides` replace entries of the named config (e.g.
    `mlp_only_layers=[]`)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    from benchmarks.checkpoints.tiny_tokenizer import write_tiny_tokenizer

    torch.manual_seed(seed)
    values = {**HYBRID_CONFIGS[name], **overrides}
    model_type = values.pop("model_type")
    config_class, model_class = (getattr(transformers, c) for c in HF_CLASSES[model_type])
    if model_type == "qwen3_next":
        config = config_class(**values)
    else:  # the multimodal release: the text model under text_config, a vision tower beside it
        tie = values.pop("tie_word_embeddings")
        config = config_class(text_config=values, vision_config=_VISION, tie_word_embeddings=tie)
    model = model_class(config).to(torch.float32)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith(("A_log", "dt_bias")):
                continue  # the init's ranges: decays between exp(-16 softplus(.)) and 1
            if key.endswith("norm.weight"):  # zero-centred norms scale by 1 + w; the gated norm by w
                p.uniform_(0.5, 1.5) if key.endswith("linear_attn.norm.weight") else p.uniform_(-0.5, 0.5)
            else:
                p.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    save_file(_mtp_layer(folder, seed), str(folder / "model-mtp.safetensors"))
    write_tiny_tokenizer(folder, vocab_size=values["vocab_size"])
    return folder


def _mtp_layer(folder: Path, seed: int) -> dict[str, Any]:
    """The multi-token-prediction layer as the releases store it: `fc`, its norms (zero-centred, like the
    model's) and one full-attention decoder layer, the shapes taken from a full-attention layer of the model
    (a MoE one where the model has experts). Drawn from its own generator: the model's weights do not move."""
    import torch

    from qwen_mlx.config import ModelArgs

    args = ModelArgs.from_folder(folder)
    full = [i for i in range(args.num_hidden_layers) if i not in args.linear_layers]
    layer = next((i for i in full if args.is_moe_layer(i)), full[0])
    prefix = f"model.layers.{layer}."
    generator = torch.Generator().manual_seed(seed + 1)
    h = args.hidden_size
    shapes = {"mtp.fc.weight": (h, 2 * h), "mtp.norm.weight": (h,), "mtp.pre_fc_norm_embedding.weight": (h,),
              "mtp.pre_fc_norm_hidden.weight": (h,)}
    shapes |= {"mtp.layers.0." + k.removeprefix(prefix): v for k, v in args.weight_shapes().items()
               if k.startswith(prefix)}
    return {k: (torch.rand(shape, generator=generator) - 0.5 if k.endswith("norm.weight")
                else torch.randn(shape, generator=generator) * 0.2) for k, shape in shapes.items()}


def fuse_experts(src: Path, dst: Path) -> Path:
    """A copy of `src` whose experts are stored fused (transformers 5's in-memory layout: `experts.gate_up_proj`
    X 2I E and `experts.down_proj` X E I) instead of one tensor per expert."""
    import re
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key in [k for k in weights if ".mlp.experts." in k]:
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(\w+)_proj\.weight", key)
        experts.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = weights.pop(key)
    for prefix, by_id in experts.items():
        ids = sorted(by_id)
        weights[prefix + ".gate_up_proj"] = torch.stack([torch.cat([by_id[j]["gate"], by_id[j]["up"]]) for j in ids])
        weights[prefix + ".down_proj"] = torch.stack([by_id[j]["down"] for j in ids])
    save_file(weights, str(dst / "model.safetensors"))
    json.loads((dst / "config.json").read_text())  # unchanged: the layout alone differs
    return dst
