"""The tokenizer side of a GGUF conversion (qwen_mlx/formats/gguf.py): tokenizer.json, tokenizer_config.json
(with the chat template) and generation_config.json rebuilt from the GGUF's `tokenizer.*` metadata.

A GGUF keeps the byte-level BPE vocabulary, its merges and token types, and names its pre-tokenizer
(`tokenizer.ggml.pre`); the split regex each name stands for is written back as Qwen's own tokenizer.json has
it. The writer's direction (`vocab_for_gguf`: the token list, types and pre-tokenizer name a GGUF holds, for
qwen_mlx/formats/gguf_write.py) sits here too, beside the table it inverts. Also the two helpers every GGUF
module shares, here because this module imports no GGUF sibling: `require` (a metadata key, or a QwenError
naming it) and `write_json`.

Deliberately free of torch and mlx: tokenizers only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import QwenError


# The split regex of Qwen2's tokenizer.json (single digits, unlike GPT-4's \p{N}{1,3}).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3.5's: letters and combining marks stay together (`[\p{L}\p{M}]+`), as its tokenizer.json has it.
QWEN35_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# llama.cpp's `tokenizer.ggml.pre` names -> the split regex each stands for.
_PRE_REGEX = {"qwen2": QWEN2_SPLIT_REGEX, "deepseek-r1-qwen": QWEN2_SPLIT_REGEX, "qwen35": QWEN35_SPLIT_REGEX}
_CONTROL, _USER_DEFINED = 3, 4  # gguf.TokenType values


def require(meta: dict[str, Any], key: str) -> Any:
    if key not in meta:
        raise QwenError(f"GGUF metadata lacks {key!r}; cannot build a {key.split('.')[0]} config")
    return meta[key]


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def generation_config(meta: dict[str, Any], tokens: list[str]) -> dict[str, Any]:
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


def write_tokenizer(meta: dict[str, Any], folder: Path, model_max_length: int) -> list[str]:
    """tokenizer.json + tokenizer_config.json from the GGUF vocab; returns the token list."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise QwenError(f"GGUF tokenizer model is {model!r}; a qwen2 checkpoint needs byte-level BPE ('gpt2')")
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in _PRE_REGEX:
        raise QwenError(f"GGUF pre-tokenizer is {pre!r}; supported: {sorted(_PRE_REGEX)}")
    tokens: list[str] = list(require(meta, "tokenizer.ggml.tokens"))
    types: list[int] = [int(t) for t in meta.get("tokenizer.ggml.token_type", [1] * len(tokens))]
    merges_raw: list[str] = list(require(meta, "tokenizer.ggml.merges"))
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
            pre_tokenizers.Split(Regex(_PRE_REGEX[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    # CONTROL tokens are special (skipped on decode); USER_DEFINED ones (<tool_call>) are matched whole
    # but kept in decoded text. Both already sit in the vocab, so their ids do not move.
    added = [
        AddedToken(tokens[i], special=types[i] == _CONTROL, normalized=False, single_word=False, lstrip=False,
                   rstrip=False)
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
    write_json(folder / "tokenizer_config.json", config)
    return tokens


# ------------------------------------------------------------------------------------ the writer's direction

_NORMAL, _UNUSED = 1, 5  # gguf.TokenType values


def vocab_for_gguf(folder: Path, vocab_size: int) -> tuple[list[str], list[int], str]:
    """(tokens, token types, `tokenizer.ggml.pre`) for a GGUF from an HF folder's tokenizer.json, as llama.cpp's
    converter lists them: one token per embedding row (ids the tokenizer lacks as `[PAD{i}]`, unused), added
    tokens CONTROL where special (or spelled `<|...|>`), else USER_DEFINED. The pre-tokenizer is named by its
    split regex (the inverse of _PRE_REGEX): llama.cpp implements those names, not regexes."""
    path = folder / "tokenizer.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise QwenError(f"{folder} has no tokenizer.json; a GGUF carries the tokenizer") from None
    except ValueError as error:
        raise QwenError(f"{path}: corrupt JSON ({error})") from None
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise QwenError(f"{path}: a {model.get('type')!r} tokenizer; GGUF out writes Qwen's byte-level BPE")
    pre = _pre_name(data.get("pre_tokenizer") or {})
    if pre is None:
        raise QwenError(f"{path}: its pre-tokenizer's split regex is none llama.cpp names for Qwen "
                        f"({', '.join(sorted(_PRE_REGEX))}); llama.cpp would tokenize otherwise")
    ids = {token: int(i) for token, i in model["vocab"].items()}
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    ids |= {content: int(t["id"]) for content, t in added.items()}
    if max(ids.values()) >= vocab_size:
        raise QwenError(f"{path}: token id {max(ids.values())} is past the model's {vocab_size} embedding rows")
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [_UNUSED] * vocab_size
    for token, i in ids.items():
        tokens[i] = token
        special = token in added and (added[token].get("special") or token.startswith("<|") and token.endswith("|>"))
        types[i] = _CONTROL if special else _USER_DEFINED if token in added else _NORMAL
    return tokens, types, pre


def _pre_name(pre_tokenizer: dict[str, Any]) -> str | None:
    """The llama.cpp name of a tokenizer.json pre-tokenizer's Split regex (the first name wins: `qwen2`)."""
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer])
    regexes = [(s.get("pattern") or {}).get("Regex") for s in steps if s.get("type") == "Split"]
    return next((name for name, regex in _PRE_REGEX.items() if regexes and regexes[0] == regex), None)
