"""Tiny GGUF files for the GGUF tests: the small byte-level BPE vocabulary and chat template written into
synthetic qwen2 GGUFs, and a tiny HF checkpoint written out as llama.cpp's converter lays it out (with gguf's
own writer and tensor-name map)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from benchmarks.checkpoints.tiny_tokenizer import QWEN25_CHAT_TEMPLATE
from qwen_mlx.config import ModelArgs

CHAT_TEMPLATE = QWEN25_CHAT_TEMPLATE  # the real Qwen2.5 chat template, as the tiny tokenizer has it
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_alphabet() -> list[str]:
    """GPT-2's bytes->unicode spelling of the 256 bytes, the base vocabulary of a byte-level BPE."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for _, c in sorted(zip(printable, codes))]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens = _byte_alphabet() + ["Ġt", "he", "Ġthe", "in", "Ġa"] + SPECIALS + ["<tool_call>", "[PAD999]"]
    types = [1] * (len(tokens) - 5) + [3, 3, 3, 4, 5]
    return tokens, types, merges


# ---- a tiny HF checkpoint as a GGUF -------------------------------------------------------------------

GGUF_ARCH = {"qwen2_moe": "QWEN2MOE", "qwen3": "QWEN3", "qwen3_moe": "QWEN3MOE"}


def write_gguf_from_hf(folder: Path, path: Path, quantize_experts: bool, vector_shexp_gate: bool) -> dict:
    """The tiny HF checkpoint as llama.cpp's converter lays it out: names from gguf's TensorNameMap, each
    layer's experts stacked [X, out, in], the tokenizer as gguf metadata. Returns the GGUF name -> the
    float32 values a reader gets back (quantized stacks: gguf's own dequantization of what was stored)."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    args = ModelArgs.from_dict(config)
    arch = getattr(gguf.MODEL_ARCH, GGUF_ARCH[args.model_type])
    names = gguf.get_tensor_name_map(arch, args.num_hidden_layers)
    dense = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, args.num_hidden_layers)  # mlp_only layers' MLPs
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_block_count(args.num_hidden_layers)
    writer.add_context_length(args.max_position_embeddings)
    writer.add_embedding_length(args.hidden_size)
    writer.add_feed_forward_length(args.intermediate_size)
    writer.add_head_count(args.num_attention_heads)
    writer.add_head_count_kv(args.num_key_value_heads)
    writer.add_key_length(args.head_dim)
    writer.add_value_length(args.head_dim)
    writer.add_layer_norm_rms_eps(args.rms_norm_eps)
    writer.add_rope_freq_base(args.rope_theta)
    if args.num_experts:
        writer.add_expert_count(args.num_experts)
        writer.add_expert_used_count(args.num_experts_per_tok)
        writer.add_expert_feed_forward_length(args.moe_intermediate_size)
        if args.model_type == "qwen2_moe":
            writer.add_expert_shared_feed_forward_length(args.shared_expert_intermediate_size)
        if args.norm_topk_prob != (args.model_type == "qwen3_moe"):  # llama.cpp's default differs: say so
            writer.add_expert_weights_norm(args.norm_topk_prob)
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    tokens = sorted(vocab, key=vocab.get)
    kinds = {t["content"]: 3 if t["special"] else 4 for t in tok["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([kinds.get(t, 1) for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_chat_template(json.loads((folder / "tokenizer_config.json").read_text())["chat_template"])

    weights = load_file(str(folder / "model.safetensors"))
    stacks: dict[str, list] = {}
    for key in list(weights):
        if m := re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+\.weight)", key):
            stacks.setdefault(f"{m[1]}.{m[3]}", []).append((int(m[2]), weights.pop(key)))
    for key, parts in stacks.items():
        weights[key] = np.stack([w for _, w in sorted(parts, key=lambda p: p[0])])
    if args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    stored = {}
    for key, value in weights.items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias")) or dense.get_name(key, try_suffixes=(".weight",))
        assert name, key
        if vector_shexp_gate and key.endswith("shared_expert_gate.weight"):
            value = value.reshape(-1)
        if quantize_experts and value.ndim == 3:
            packed = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            value = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q8_0).reshape(value.shape)
        else:
            writer.add_tensor(name, value)
        stored[key] = value
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored
