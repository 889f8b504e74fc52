"""GGUF (architectures `qwen2`, `qwen2moe`, `qwen3`, `qwen3moe`) -> a standard Hugging Face folder, or an MLX
quantized folder that keeps the GGUF's blocks where MLX holds them exactly (qwen_mlx/formats/gguf_blocks.py).

The folder holds config.json, generation_config.json, model.safetensors, tokenizer.json and
tokenizer_config.json, and loads with transformers' `AutoModelForCausalLM.from_pretrained` (Qwen2, Qwen2-MoE,
Qwen3 or Qwen3-MoE) as well as with this project's own loaders. GGUF stacks each layer's experts into one
[X, out, in] tensor (`ffn_gate_exps`); they are written back one per expert, as HF checkpoints hold them. Weights are dequantized with the `gguf` package's own
`gguf.quants.dequantize` (the code llama.cpp ships), so float32 output is exact. Kept blocks are repacked
bit for bit into MLX's uint32 codes with float32 scales and biases (config.json `quantization`, as mlx-lm
writes it), and load in this project's MLX backend and in `mlx_lm.load` alike.

Deliberately free of torch and mlx: numpy, gguf and tokenizers only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from ..dtypes import SAFETENSORS, check_dtype
from ..errors import QwenError
from ..files import check_output_folder, file_lock, sha256_file, staged_folder
from .gguf_blocks import GROUP_SIZE, KEPT, kept_bits, to_mlx
from ..paths import cache_dir
from ..progress import progress_bar


# The split regex of Qwen2's tokenizer.json (single digits, unlike GPT-4's \p{N}{1,3}).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's `tokenizer.ggml.pre` names that use exactly that regex.
_QWEN2_PRE = {"qwen2", "deepseek-r1-qwen"}

# gguf leaf name -> HF name inside a decoder layer. llama.cpp's converter does NOT permute q/k rows for
# qwen2 (it only does for llama-family models), and transformers' GGUF loader agrees: plain renames.
_LAYER_NAMES = {
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
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# The other architectures' extra tensors (llama.cpp's names for them).
_LAYER_NAMES |= {
    "attn_output.bias": "self_attn.o_proj.bias",  # Qwen3 with attention_bias
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",  # the MoE router
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
}
# One [X, out, in] GGUF tensor -> X HF tensors `mlp.experts.{j}.<leaf>`.
_EXPERT_NAMES = {
    "ffn_gate_exps.weight": "gate_proj.weight",
    "ffn_up_exps.weight": "up_proj.weight",
    "ffn_down_exps.weight": "down_proj.weight",
}
# GGUF architecture -> (HF model_type, HF class).
ARCHITECTURES = {
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen2moe": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
}
_CONTROL, _USER_DEFINED = 3, 4  # gguf.TokenType values


# ----------------------------------------------------------------------------------------------- reading


def _open(gguf_path: Path):
    """A GGUFReader, with every way a file can be unreadable turned into a QwenError."""
    from gguf import GGUFReader

    if not gguf_path.is_file():
        raise QwenError(f"GGUF file not found: {gguf_path}")
    with open(gguf_path, "rb") as source:
        if source.read(4) != b"GGUF":
            raise QwenError(f"{gguf_path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = GGUFReader(gguf_path)
    except Exception as error:  # ValueError/IndexError/... from a header or tensor table cut short
        raise QwenError(f"{gguf_path} is a truncated or corrupt GGUF file ({type(error).__name__}: {error})") from None
    # The reader memory-maps lazily, so a file cut short can parse fine; check every tensor fits.
    size = gguf_path.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size or tensor.data.nbytes != int(tensor.n_bytes):
            raise QwenError(
                f"{gguf_path} is truncated or corrupt: tensor {tensor.name!r} needs bytes up to {end}, "
                f"the file has {size}"
            )
    return reader


def _metadata(reader) -> dict[str, Any]:
    """Every key/value pair as plain Python values (strings, numbers, lists)."""
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception as error:
            raise QwenError(f"GGUF metadata key {key!r} is unreadable ({error})") from None
    return out


def _require(meta: dict[str, Any], key: str) -> Any:
    if key not in meta:
        raise QwenError(f"GGUF metadata lacks {key!r}; cannot build a {key.split('.')[0]} config")
    return meta[key]


def _float32_decimal(value: float) -> float:
    """The shortest decimal that round-trips the float32 GGUF stores: 9.99999997e-07 -> 1e-06."""
    return float(str(np.float32(value)))


# ------------------------------------------------------------------------------------------------ config


def _build_config(meta: dict[str, Any], tensors: dict[str, Any], dtype: str, arch: str = "qwen2") -> dict[str, Any]:
    model_type, hf_class = ARCHITECTURES[arch]
    hidden = int(_require(meta, f"{arch}.embedding_length"))
    heads = int(_require(meta, f"{arch}.attention.head_count"))
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise QwenError("GGUF has no token_embd.weight tensor")
    config: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": int(meta.get(f"{arch}.feed_forward_length") or 0)
        or int(_require(meta, f"{arch}.expert_feed_forward_length")),  # all-MoE: the dense size is unused
        "num_hidden_layers": int(_require(meta, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        # The embedding's rows, not the token list: they can differ and the weights decide the shapes.
        "vocab_size": int(embed.shape[1]),
        "rms_norm_eps": _float32_decimal(_require(meta, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_decimal(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_require(meta, f"{arch}.context_length")),
        "tie_word_embeddings": "output.weight" not in tensors,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": int(meta[f"{arch}.block_count"]),
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    for name, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            config[name] = int(meta[f"tokenizer.ggml.{key}"])
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    if scaling_type not in (None, "none"):
        scaling: dict[str, Any] = {"type": scaling_type, "rope_type": scaling_type}
        if f"{arch}.rope.scaling.factor" in meta:
            scaling["factor"] = _float32_decimal(meta[f"{arch}.rope.scaling.factor"])
        if f"{arch}.rope.scaling.original_context_length" in meta:
            scaling["original_max_position_embeddings"] = int(meta[f"{arch}.rope.scaling.original_context_length"])
        config["rope_scaling"] = scaling
    if model_type in ("qwen3", "qwen3_moe"):
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    if model_type == "qwen2_moe":
        config["qkv_bias"] = "blk.0.attn_q.bias" in tensors
    if model_type.endswith("_moe"):
        config.update(_moe_config(meta, tensors, arch, config["num_hidden_layers"]))
    return config


def _moe_config(meta: dict[str, Any], tensors: dict[str, Any], arch: str, layers: int) -> dict[str, Any]:
    """Expert counts and sizes from the metadata; which layers are sparse from the tensors they hold (a
    dense layer has ffn_gate/up/down), written as HF's mlp_only_layers."""
    moe_layers = [n for n in range(layers) if f"blk.{n}.ffn_gate_inp.weight" in tensors]
    if not moe_layers:
        raise QwenError(f"a {arch} GGUF without any expert layer (no blk.N.ffn_gate_inp.weight)")
    first = tensors.get(f"blk.{moe_layers[0]}.ffn_gate_exps.weight")
    out: dict[str, Any] = {
        "num_experts": int(_require(meta, f"{arch}.expert_count")),
        "num_experts_per_tok": int(_require(meta, f"{arch}.expert_used_count")),
        "moe_intermediate_size": int(meta.get(f"{arch}.expert_feed_forward_length")
                                     or (first.shape[1] if first is not None else 0)),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [n for n in range(layers) if n not in moe_layers],
        # llama.cpp renormalizes the top-k weights of qwen3moe and not those of qwen2moe unless the file says.
        "norm_topk_prob": bool(meta.get(f"{arch}.expert_weights_norm", arch == "qwen3moe")),
    }
    if arch == "qwen2moe":
        shared = tensors.get(f"blk.{moe_layers[0]}.ffn_gate_shexp.weight")
        out["shared_expert_intermediate_size"] = int(meta.get(f"{arch}.expert_shared_feed_forward_length")
                                                     or (shared.shape[1] if shared is not None else 0))
    return out


def _generation_config(meta: dict[str, Any], tokens: list[str]) -> dict[str, Any]:
    """Stop on the GGUF's eos and on <|endoftext|>, as Qwen's own generation_config does."""
    eos = meta.get("tokenizer.ggml.eos_token_id")
    stops = [int(eos)] if eos is not None else []
    if "<|endoftext|>" in tokens and tokens.index("<|endoftext|>") not in stops:
        stops.append(tokens.index("<|endoftext|>"))
    out: dict[str, Any] = {"eos_token_id": stops}
    if "tokenizer.ggml.bos_token_id" in meta:
        out["bos_token_id"] = int(meta["tokenizer.ggml.bos_token_id"])
    if "tokenizer.ggml.padding_token_id" in meta:
        out["pad_token_id"] = int(meta["tokenizer.ggml.padding_token_id"])
    return out


# --------------------------------------------------------------------------------------------- tokenizer


def _write_tokenizer(meta: dict[str, Any], folder: Path, model_max_length: int) -> list[str]:
    """tokenizer.json + tokenizer_config.json from the GGUF vocab; returns the token list."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise QwenError(f"GGUF tokenizer model is {model!r}; a qwen2 checkpoint needs byte-level BPE ('gpt2')")
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in _QWEN2_PRE:
        raise QwenError(f"GGUF pre-tokenizer is {pre!r}; supported: {sorted(_QWEN2_PRE)}")
    tokens: list[str] = list(_require(meta, "tokenizer.ggml.tokens"))
    types: list[int] = [int(t) for t in meta.get("tokenizer.ggml.token_type", [1] * len(tokens))]
    merges_raw: list[str] = list(_require(meta, "tokenizer.ggml.merges"))
    if len(types) != len(tokens):
        raise QwenError(f"GGUF has {len(tokens)} tokens but {len(types)} token types")
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise QwenError("GGUF vocabulary has duplicate tokens")
    # Byte-level tokens never hold a literal space (it is spelled 'Ġ'), so one space separates a pair.
    merges = []
    for merge in merges_raw:
        pair = merge.split(" ")
        if len(pair) != 2:
            raise QwenError(f"malformed GGUF merge {merge!r}")
        merges.append((pair[0], pair[1]))

    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=False,
        )
    )
    # NFC as Qwen2's own tokenizer.json does; a GGUF has no normalizer field to say otherwise.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    # CONTROL tokens are special (skipped on decode); USER_DEFINED ones (<tool_call>) are matched whole
    # but kept in decoded text. Both already sit in the vocab, so their ids do not move.
    added = [
        AddedToken(tokens[i], special=types[i] == _CONTROL, normalized=False, single_word=False, lstrip=False, rstrip=False)
        for i in range(len(tokens))
        if types[i] in (_CONTROL, _USER_DEFINED)
    ]
    tokenizer.add_tokens(added)
    tokenizer.save(str(folder / "tokenizer.json"))

    def token_at(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    added_decoder = {
        str(i): {
            "content": tokens[i],
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": types[i] == _CONTROL,
        }
        for i in range(len(tokens))
        if types[i] in (_CONTROL, _USER_DEFINED)
    }
    config = {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "added_tokens_decoder": added_decoder,
        # Qwen never prepends a BOS; the GGUF's bos id only feeds config.json/generation_config.json.
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": token_at("eos_token_id"),
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": token_at("padding_token_id"),
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if "tokenizer.chat_template" in meta:
        # Inside tokenizer_config.json, where transformers.js looks (it ignores chat_template.jinja).
        config["chat_template"] = meta["tokenizer.chat_template"]
    _write_json(folder / "tokenizer_config.json", config)
    return tokens


# ------------------------------------------------------------------------------------------------ tensors

_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4}


class Job(NamedTuple):
    """Tensors written together: their (name, safetensors dtype, shape), and how to compute them."""
    entries: list[tuple[str, str, tuple[int, ...]]]
    run: Callable[[], list[np.ndarray]]



def _hf_names(gguf_name: str, config: dict[str, Any]) -> list[tuple[str, int | None]]:
    """The HF tensor(s) one GGUF tensor becomes: [(name, None)], or [(expert j's name, j)] for a stack."""
    if gguf_name in _TOP_NAMES:
        return [(_TOP_NAMES[gguf_name], None)]
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if match and int(match[1]) < config["num_hidden_layers"]:
        if match[2] in _LAYER_NAMES:
            return [(f"model.layers.{match[1]}.{_LAYER_NAMES[match[2]]}", None)]
        if match[2] in _EXPERT_NAMES and "num_experts" in config:
            leaf = _EXPERT_NAMES[match[2]]
            return [(f"model.layers.{match[1]}.mlp.experts.{j}.{leaf}", j) for j in range(config["num_experts"])]
    raise QwenError(f"unexpected tensor {gguf_name!r} in a {config['model_type']} GGUF")


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF name -> shape (the same table the loaders check), so a GGUF whose tensors disagree with its own
    metadata fails loudly."""
    from ..config import ModelArgs

    return ModelArgs.from_dict(config).weight_shapes()


def _cast(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> the stored dtype, round-to-nearest-even like torch's `.to()`."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "float32":
        return values
    if dtype == "float16":
        return values.astype(np.float16)
    # numpy has no bfloat16: keep the top 16 bits of each float32, rounded to nearest even.
    bits = values.view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():  # rounding could carry a NaN's payload into the exponent; use the canonical quiet NaN
        rounded[nan] = np.uint16(0x7FC0)
    return rounded


def _float_job(tensor, name: str, shape: tuple[int, ...], expert: int | None, dtype: str) -> Job:
    """One GGUF tensor (or one expert of a stack) dequantized by `gguf.quants.dequantize`, cast to `dtype`."""
    def run() -> list[np.ndarray]:
        from gguf.quants import dequantize

        # GGUF lists dims fastest-first; `dequantize` returns numpy (row-major) order already. An expert is
        # one row of its stack's leading axis, quantized blocks included (they never span experts).
        data = tensor.data if expert is None else tensor.data[expert]
        return [_cast(dequantize(data, tensor.tensor_type).reshape(shape), dtype)]
    return Job([(name, SAFETENSORS[dtype], shape)], run)


def _kept_job(tensor, module: str, shape: tuple[int, ...]) -> Job:
    """One GGUF tensor whose blocks are MLX affine groups: packed codes, float32 scales and biases (quant.gguf_blocks).
    Rows go through in slices so a 150k-row embedding never unpacks all at once."""
    bits = kept_bits(tensor.tensor_type)
    *lead, n = shape
    groups = n // GROUP_SIZE
    entries = [(f"{module}.weight", "U32", (*lead, n * bits // 32)), (f"{module}.scales", "F32", (*lead, groups)),
               (f"{module}.biases", "F32", (*lead, groups))]

    def run() -> list[np.ndarray]:
        data = np.asarray(tensor.data).reshape(-1, tensor.data.shape[-1])  # [rows, row bytes]
        parts = [to_mlx(data[i:i + 8192], tensor.tensor_type) for i in range(0, data.shape[0], 8192)]
        if any(p is None for p in parts):
            raise QwenError(f"tensor {tensor.name!r} has non-finite block scales")
        return [np.concatenate([p[k] for p in parts]).reshape(e[2]) for k, e in enumerate(entries)]
    return Job(entries, run)


def _write_safetensors(jobs: list[Job], path: Path, progress: bool) -> None:
    """Stream the jobs' tensors into a safetensors file, so peak memory is one job's output.

    The header needs only names, shapes and dtypes, all known before any data is decoded. Writing the
    format directly (8-byte little-endian header length, JSON header, raw bytes) also gives bfloat16,
    which `safetensors.numpy` cannot express.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for job in jobs:
        for name, code, shape in job.entries:
            size = int(np.prod(shape)) * _ITEMSIZE[code]
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keep the data 8-byte aligned
    with open(path, "wb") as sink:
        sink.write(len(encoded).to_bytes(8, "little"))
        sink.write(encoded)
        for job in (progress_bar(jobs, "converting tensors") if progress else jobs):
            for (name, code, shape), array in zip(job.entries, job.run(), strict=True):
                if array.shape != shape or array.dtype.itemsize != _ITEMSIZE[code]:
                    raise QwenError(f"internal error: {name} came out {array.dtype}{array.shape}, expected {code}{shape}")
                sink.write(np.ascontiguousarray(array).data)  # the array's own buffer: no extra copy
        if sink.tell() != len(encoded) + 8 + offset:
            raise QwenError(f"internal error: wrote {sink.tell()} bytes to {path}, expected {len(encoded) + 8 + offset}")


# ------------------------------------------------------------------------------------------------ public


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    dtype: str | None = "float32",
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a Qwen GGUF into a folder at `out_dir` (returned); nothing half-written on failure.

    With a `dtype`, every tensor is dequantized to it: an HF folder. With dtype None, the blocks MLX holds
    exactly (gguf_blocks.KEPT) stay quantized: an MLX affine folder in mlx-lm's layout (mixed bits as
    per-module overrides), the rest float32. A GGUF with no such blocks gives the float32 folder."""
    if dtype is not None:
        check_dtype(dtype)
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    check_output_folder(out_dir, force)  # before the long work, not after it

    reader = _open(gguf_path)
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise QwenError(f"{gguf_path.name} has architecture {arch!r}; only {', '.join(map(repr, ARCHITECTURES))} "
                        "GGUFs can be converted")
    tensors = {t.name: t for t in reader.tensors}
    config = _build_config(meta, tensors, dtype or "float32", arch)
    plan = _plan(reader, config, arch)
    jobs, quantized = _jobs(plan, dtype, config)
    if quantized:
        config["quantization"] = config["quantization_config"] = quantized

    with staged_folder(out_dir, force) as staging:
        tokens = _write_tokenizer(meta, staging, config["max_position_embeddings"])
        _write_json(staging / "config.json", config)
        _write_json(staging / "generation_config.json", _generation_config(meta, tokens))
        _write_safetensors(jobs, staging / "model.safetensors", progress)
        del reader, tensors, plan, jobs  # release the memory map before the swap
    return out_dir


def _plan(reader, config: dict[str, Any], arch: str) -> list[tuple[Any, str, tuple[int, ...], int | None]]:
    """(GGUF tensor, HF name, HF shape, expert index or None) for every tensor, checked against the config."""
    expected = _expected_shapes(config)
    plan = []
    for tensor in reader.tensors:
        names = _hf_names(tensor.name, config)
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if names[0][1] is not None:  # an expert stack: X experts of [out, in]
            if shape[0] != len(names):
                raise QwenError(f"tensor {tensor.name!r} stacks {shape[0]} experts, the metadata says {len(names)}")
            shape = shape[1:]
        for name, expert in names:
            want = expected.get(name)
            if want and name.endswith("shared_expert_gate.weight") and shape == want[1:]:
                shape = want  # llama.cpp may store the [1, hidden] gate as a vector
            if want != shape:
                raise QwenError(f"tensor {tensor.name!r} has shape {shape}, the metadata implies {want}")
            plan.append((tensor, name, shape, expert))
    missing = set(expected) - {name for _, name, _, _ in plan}
    if missing:
        raise QwenError(f"GGUF lacks {len(missing)} tensors of a {arch} model, e.g. {sorted(missing)[0]!r}")
    return plan


def _jobs(plan: list[tuple[Any, str, tuple[int, ...], int | None]], dtype: str | None,
          config: dict[str, Any]) -> tuple[list[Job], dict[str, Any] | None]:
    """What to write, and the folder's `quantization` (None for a float folder). Kept: every matrix whose
    GGUF type is in KEPT, an expert stack as one `mlp.switch_mlp.<proj>` [X, out, in] module as mlx-lm
    stores it; the default bits are the commonest, others per-module overrides, float matrices `false`."""
    def keep(tensor, name: str, shape: tuple[int, ...]) -> bool:
        return (dtype is None and int(tensor.tensor_type) in KEPT and name.endswith(".weight") and "norm" not in name
                and len(shape) == 2 and tuple(reversed(tensor.shape))[-2:] == shape)

    if not any(keep(t, name, shape) for t, name, shape, _ in plan):
        return [_float_job(t, name, shape, expert, dtype or "float32") for t, name, shape, expert in plan], None
    config["torch_dtype"] = config["dtype"] = "float32"
    jobs, bits, floats, stacks = [], {}, [], set()
    for tensor, name, shape, expert in plan:
        module = name.removesuffix(".weight")
        if not keep(tensor, name, shape):
            jobs.append(_float_job(tensor, name, shape, expert, "float32"))
            if name.endswith(".weight") and "norm" not in name and len(shape) == 2:
                floats.append(re.sub(r"\.experts\.\d+\.", ".switch_mlp.", module) if expert is not None else module)
            continue
        if expert is not None:  # the whole stack at once, the first time one of its experts comes by
            module = re.sub(r"\.experts\.\d+\.", ".switch_mlp.", module)
            if module in stacks:
                continue
            stacks.add(module)
            shape = (int(tensor.shape[2]), *shape)
        jobs.append(_kept_job(tensor, module, shape))
        bits[module] = kept_bits(tensor.tensor_type)
    default = max(sorted(set(bits.values())), key=list(bits.values()).count)
    quantization: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": default, "mode": "affine"}
    quantization.update({m: {"group_size": GROUP_SIZE, "bits": b} for m, b in bits.items() if b != default})
    quantization.update({m: False for m in dict.fromkeys(floats)})
    return jobs, quantization


def cached_conversion(gguf_path: str | Path, dtype: str | None = "float32", progress: bool = True) -> Path:
    """convert_gguf into cache_dir()/gguf/<sha256[:16]>-<dtype>/ once (`-blocks` for dtype None: the blocks
    MLX holds exactly kept); later calls return that folder."""
    if dtype is not None:
        check_dtype(dtype)
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise QwenError(f"GGUF file not found: {gguf_path}")
    root = cache_dir() / "gguf"
    target = root / f"{sha256_file(gguf_path)[:16]}-{dtype or 'blocks'}"
    # The folder only ever appears by rename once complete, so its config.json means it is whole.
    if (target / "config.json").is_file():
        return target
    with file_lock(root / f".{target.name}.lock"):
        if (target / "config.json").is_file():
            return target
        return convert_gguf(gguf_path, target, dtype=dtype, force=True, progress=progress)
