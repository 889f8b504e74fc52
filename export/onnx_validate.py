"""The check export_onnx runs on what it wrote: the folder on onnxruntime (through OnnxBackend, as a user
runs it) beside the float32 PyTorch twin, and MLX when it imports, on a chat prompt plus cached decode steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from qwen_mlx.checkpoint import Checkpoint
from qwen_mlx.errors import QwenError

from .onnx_format import EIGHT_BIT, VARIANT_FILES, variant_of

# (max |logit diff| relative to the largest logit, greedy agreement required) against the float32 twin.
# fp32 differs only by summation order (measured ~2e-6 on tiny models). fp16, int4 and 8-bit bounds are
# measured values with a wide margin (tiny random models: fp16 2e-3 / 100%, int4 0.46 / 89%, the worst
# case, as random weights quantize badly): they catch a broken export, not a slightly lossy one. 8-bit,
# per-tensor: the real 0.5B checkpoint 0.32 / 44% (q8, int8 weights) and 0.26 / 89% (uint8) over 9
# positions; int8 weights run onnxruntime's uint8 x int8 AVX2 kernel, which saturates 16-bit pair sums on CPUs
# without VNNI (not on WebAssembly, transformers.js' q8 target). A damaged table or layout scores ~0%.
TOLERANCE = {"float32": (2e-4, 1.0), "float16": (2e-2, 0.75), "int4": (0.75, 0.5), "8bit": (0.5, 0.25)}


def tolerance_key(variant: str) -> str:
    """Which TOLERANCE row a file of the set is held to."""
    if variant in EIGHT_BIT:
        return "8bit"
    return {"fp32": "float32", "fp16": "float16", "q4": "int4", "q4f16": "int4"}[variant]


def _validation_prompt(ckpt: Checkpoint) -> list[int]:
    """A chat prompt through the checkpoint's own tokenizer, else fixed random ids."""
    try:
        from qwen_mlx.tokenizer import Tokenizer

        tok = Tokenizer.from_folder(ckpt.folder)
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Write a haiku about rivers."}]))
        if ids and max(ids) < ckpt.args.vocab_size:
            return ids
    except QwenError:
        pass
    return np.random.default_rng(0).integers(0, ckpt.args.vocab_size, size=12).tolist()


def teacher_forced_logits(backend, prompt: list[int], tokens: list[int]) -> list[np.ndarray]:
    """Logits after the prompt and after each of `tokens` fed one by one (cached decode)."""
    backend.trim(0)
    out = [backend.forward(prompt)]
    for t in tokens:
        out.append(backend.forward([t]))
    return out


def compare(reference: list[np.ndarray], other: list[np.ndarray]) -> dict:
    """Max |logit diff|, that relative to the largest reference logit, and greedy agreement."""
    diff = max(float(np.abs(r - o).max()) for r, o in zip(reference, other))
    scale = max(1.0, max(float(np.abs(r).max()) for r in reference))
    agree = float(np.mean([int(np.argmax(r)) == int(np.argmax(o)) for r, o in zip(reference, other)]))
    return {"max_abs_diff": diff, "relative_diff": diff / scale, "greedy_agreement": agree}


def twin_reference(ckpt: Checkpoint, steps: int = 8) -> tuple[list[int], list[int], list[np.ndarray]]:
    """The float32 twin on the validation prompt and `steps` of its own greedy continuation: (prompt, the
    continuation's tokens, the logits after the prompt and after each token). Every file is fed the same."""
    from .backends.torch import TorchBackend

    prompt = _validation_prompt(ckpt)
    twin = TorchBackend(ckpt, "float32")
    reference = [twin.forward(prompt)]
    tokens = []
    for _ in range(steps):
        tokens.append(int(np.argmax(reference[-1])))
        reference.append(twin.forward(tokens[-1:]))
    del twin
    return prompt, tokens, reference


def measure_export(ckpt: Checkpoint, folder: Path, dtype: str = "float32", quantize: str | None = None,
                   steps: int = 8, variants: list[str] | None = None, mlx: bool = True) -> dict:
    """Run the export's files (`variants`, names of onnx_format.VARIANTS; default the one dtype/quantize
    names) on onnxruntime beside the float32 twin (and MLX when importable) on a prompt plus `steps` cached
    decode steps; print the figures on stderr and return them (see compare): one file's figures, or
    {variant: figures} when `variants` is given."""
    from .backends.onnx import OnnxBackend

    names = variants or [variant_of(dtype, quantize)]
    prompt, tokens, reference = twin_reference(ckpt, steps)
    results = {}
    for variant in names:
        onnx_backend = OnnxBackend(folder, variant=variant)
        result = compare(reference, teacher_forced_logits(onnx_backend, prompt, tokens))
        result["device"] = onnx_backend.device
        del onnx_backend
        print(f"validate: onnx ({VARIANT_FILES[variant]}) vs torch float32 on {len(prompt)} prompt tokens + "
              f"{steps} steps: max |logit diff| {result['max_abs_diff']:.3g} (relative "
              f"{result['relative_diff']:.3g}), greedy agreement {result['greedy_agreement']:.0%}", file=sys.stderr)
        results[variant] = result
    figures = _mlx_figures(ckpt, prompt, tokens, reference) if mlx else None
    if figures:
        print(f"validate: mlx float32 vs torch float32: max |logit diff| {figures['max_abs_diff']:.3g}, "
              f"greedy agreement {figures['greedy_agreement']:.0%}", file=sys.stderr)
        for result in results.values():
            result["mlx"] = figures
    return results if variants else results[names[0]]


def validate_export(ckpt: Checkpoint, folder: Path, dtype: str = "float32", quantize: str | None = None,
                    steps: int = 8, variants: list[str] | None = None) -> dict:
    """measure_export, then QwenError when a file is outside its TOLERANCE."""
    names = variants or [variant_of(dtype, quantize)]
    results = measure_export(ckpt, folder, steps=steps, variants=names)
    for variant, result in results.items():
        max_rel, min_agree = TOLERANCE[tolerance_key(variant)]
        if result["relative_diff"] > max_rel or result["greedy_agreement"] < min_agree:
            raise QwenError(f"the exported {VARIANT_FILES[variant]} does not match the PyTorch twin: relative logit "
                            f"diff {result['relative_diff']:.3g} (allowed {max_rel:g}), greedy agreement "
                            f"{result['greedy_agreement']:.0%} (required {min_agree:.0%}); nothing was written")
    return results if variants else results[names[0]]


def _mlx_figures(ckpt: Checkpoint, prompt: list[int], tokens: list[int], reference: list[np.ndarray]) -> dict | None:
    """The same comparison for the MLX model, when MLX imports here (it is informative, not a gate)."""
    try:
        from qwen_mlx.backends.mlx import MLXBackend
    except ImportError:
        return None
    return compare(reference, teacher_forced_logits(MLXBackend(ckpt, "float32"), prompt, tokens))
