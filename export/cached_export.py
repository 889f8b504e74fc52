"""The ONNX export that `--backend auto` runs where MLX has no GPU: made once into the cache, then reused.

An entry is `cache_dir()/onnx/<key>-<variant>/`, an ordinary `export-onnx` folder holding one file (q4: int4
MatMulNBits, fp32: float32), written by the exporter itself into a staging sibling and renamed into place only
when complete and validated (qwen_mlx.files.staged_folder): Ctrl-C or a kill never leaves half an entry, and the
next run removes what a killed one left. A lock makes concurrent first runs export once.

The key says which weights, which tokenizer and which exporter made the entry, cheaply enough to compute on
every start (~1 ms for a folder; a GGUF is hashed whole once per process, as its conversion cache already does):
- a folder: every small file (config, tokenizer, chat template; read whole), and for each safetensors file its
  name, size, modification time and header (names, dtypes, shapes, offsets). Reading every weight would cost
  seconds per start on a 2.5 GB folder; the header catches any change of layout and the size and mtime any
  rewrite (a fine-tune or merged adapter saved over the same names). Copying a folder with its mtimes kept
  reuses the entry; touching a file re-exports it, which costs time but is never wrong.
- a .gguf file: its sha256 (the key of its conversion in cache_dir()/gguf as well).
- the exporter: qwen-mlx's version and EXPORT_FORMAT, bumped whenever the exporter writes a different graph, so
  an upgrade re-exports. Not a hash of the exporter's source: in a checkout being edited that re-exported the
  real checkpoint three times in 20 minutes (8 minutes and 827 MB each) for edits that changed no graph.
A model the exporter could not export (it failed or refused its own check) is recorded beside the entries as
`<key>-<variant>.failed`, holding the reason, so the next start falls back to MLX at once instead of retrying a
minutes-long export; the fallback says which file to delete to try again, and an upgrade tries again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import struct
import sys
from pathlib import Path

from qwen_mlx.checkpoint import Checkpoint
from qwen_mlx.errors import QwenError
from qwen_mlx.files import file_lock, sha256_file, staged_file
from qwen_mlx.formats.safetensors import safetensors_files
from qwen_mlx.paths import cache_dir
from qwen_mlx.progress import progress_activity

from .onnx_export import export_onnx_variants, unsupported
from .onnx_format import VARIANT_FILES

EXPORT_FORMAT = 1  # bump when the exporter's graphs change: every cached export is then made again
SMALL_FILE_BYTES = 64 << 20  # side files read whole into the key (tokenizer.json is ~7 MB); weights are not
# Peak memory of an export over the float32 weights it traces: the traced module, the graph's copy, and
# onnxruntime's quantizer on top. Measured: 7.49 GB peak RSS for the real 0.5B checkpoint's int4 export (1.98 GB
# of float32 weights), validation included (docs/BENCHMARKS.md "What runs where").
EXPORT_MEMORY_FACTOR = 4.0


def source_key(spec: Path) -> str:
    """The key of a model folder or .gguf file, as the module docstring says (hex, 16 characters)."""
    digest = hashlib.sha256(f"qwen-mlx {_version()} onnx export format {EXPORT_FORMAT}\n".encode())
    if spec.is_file():
        digest.update(f"gguf {sha256_file(spec)}\n".encode())
        return digest.hexdigest()[:16]
    weights = set(safetensors_files(spec))
    for path in sorted(p for p in spec.iterdir() if p.is_file() and not p.name.startswith(".")):
        stat = path.stat()
        if path in weights:
            digest.update(f"weights {path.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
            digest.update(_safetensors_header(path))
        elif stat.st_size <= SMALL_FILE_BYTES:
            digest.update(f"file {path.name} {stat.st_size}\n".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _safetensors_header(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(8)
        return head + f.read(struct.unpack("<Q", head)[0]) if len(head) == 8 else head


def _version() -> str:
    try:
        return importlib.metadata.version("qwen-mlx")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def entry(spec: Path, variant: str) -> Path:
    """Where the export of `spec` (a folder or .gguf) as `variant` lives in the cache, made or not."""
    return cache_dir() / "onnx" / f"{source_key(spec)}-{variant}"


def is_complete(folder: Path, variant: str) -> bool:
    # An entry only ever appears by rename once complete, so its model file means it is whole.
    return (folder / "onnx" / VARIANT_FILES[variant]).is_file()


def refusal(ckpt: Checkpoint, target: Path) -> str | None:
    """Why the export at `target` will not be made: the exporter refuses the model, an earlier export of it
    failed, or it would not fit in this machine's memory. None: export it."""
    reason = unsupported(ckpt)
    if reason is None and _failed_marker(target).is_file():
        reason = (f"an earlier export failed ({_failed_marker(target).read_text(encoding='utf-8').strip()}; "
                  f"delete {_failed_marker(target)} to try again)")
    if reason is None:
        need, have = export_memory_bytes(ckpt), physical_memory_bytes()
        if have and need > have:
            reason = (f"its one-time export needs ~{need / 1e9:.0f} GB of memory and this machine has "
                      f"{have / 1e9:.0f} GB")
    return reason


def export_memory_bytes(ckpt: Checkpoint) -> int:
    """The export's peak memory, estimated from the float32 size of the weights it traces."""
    params = 0
    for key, info in ckpt.tensors.items():
        count = 1
        for n in info.shape:
            count *= n
        if info.dtype == "U32":  # packed codes: 32 / bits weights a word (4-bit is the commonest; err high: 8)
            count *= 8
        if key.endswith((".scales", ".biases")):
            continue
        params += count
    return int(params * 4 * EXPORT_MEMORY_FACTOR)


def physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no estimate, no refusal
        return 0


def cached_export(spec: Path, source: Checkpoint, variant: str, target: Path) -> Path:
    """The cache entry `target` (see `entry`), exporting `source` as `variant` into it first unless it is
    there. An export that fails is recorded (see the module docstring) and raised as a QwenError."""
    with file_lock(target.parent / f".{target.name}.lock"):
        if is_complete(target, variant):  # another process made it while this one waited
            return target
        print(f"backend auto: exporting {spec.name} to ONNX {variant} once, into {target} (minutes for a 0.5B "
              "model on 2 cores; reused from then on)", file=sys.stderr, flush=True)
        try:
            with progress_activity(f"one-time ONNX {variant} export of {spec.name}"):
                export_onnx_variants(source, target, [variant], force=True)
        except QwenError as e:
            with staged_file(_failed_marker(target)) as staging:
                staging.write_text(f"{e}\n", encoding="utf-8")
            raise
    return target


def _failed_marker(target: Path) -> Path:
    return target.parent / f"{target.name}.failed"

