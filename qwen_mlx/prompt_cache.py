"""Saved prompt caches: the KV cache of a long prompt written once, so later runs prefill only what follows.

The file is safetensors (`mx.save_safetensors`): `{layer}.keys` / `{layer}.values` B K T D per attention layer
(`{layer}.conv` / `{layer}.recurrent` for a hybrid model's Gated DeltaNet layers: the state after the prompt), and
metadata naming what the numbers are only valid for: the model (sha256 of config.json and of the weight
files' safetensors headers, so another checkpoint or a re-export is caught without hashing gigabytes), the
dtype and weight quantization, the tokenizer (sha256 of tokenizer.json), and the token ids themselves.
MLX backend only: each cache kind says what it saves (qwen_mlx/models/cache.py: `saved`, `load_saved`). The
file is always float; a run with `--kv-bits` quantizes the keys and values on load.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .backends import LoadedModel
from .formats.safetensors import safetensors_files
from .errors import QwenError
from .files import staged_file

FORMAT = "qwen-mlx-prompt-cache/1"


@dataclass
class CachedPrompt:
    tokens: list[int]      # the ids the cache holds; a prompt must start with them
    system: str | None     # the system message the tokens render, when cached through the chat template


def model_identity(folder: Path) -> str:
    """sha256 of config.json and of every weight file's name and safetensors header (names, dtypes, shapes,
    offsets): cheap, and different for another checkpoint, dtype or conversion."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for file in safetensors_files(folder):
        with open(file, "rb") as f:
            size = f.read(8)
            h.update(file.name.encode() + size + f.read(struct.unpack("<Q", size)[0]))
    return h.hexdigest()


def tokenizer_identity(folder: Path) -> str:
    return hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()


def _identity(loaded: LoadedModel) -> dict[str, str]:
    backend = _mlx_backend(loaded)
    return {"format": FORMAT, "model": model_identity(loaded.folder), "dtype": backend.dtype,
            "quantize": str(getattr(backend, "quantize", None)), "tokenizer": tokenizer_identity(loaded.folder)}


def _mlx_backend(loaded: LoadedModel):
    if loaded.backend.name != "mlx":
        raise QwenError(f"prompt caches work with the mlx backend only, not {loaded.backend.name}")
    return loaded.backend


def save_prompt_cache(path: Path, loaded: LoadedModel, tokens: Sequence[int], system: str | None = None) -> None:
    """Prefill `tokens` and write their KV cache to `path`."""
    import mlx.core as mx

    from .backends.base import Session

    if Path(path).suffix != ".safetensors":  # MLX names the file by it, and reads the format from it
        raise QwenError(f"a prompt cache file must end in .safetensors, got {Path(path).name}")
    backend = _mlx_backend(loaded)
    if len(tokens) >= backend.args.context_length:
        raise QwenError(f"the document has {len(tokens)} tokens; this model's context holds "
                        f"{backend.args.context_length}")
    if getattr(backend, "kv_bits", None):
        raise QwenError("a prompt cache is saved in float (it may be loaded with or without --kv-bits); "
                        "make it without --kv-bits")
    Session(backend).prefill(list(tokens))
    arrays = {f"{i}.{name}": array for i, c in enumerate(backend.cache) for name, array in c.saved().items()}
    metadata = {**_identity(loaded), "tokens": json.dumps(list(tokens))}
    if system is not None:
        metadata["system"] = system
    with staged_file(path) as staging:
        mx.save_safetensors(str(staging), arrays, metadata)


def load_prompt_cache(path: Path, loaded: LoadedModel) -> CachedPrompt:
    """Fill the backend's KV cache from `path` after checking it was made by this model, dtype and
    tokenizer; returns the token ids it holds (hand them to `Session(backend, tokens=...)`)."""
    import mlx.core as mx

    backend = _mlx_backend(loaded)
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as e:
        raise QwenError(f"cannot read the prompt cache {path}: {e}") from None
    if metadata.get("format") != FORMAT:
        raise QwenError(f"{path} is not a qwen-mlx prompt cache")
    expected = _identity(loaded)
    for key, what in (("model", "another model"), ("dtype", "another dtype"), ("quantize", "another --quantize"),
                      ("tokenizer", "another tokenizer")):
        if metadata.get(key) != expected[key]:
            detail = f" ({metadata.get(key)}, this run: {expected[key]})" if key in ("dtype", "quantize") else ""
            raise QwenError(f"the prompt cache {path} was made with {what}{detail}; make it again with "
                            "`cli.py cache-prompt` for this model")
    tokens = json.loads(metadata["tokens"])
    for i, c in enumerate(backend.cache):
        c.load_saved({name.split(".", 1)[1]: a for name, a in arrays.items() if name.split(".", 1)[0] == str(i)},
                     len(tokens))
    return CachedPrompt(tokens, metadata.get("system"))


def check_prefix(cached: Sequence[int], prompt: Sequence[int]) -> None:
    """The prompt must start with the cached tokens (the cache holds their keys and values, nothing else)."""
    if list(prompt[:len(cached)]) != list(cached):
        at = next((i for i, (a, b) in enumerate(zip(cached, prompt)) if a != b), min(len(cached), len(prompt)))
        raise QwenError(f"the prompt does not start with the cached prompt's {len(cached)} tokens (they differ "
                        f"from token {at}); the prompt must begin with the cached document, rendered the same way")
