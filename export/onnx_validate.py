"""The check export_onnx runs on what it wrote: the folder on onnxruntime (through OnnxBackend, as a user
runs it) beside the float32 PyTorch twin, and MLX when it imports, on a chat prompt plus cached decode steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from qwen_mlx.checkpoint import Checkpoint
from qwen_mlx.errors import QwenError

from .onnx_format import model_filename

# (max |logit diff| relative to the largest logit, greedy agreement required) against the float32 twin.
# fp32 differs only by summation order (measured ~2e-6 on tiny models). fp16 and int4 bounds are measured
# values with a wide margin (tiny random models: fp16 2e-3 / 100%, int4 0.46 / 89%, the worst case, as
# random weights quantize badly): they catch a broken export, not a slightly lossy one.
TOLERANCE = {"float32": (2e-4, 1.0), "float16": (2e-2, 0.75), "int4": (0.75, 0.5)}


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


def measure_export(ckpt: Checkpoint, folder: Path, dtype: str, quantize: str | None, steps: int = 8) -> dict:
    """Run the export on onnxruntime beside the float32 twin (and MLX when importable) on a prompt plus
    `steps` cached decode steps; print the figures on stderr and return them (see compare)."""
    from .onnx_backend import OnnxBackend
    from .torch_backend import TorchBackend

    prompt = _validation_prompt(ckpt)
    twin = TorchBackend(ckpt, "float32")
    reference = [twin.forward(prompt)]
    tokens = []
    for _ in range(steps):  # the twin's own greedy continuation, then every backend is fed the same tokens
        tokens.append(int(np.argmax(reference[-1])))
        reference.append(twin.forward(tokens[-1:]))
    del twin
    onnx_backend = OnnxBackend(folder, dtype, quantize)
    result = compare(reference, teacher_forced_logits(onnx_backend, prompt, tokens))
    result["device"] = onnx_backend.device
    del onnx_backend
    print(f"validate: onnx ({model_filename(dtype, quantize)}) vs torch float32 on {len(prompt)} prompt tokens + "
          f"{steps} steps: max |logit diff| {result['max_abs_diff']:.3g} (relative {result['relative_diff']:.3g}), "
          f"greedy agreement {result['greedy_agreement']:.0%}", file=sys.stderr)
    mlx = _mlx_figures(ckpt, prompt, tokens, reference)
    if mlx:
        result["mlx"] = mlx
        print(f"validate: mlx float32 vs torch float32: max |logit diff| {mlx['max_abs_diff']:.3g}, "
              f"greedy agreement {mlx['greedy_agreement']:.0%}", file=sys.stderr)
    return result


def validate_export(ckpt: Checkpoint, folder: Path, dtype: str, quantize: str | None, steps: int = 8) -> dict:
    """measure_export, then QwenError when outside TOLERANCE."""
    result = measure_export(ckpt, folder, dtype, quantize, steps)
    max_rel, min_agree = TOLERANCE["int4" if quantize else dtype]
    if result["relative_diff"] > max_rel or result["greedy_agreement"] < min_agree:
        raise QwenError(f"the exported model does not match the PyTorch twin: relative logit diff "
                        f"{result['relative_diff']:.3g} (allowed {max_rel:g}), greedy agreement "
                        f"{result['greedy_agreement']:.0%} (required {min_agree:.0%}); nothing was written")
    return result


def _mlx_figures(ckpt: Checkpoint, prompt: list[int], tokens: list[int], reference: list[np.ndarray]) -> dict | None:
    """The same comparison for the MLX model, when MLX imports here (it is informative, not a gate)."""
    try:
        from qwen_mlx.mlx_backend import MLXBackend
    except ImportError:
        return None
    return compare(reference, teacher_forced_logits(MLXBackend(ckpt, "float32"), prompt, tokens))
