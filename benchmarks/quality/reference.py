"""HF transformers as the independent reference: logits of a prefill and of each cached decode step."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

# A prompt and the cached decode steps fed after it, for comparing a backend's logits with the reference's.
RNG = np.random.default_rng(1234)
PROMPT = RNG.integers(0, 500, size=21).tolist()
STEPS = RNG.integers(0, 500, size=12).tolist()


def load_reference(folder: Path, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    # The folder's config.json picks Qwen2ForCausalLM, Qwen2MoeForCausalLM, Qwen3ForCausalLM, ...
    return AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()


def reference_logits(model, prompt: Sequence[int], steps: Sequence[int]) -> np.ndarray:
    """[1 + len(steps), V]: the logits after the prompt, then after each step token fed through HF's own
    KV cache (which is what a cached decoder must reproduce, dynamic RoPE included)."""
    import torch
    from transformers import DynamicCache

    with torch.no_grad():
        out = model(torch.tensor([list(prompt)]), past_key_values=DynamicCache(config=model.config), use_cache=True)
        rows = [out.logits[0, -1].float().numpy()]
        for t in steps:
            out = model(torch.tensor([[t]]), past_key_values=out.past_key_values, use_cache=True)
            rows.append(out.logits[0, -1].float().numpy())
    return np.stack(rows)


def reference_greedy(model, prompt: Sequence[int], n: int) -> list[int]:
    """n greedy tokens from HF `generate`, with no EOS stop and no repetition penalty."""
    import torch

    with torch.no_grad():
        # eos_token_id=None: keep going through EOS (min_new_tokens would instead forbid EOS and change
        # the greedy choice).
        out = model.generate(torch.tensor([list(prompt)]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             repetition_penalty=1.0, temperature=None, top_p=None, top_k=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def backend_logits(session, prompt: Sequence[int], steps: Sequence[int]) -> np.ndarray:
    """The same rows from one of our backends, through the shared Session."""
    rows = [session.prefill(prompt)]
    rows += [session.step(t) for t in steps]
    return np.stack(rows)
