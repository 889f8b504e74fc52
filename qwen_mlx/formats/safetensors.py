"""safetensors checkpoints without reading a tensor: which files hold the weights, and each file's header.

The header names every tensor's dtype, shape and byte range, so a checkpoint is checked against its config
(qwen_mlx/checkpoint.py) and a truncated or corrupt file is named before any framework reads it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import QwenError
from ..files import read_json

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors dtype string: F32, BF16, F16, ...
    shape: tuple[int, ...]
    name: str = ""  # the key in the file, where the model names it otherwise (ModelArgs.checkpoint_key)



def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files: the shards of an index, one model.safetensors, or any *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise QwenError(f"{index}: no weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise QwenError(f"{folder}: shards listed in the index are missing: {', '.join(missing[:5])}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir()):
        raise QwenError(f"{folder}: only pickle weights (.bin/.pt) found; they are refused because loading a "
                        "pickle can run arbitrary code. Convert the checkpoint to safetensors first")
    raise QwenError(f"{folder}: no weights (*.safetensors) found")


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header without reading the tensors; catches truncated and corrupt files."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or 8 + n > size:
                raise ValueError("header length is past the end of the file")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise QwenError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    tensors = {}
    for key, meta in header.items():
        try:
            start, end = meta["data_offsets"]
            dtype, shape = meta["dtype"], tuple(meta["shape"])
        except (KeyError, TypeError, ValueError):
            raise QwenError(f"{path}: corrupt safetensors header entry {key!r}") from None
        if end > data_size or start > end:
            raise QwenError(f"{path}: truncated safetensors file ({key} ends past the end of the file)")
        tensors[key] = TensorInfo(path, dtype, shape, key)
    return tensors
