"""Attention maps: the softmax weights of chosen layers and heads over a prompt, as numbers or a picture.

The MLX model's attention runs on a fused kernel that returns no weights; each chosen layer's `Attention`
gets an `on_weights` callback for one forward pass, which receives softmax(q k^T * scale + causal mask)
computed explicitly after q/k norms and RoPE (qwen_mlx.model.attention_weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np

from .errors import QwenError
from .model import Qwen2ForCausalLM
from .tokenizer import Tokenizer

MAX_PANELS = 64  # a PNG grid beyond this is unreadable: ask for --layers / --heads instead


def parse_indices(text: str | None, count: int, what: str) -> list[int]:
    """'0,3,5' -> [0, 3, 5] checked against `count` (None: all of them)."""
    if text is None:
        return list(range(count))
    out = []
    for part in text.split(","):
        try:
            i = int(part.strip())
        except ValueError:
            raise QwenError(f"--{what}s takes comma-separated integers, got {text!r}") from None
        if not 0 <= i < count:
            raise QwenError(f"unknown {what} {i}: this model has {count} {what}s (0..{count - 1})")
        if i not in out:
            out.append(i)
    if not out:
        raise QwenError(f"--{what}s names no {what}")
    return out


def attention_maps(model: Qwen2ForCausalLM, ids: Sequence[int], layers: Sequence[int],
                   heads: Sequence[int]) -> np.ndarray:
    """One forward pass over `ids` -> float32 [layers, heads, tokens, tokens] (row i: query token i)."""
    if not ids:
        raise QwenError("the prompt is empty")
    recorded: dict[int, mx.array] = {}
    attn = [model.model.layers[i].self_attn for i in layers]
    for i, a in zip(layers, attn):
        a.on_weights = lambda w, i=i: recorded.__setitem__(i, w[0][mx.array(list(heads))])  # heads T T
    try:
        model(mx.array([list(ids)], dtype=mx.int32), model.make_cache())
        out = mx.stack([recorded[i] for i in layers])
        return np.array(out.astype(mx.float32))
    finally:
        for a in attn:
            a.on_weights = None


def token_labels(tokenizer: Tokenizer, ids: Sequence[int]) -> tuple[list[str], list[bool]]:
    """Each token's text as a person reads it (decoded alone) and whether it is a special token."""
    return [tokenizer.decode([i]) for i in ids], [tokenizer.is_special(i) for i in ids]


def save_npz(path: Path, weights: np.ndarray, tokens: list[str], layers: list[int], heads: list[int]) -> None:
    np.savez(path, attentions=weights.astype(np.float32), tokens=np.array(tokens, dtype=str),
             layers=np.array(layers), heads=np.array(heads))


def save_png(path: Path, weights: np.ndarray, tokens: list[str], special: list[bool], layers: list[int],
             heads: list[int], title: str = "") -> None:
    """A grid of heatmaps, one row per layer and one column per head, axes labelled with the tokens
    (special tokens in red)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise QwenError("drawing attention maps needs matplotlib: pip install -e '.[viz]' "
                        "(or write --out FILE.npz)") from None
    n_layers, n_heads, T, _ = weights.shape
    if n_layers * n_heads > MAX_PANELS:
        raise QwenError(f"{n_layers} layers x {n_heads} heads = {n_layers * n_heads} heatmaps is too many for "
                        f"one readable picture (at most {MAX_PANELS}): choose some with --layers / --heads, "
                        "or write --out FILE.npz")
    labels = [" ".join(t.split()) or repr(t) for t in tokens]  # newlines and blanks stay visible
    cell = max(2.5, 0.22 * T)
    fig, axes = plt.subplots(n_layers, n_heads, figsize=(cell * n_heads + 1, cell * n_layers + 1), squeeze=False)
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            ax = axes[r][c]
            ax.imshow(weights[r, c], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
            ax.set_xticks(range(T))
            ax.set_yticks(range(T))
            ax.set_xticklabels(labels, rotation=90, fontsize=6)
            ax.set_yticklabels(labels, fontsize=6)
            for tick_labels in (ax.get_xticklabels(), ax.get_yticklabels()):
                for label, is_special in zip(tick_labels, special):
                    if is_special:
                        label.set_color("red")
                        label.set_fontweight("bold")
    fig.suptitle((title + "\n" if title else "") + "rows: query token, columns: key token; special tokens in red",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / fig.get_figheight()))  # room for the title
    fig.savefig(path, dpi=100)
    plt.close(fig)
