"""GGUF (architecture `qwen2`) -> a standard Hugging Face folder.

The folder holds config.json, generation_config.json, model.safetensors, tokenizer.json and
tokenizer_config.json, and loads with `transformers.Qwen2ForCausalLM.from_pretrained` as well as with
this project's own MLX loader. Weights are dequantized with the `gguf` package's own
`gguf.quants.dequantize` (the code llama.cpp ships), so float32 output is exact.

Deliberately free of torch and mlx: numpy, gguf and tokenizers only.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from .dtypes import BYTES, DTYPES, SAFETENSORS, check_dtype
from .errors import QwenError
from .files import check_output_folder, staged_folder
from .paths import cache_dir
from .progress import progress_bar


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
        raise QwenError(f"GGUF metadata lacks {key!r}; cannot build a qwen2 config")
    return meta[key]


def _float32_decimal(value: float) -> float:
    """The shortest decimal that round-trips the float32 GGUF stores: 9.99999997e-07 -> 1e-06."""
    return float(str(np.float32(value)))


# ------------------------------------------------------------------------------------------------ config


def _build_config(meta: dict[str, Any], tensors: dict[str, Any], dtype: str) -> dict[str, Any]:
    arch = "qwen2"
    hidden = int(_require(meta, f"{arch}.embedding_length"))
    heads = int(_require(meta, f"{arch}.attention.head_count"))
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise QwenError("GGUF has no token_embd.weight tensor")
    config: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": int(_require(meta, f"{arch}.feed_forward_length")),
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
    return config


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


def _hf_name(gguf_name: str, num_layers: int) -> str:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if match and int(match[1]) < num_layers and match[2] in _LAYER_NAMES:
        return f"model.layers.{match[1]}.{_LAYER_NAMES[match[2]]}"
    raise QwenError(f"unexpected tensor {gguf_name!r} in a qwen2 GGUF")


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF name -> shape, so a GGUF whose tensors disagree with its own metadata fails loudly."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    return shapes


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


def _write_safetensors(plan: list[tuple[Any, str, tuple[int, ...]]], path: Path, dtype: str, progress: bool) -> None:
    """Stream one tensor at a time into a safetensors file, so peak memory is one dequantized tensor.

    The header needs only names, shapes and dtypes, all known before any data is decoded. Writing the
    format directly (8-byte little-endian header length, JSON header, raw bytes) also gives bfloat16,
    which `safetensors.numpy` cannot express.
    """
    from gguf.quants import dequantize

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for _, name, shape in plan:
        size = int(np.prod(shape)) * BYTES[dtype]
        header[name] = {"dtype": SAFETENSORS[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keep the data 8-byte aligned
    with open(path, "wb") as sink:
        sink.write(len(encoded).to_bytes(8, "little"))
        sink.write(encoded)
        items = progress_bar(plan, "converting tensors") if progress else plan
        for tensor, _, shape in items:
            # GGUF lists dims fastest-first; `dequantize` returns numpy (row-major) order already.
            values = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
            sink.write(_cast(values, dtype).data)  # the array's own buffer: no extra copy
            del values
        if sink.tell() != len(encoded) + 8 + offset:
            raise QwenError(f"internal error: wrote {sink.tell()} bytes to {path}, expected {len(encoded) + 8 + offset}")


# ------------------------------------------------------------------------------------------------ public


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    dtype: str = "float32",
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a qwen2 GGUF into an HF folder at `out_dir` (returned); nothing half-written on failure."""
    check_dtype(dtype)
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    check_output_folder(out_dir, force)  # before the long work, not after it

    reader = _open(gguf_path)
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "qwen2":
        raise QwenError(f"{gguf_path.name} has architecture {arch!r}; only 'qwen2' GGUFs can be converted")
    tensors = {t.name: t for t in reader.tensors}
    config = _build_config(meta, tensors, dtype)
    expected = _expected_shapes(config)
    plan = []
    for tensor in reader.tensors:
        name = _hf_name(tensor.name, config["num_hidden_layers"])
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if expected.get(name) != shape:
            raise QwenError(f"tensor {tensor.name!r} has shape {shape}, the metadata implies {expected.get(name)}")
        plan.append((tensor, name, shape))
    missing = set(expected) - {name for _, name, _ in plan} - ({"lm_head.weight"} if config["tie_word_embeddings"] else set())
    if missing:
        raise QwenError(f"GGUF lacks {len(missing)} tensors of a qwen2 model, e.g. {sorted(missing)[0]!r}")

    with staged_folder(out_dir, force) as staging:
        tokens = _write_tokenizer(meta, staging, config["max_position_embeddings"])
        _write_json(staging / "config.json", config)
        _write_json(staging / "generation_config.json", _generation_config(meta, tokens))
        _write_safetensors(plan, staging / "model.safetensors", dtype, progress)
        del reader, tensors, plan  # release the memory map before the swap
    return out_dir


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent processes (pytest workers) build a cache entry once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    """Content hash, memoized per (path, size, mtime) so repeated calls in one process stay cheap."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_MEMO:
        digest = hashlib.sha256()
        with open(path, "rb") as source:
            while chunk := source.read(1 << 22):
                digest.update(chunk)
        _SHA_MEMO[key] = digest.hexdigest()
    return _SHA_MEMO[key]


def cached_conversion(gguf_path: str | Path, dtype: str = "float32", progress: bool = True) -> Path:
    """convert_gguf into cache_dir()/gguf/<sha256[:16]>-<dtype>/ once; later calls return that folder."""
    check_dtype(dtype)
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise QwenError(f"GGUF file not found: {gguf_path}")
    root = cache_dir() / "gguf"
    target = root / f"{_sha256(gguf_path)[:16]}-{dtype}"
    # The folder only ever appears by rename once complete, so its config.json means it is whole.
    if (target / "config.json").is_file():
        return target
    with file_lock(root / f".{target.name}.lock"):
        if (target / "config.json").is_file():
            return target
        return convert_gguf(gguf_path, target, dtype=dtype, force=True, progress=progress)
