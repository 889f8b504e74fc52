"""Tiny random Qwen2 checkpoints saved as real HF folders by transformers itself (the reference)."""

from __future__ import annotations

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
}


def tiny_config_dict(name: str, vocab_size: int = 512) -> dict[str, Any]:
    base = dict(model_type="qwen2", vocab_size=vocab_size, hidden_size=48, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False,
                bos_token_id=None, eos_token_id=2)
    base.update(TINY_CONFIGS[name] if name in TINY_CONFIGS else EXTRA_CONFIGS[name])
    return base


def write_tiny_model(folder: Path, name: str, seed: int = 0, with_tokenizer: bool = True) -> Path:
    """Save a random Qwen2ForCausalLM (float32) with transformers; biases are random too, so QKV bias
    bugs show. The tiny tokenizer is added when `with_tokenizer`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**tiny_config_dict(name))
    model = Qwen2ForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)  # larger than the init's 0.02 so logits differ clearly between tokens
        for layer in model.model.layers:  # norms near 1, as in trained models
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
        model.model.norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    if with_tokenizer:
        from tests.tiny_tokenizer import write_tiny_tokenizer
        write_tiny_tokenizer(folder, vocab_size=config.vocab_size)
    return folder
