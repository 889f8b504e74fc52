"""`--backend auto`: which backend runs a model on this machine, and why, decided before anything loads.

MLX is the right runtime wherever it has a GPU (Metal on Apple silicon, its CUDA build on NVIDIA). On a machine
with neither, MLX's CPU backend is several times slower than onnxruntime running this project's own ONNX export
(docs/BENCHMARKS.md, "What runs where on a CPU": int4 ONNX decoded 8-12x faster than MLX on the real GGUF, and
faster than llama.cpp on its defaults), so there auto runs that export, made once into the cache by
`export.cached_export`.

`choose_backend` is a pure function of what it is told (the machine, the flags, the exporter's answer), so every
branch is tested without a GPU or an export. Flags the ONNX backend cannot honour (a quantized KV cache,
speculative decoding, prompt caches, ...) choose MLX and say so: an option is never dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import QwenError

# The export extra's modules, as `export.require` names them.
EXPORT_MODULES = ("torch", "onnx", "onnxruntime")
EXPORT_HINT = "pip install -e '.[export]'"
OTHERS = "--backend mlx|onnx|torch picks one yourself"


@dataclass(frozen=True)
class Machine:
    gpu: str | None = None                 # "Metal" or "CUDA" where MLX runs on a GPU here
    missing_export: tuple[str, ...] = ()   # modules of the export extra that are not installed
    launched: bool = False                 # one rank of several (mlx.launch): only MLX splits a model over ranks


@dataclass(frozen=True)
class Asked:
    """What the user's flags ask of the backend."""
    dtype: str | None = None
    quantize: str | None = None
    onnx_dtype: str | None = None
    mlx_only: tuple[str, ...] = ()  # flags given that only the mlx backend honours, as typed ("--kv-bits")
    onnx_folder: bool = False       # --model already is an ONNX export folder


@dataclass(frozen=True)
class Choice:
    backend: str                 # "mlx" or "onnx"
    reason: str                  # why, for the banner
    variant: str | None = None   # onnx: the export file to run, by transformers.js' dtype name (q4, fp32, ...)
    hint: str | None = None      # one line on how to get the faster path, where one is missing


def cpu_variant(dtype: str | None, quantize: str | None) -> tuple[str | None, str]:
    """The ONNX file that honours `--dtype`/`--quantize` on a CPU and beats MLX there, or None and why MLX
    serves the request better. Measured on the 2-core CPU box (docs/BENCHMARKS.md): int4 decodes 8-12x faster
    than MLX; float32 ONNX ~2x faster than MLX float32 with the same greedy tokens."""
    if quantize in ("4", "int4") and dtype in (None, "float32"):
        return "q4", "int4 weights asked"
    if quantize is None and dtype is None:
        return "q4", "the fastest CPU path measured (int4, docs/BENCHMARKS.md)"
    if quantize is None and dtype == "float32":
        return "fp32", "float32 asked: onnxruntime's float32 decodes ~2x faster than MLX's on a CPU, same tokens"
    if quantize == "8":
        return None, ("--quantize 8 asked: the ONNX 8-bit files use one scale per tensor (perplexity x1.18 "
                      "against MLX 8-bit's x1.00)")
    return None, f"--dtype {dtype} asked: the ONNX export runs float32 or int4 fast on a CPU, not {dtype}"


def choose_backend(machine: Machine, asked: Asked, exporter_refusal: Callable[[str], str | None]) -> Choice:
    """MLX or ONNX for `--backend auto`. `exporter_refusal(variant)` is asked only when ONNX would be chosen:
    why that export of this model cannot be had (the exporter refuses a hybrid or Dual Chunk Attention model,
    ...), or None."""
    if asked.onnx_folder:
        return Choice("onnx", "--model is an ONNX export folder", asked.onnx_dtype)
    if asked.onnx_dtype is not None:
        if asked.mlx_only:
            raise QwenError(f"--onnx-dtype runs the onnx backend, but {', '.join(asked.mlx_only)} "
                            f"{'needs' if len(asked.mlx_only) == 1 else 'need'} the mlx backend: drop one of them")
        return Choice("onnx", f"--onnx-dtype {asked.onnx_dtype} asked", asked.onnx_dtype)
    if machine.launched:
        return Choice("mlx", "launched as one of several ranks (mlx.launch): only the mlx backend runs over them")
    if machine.gpu:
        return Choice("mlx", f"MLX runs on the {machine.gpu} GPU here")
    if asked.mlx_only:
        need = "needs" if len(asked.mlx_only) == 1 else "need"
        return Choice("mlx", f"{', '.join(asked.mlx_only)} {need} the mlx backend (MLX on the CPU, slower here)")
    variant, why = cpu_variant(asked.dtype, asked.quantize)
    if variant is None:
        return Choice("mlx", f"{why} (MLX on the CPU)")
    if machine.missing_export:
        return Choice("mlx", f"no GPU for MLX here, and the faster ONNX path needs "
                             f"{', '.join(machine.missing_export)}",
                      hint=f"hint: {EXPORT_HINT} runs this model ~10x faster on this CPU (int4 ONNX)")
    refusal = exporter_refusal(variant)
    if refusal:
        return Choice("mlx", f"no GPU for MLX here, but the ONNX exporter cannot take this model: {refusal}")
    return Choice("onnx", f"no Metal or CUDA GPU for MLX here; {why}", variant)


def banner(choice: Choice, where: str | None = None) -> str:
    """The one line `--backend auto` prints: the path taken, why, and how to choose another."""
    path = f"onnx {choice.variant}" if choice.backend == "onnx" and choice.variant else choice.backend
    at = f" ({where})" if where else ""
    return f"backend auto: {path}{at}: {choice.reason}; {OTHERS}"


def probe_machine() -> Machine:
    """This machine's facts: MLX's GPU, if any, and which export-extra modules are missing (not imported)."""
    import importlib.util
    import os

    missing = tuple(m for m in EXPORT_MODULES if importlib.util.find_spec(m) is None)
    # mlx.launch gives every rank MLX_RANK (and MLX_WORLD_SIZE); a lone process has neither.
    launched = "MLX_RANK" in os.environ or int(os.environ.get("MLX_WORLD_SIZE") or 1) > 1
    return Machine(mlx_gpu(), missing, launched)


def mlx_gpu() -> str | None:
    """"Metal" or "CUDA" where MLX has a GPU here (mlx >= 0.29 exposes both `mx.metal` and `mx.cuda`)."""
    try:
        import mlx.core as mx
    except ImportError:
        return None
    if mx.metal.is_available():
        return "Metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "CUDA"
    return None
