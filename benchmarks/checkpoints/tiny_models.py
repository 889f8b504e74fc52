"""Tiny random Qwen-family checkpoints saved as real HF folders by transformers itself (the reference), and
the copy of one that mlx-lm reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

# Shapes chosen to cover what real Qwen2 checkpoints vary: GQA ratios (1, 2, 4, MHA), tied and untied
# embeddings, an explicit head_dim, and every rope scaling the config accepts. gqa4-tied and mqa-headdim
# have every matrix width a multiple of 64, so 4- and 8-bit quantization (group size 64) covers them whole.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "gqa2-untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "gqa4-tied": dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64, intermediate_size=128,
                      tie_word_embeddings=True),
    "mha-tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "mqa-headdim": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32, hidden_size=64,
                        intermediate_size=128, tie_word_embeddings=False),
    "yarn": dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                 rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "linear": dict(num_attention_heads=4, num_key_value_heads=2,
                   rope_scaling={"type": "linear", "factor": 2.0}),
    "dynamic": dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                    rope_scaling={"type": "dynamic", "factor": 2.0}),
}
# Not in the parity sweeps above: a shape they already cover, with room for a chat with tools (server tests).
EXTRA_CONFIGS: dict[str, dict[str, Any]] = {
    "long-context": dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
    # head_dim 64, the real models' and mlx-lm's default KV group size (tests/test_kv_cache_quant.py)
    "kv-head64": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024),
    # Dual Chunk Attention with chunks of 12 tokens (16 - 4) and logits sharpened past 32 tokens: a prompt
    # of ~60 tokens crosses several chunk boundaries (tests/test_dca.py; HF ignores the field).
    "dca": dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                dual_chunk_attention_config={"chunk_size": 16, "local_size": 4,
                                             "original_max_position_embeddings": 32}),
}

# The other architectures (tests/test_architectures.py). MoE: several expert counts and top-k, the shared
# expert on (qwen2_moe), off (qwen3_moe, and qwen2_moe with size 0), norm_topk_prob both ways, tied and
# untied, dense layers by mlp_only_layers and by decoder_sparse_step. Qwen3: explicit head_dim unlike
# hidden / heads, attention_bias both ways. "qwen3moe-q64" has every matrix width a multiple of 64, so 4-
# and 8-bit quantization covers all of it, experts included. "qwen2moe-shared" (multi-head) and
# "qwen3moe-norm" (head_dim = hidden / heads) are shapes optimum-onnx's ORTModelForCausalLM can size its
# past for (tests/test_edge_runtimes.py).
ARCH_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2moe-shared": dict(model_type="qwen2_moe", num_key_value_heads=4, num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=32, shared_expert_intermediate_size=64, norm_topk_prob=False,
                            tie_word_embeddings=False),
    "qwen2moe-norm-mlponly": dict(model_type="qwen2_moe", num_experts=8, num_experts_per_tok=3,
                                  moe_intermediate_size=24, shared_expert_intermediate_size=48,
                                  norm_topk_prob=True, mlp_only_layers=[1], tie_word_embeddings=True),
    "qwen2moe-step2-noshared": dict(model_type="qwen2_moe", num_experts=6, num_experts_per_tok=1,
                                    moe_intermediate_size=32, shared_expert_intermediate_size=0,
                                    decoder_sparse_step=2, norm_topk_prob=False, tie_word_embeddings=False),
    "qwen3-untied": dict(model_type="qwen3", head_dim=32, tie_word_embeddings=False),
    "qwen3-bias-tied": dict(model_type="qwen3", num_key_value_heads=4, head_dim=16, attention_bias=True,
                            tie_word_embeddings=True),
    "qwen3moe-norm": dict(model_type="qwen3_moe", head_dim=12, num_experts=8, num_experts_per_tok=2,
                          moe_intermediate_size=32, norm_topk_prob=True, tie_word_embeddings=False),
    "qwen3moe-q64": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=128, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=32, num_experts=16, num_experts_per_tok=4,
                         moe_intermediate_size=64, norm_topk_prob=False, mlp_only_layers=[0],
                         tie_word_embeddings=True),
}
HF_CLASSES = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
              "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM")}


def tiny_config_dict(name: str, vocab_size: int = 512) -> dict[str, Any]:
    base = dict(model_type="qwen2", vocab_size=vocab_size, hidden_size=48, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False,
                bos_token_id=None, eos_token_id=2)
    base.update({**TINY_CONFIGS, **EXTRA_CONFIGS, **ARCH_CONFIGS}[name])
    return base


def write_tiny_model(folder: Path, name: str, seed: int = 0, with_tokenizer: bool = True) -> Path:
    """Save a random model of the config's architecture (float32) with transformers; biases are random
    too, so bias bugs show. The tiny tokenizer is added when `with_tokenizer`."""
    import torch
    import transformers

    torch.manual_seed(seed)
    values = tiny_config_dict(name)
    config_class, model_class = (getattr(transformers, c) for c in HF_CLASSES[values["model_type"]])
    config = config_class(**{k: v for k, v in values.items() if k != "model_type"})
    model = model_class(config).to(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)  # larger than the init's 0.02 so logits differ clearly between tokens
        for key, p in model.named_parameters():
            if key.endswith("norm.weight"):  # norms near 1, as in trained models (q_norm/k_norm too)
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    if with_tokenizer:
        from benchmarks.checkpoints.tiny_tokenizer import write_tiny_tokenizer
        write_tiny_tokenizer(folder, vocab_size=config.vocab_size)
    return folder


def mlx_lm_readable(src: Path, dst: Path) -> Path:
    """A copy of a tiny HF folder with the pre-transformers-5 config keys mlx-lm reads (top-level
    rope_theta, num_experts); without them mlx-lm would silently use its defaults (rope_theta 1e6)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    if "num_local_experts" in config:
        config["num_experts"] = config["num_local_experts"]
    (dst / "config.json").write_text(json.dumps(config))
    return dst
