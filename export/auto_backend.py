"""`--backend auto` on this machine: the pure choice (qwen_mlx/backends/choice.py) fed with the machine's facts,
the exporter's answer and the export cache (export/cached_export.py), then the banner that says what was taken.

It lives in `export` because the ONNX path needs the exporter; qwen_mlx never imports it (cli.py does).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from qwen_mlx.backends.choice import Asked, Choice, Machine, banner, choose_backend, probe_machine
from qwen_mlx.checkpoint import prepare_model, resolve_model
from qwen_mlx.errors import QwenError

from .cached_export import cached_export, entry, is_complete, refusal


@dataclass(frozen=True)
class Resolved:
    """What to load: the backend and the flags it takes (those the choice consumed are None)."""
    backend: str
    model: str | None
    dtype: str | None
    quantize: str | None
    onnx_dtype: str | None
    choice: Choice


def resolve_auto(model: str | None, dtype: str | None, quantize: str | None, onnx_dtype: str | None,
                 mlx_only: tuple[str, ...] = (), machine: Machine | None = None) -> Resolved:
    """Choose, make the ONNX export if it is chosen and missing, print the banner; `machine` defaults to this one."""
    machine = machine or probe_machine()
    spec = _local(model)
    # The default model and Hub ids are resolved here once; the backend then loads that folder.
    model = str(spec) if model is None or not Path(model).expanduser().exists() else model
    asked = Asked(dtype, quantize, onnx_dtype, tuple(mlx_only), onnx_folder=is_onnx_folder(spec))

    def exporter_refusal(variant: str) -> str | None:
        target = entry(spec, variant)
        if is_complete(target, variant):
            return None
        return refusal(prepare_model(model, gguf_blocks=True), target)  # a GGUF: the blocks MLX would run

    choice = choose_backend(machine, asked, exporter_refusal)
    if choice.backend == "mlx":
        _say(choice)
        return Resolved("mlx", model, dtype, quantize, onnx_dtype, choice)
    if asked.onnx_folder:
        _say(choice)
        return Resolved("onnx", model, dtype, quantize, onnx_dtype, choice)
    target = entry(spec, choice.variant)
    reused = is_complete(target, choice.variant)
    if not reused:
        try:
            # A GGUF is exported from its float32 conversion (its blocks are not MatMulNBits' layout); an MLX
            # 4-bit folder from its stored codes, which the exporter carries into MatMulNBits.
            cached_export(spec, prepare_model(model), choice.variant, target)
        except QwenError as e:
            fallback = Choice("mlx", f"no GPU for MLX here, but the ONNX export of this model failed: {e}")
            _say(fallback)
            return Resolved("mlx", model, dtype, quantize, onnx_dtype, fallback)
    _say(choice, f"{'reused' if reused else 'made'} {target}")
    return Resolved("onnx", str(target), None, None, choice.variant, choice)


def _local(model: str | None) -> Path:
    """`--model` as a local path: a file or folder as given, the default model and Hub ids fetched (or the
    offline checkpoint), as every backend resolves them."""
    if model is not None and Path(model).expanduser().exists():
        return Path(model).expanduser().absolute()
    return resolve_model(model)


def is_onnx_folder(path: Path) -> bool:
    """A folder `export-onnx` wrote (or any folder of .onnx files): only the onnx backend reads it."""
    return path.is_dir() and any(d.is_dir() and any(d.glob("*.onnx")) for d in (path / "onnx", path))


def _say(choice: Choice, where: str | None = None) -> None:
    print(banner(choice, where), file=sys.stderr, flush=True)
    if choice.hint:
        print(choice.hint, file=sys.stderr, flush=True)
