"""Sampling rules, in one home: `host` on numpy logits (every backend, pure numpy) and `device` the same rules
on MLX arrays for a batch of rows (qwen_mlx/backends/mlx_batch.py on a GPU), side by side. Importing the
package loads the host rules only (no MLX)."""

from .host import Draw, Sampler, SamplingParams, apply_penalties, log_softmax

__all__ = ["Draw", "Sampler", "SamplingParams", "apply_penalties", "log_softmax"]
