"""Attention maps: the softmax weights of chosen layers and heads over a prompt, as numbers or a picture.

The MLX model's attention runs on a fused kernel that returns no weights; each chosen layer's `Attention`
gets an `on_weights` callback for one forward pass, which receives softmax(q k^T * scale + causal mask)
computed explicitly after q/k norms and RoPE (qwen_mlx.models.base.attention_weights). In the hybrid family
(Qwen3-Next, Qwen3.5) only the full-attention layers have such weights.

Precision (`float64_model`, the CLI's default): in float32 the maps are only known to ~5e-5 on real Qwen2
checkpoints. Their q/k biases make some attention scores large (|score| ~1,500 in the 0.5B model's first
layer), where one float32 rounding step of the score moves a sharp softmax row by ~1e-4 * p(1 - p); HF
transformers' own float32 eager maps are 5.9e-5 from its float64 ones there, and no float32 implementation
with another summation order can be nearer. So the diagnostic runs the forward in float64 on the CPU, with
the float32 steps HF keeps whatever the model's dtype: RoPE's cos and sin (inv_freq and position * inv_freq
in float32, then widened) and RMSNorm (normalized in float32). Layer 0's maps are then 1.6e-6 from a plain
float64 computation of them, and every layer's are within 1e-5 of HF's eager maps run in float64 (its one
float32 step, the softmax, taken in float64 too: tests/test_attention_maps.py, `-m real`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import ModelArgs
from .errors import QwenError
from .models.qwen2 import Qwen2ForCausalLM
from .tokenizer import Tokenizer

MAX_PANELS = 64  # a PNG grid beyond this is unreadable: ask for --layers / --heads instead


def attention_layers(args: ModelArgs) -> list[int]:
    """The layers that have attention weights: all of them, or the hybrid family's full-attention layers (its
    Gated DeltaNet layers hold a recurrent state, not softmax weights)."""
    if not args.hybrid:
        return list(range(args.num_hidden_layers))
    return [i for i, kind in enumerate(args.layer_types) if kind != "linear_attention"]


def parse_layers(text: str | None, args: ModelArgs) -> list[int]:
    """--layers checked against the model's layers; a hybrid model's linear layers are refused by name."""
    allowed = attention_layers(args)
    layers = allowed if text is None else parse_indices(text, args.num_hidden_layers, "layer")
    for i in layers:
        if i not in allowed:
            raise QwenError(f"layer {i} of this {args.model_type} model is a Gated DeltaNet (linear attention) "
                            f"layer: it has no attention weights. Its attention layers are "
                            f"{', '.join(map(str, allowed))}")
    return layers


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


class HFRoPE(nn.Module):
    """RoPE for the float64 maps: cos and sin from float32 angles, as HF's rotary embedding makes them (and
    scaled by yarn's attention factor there), applied to float64 q or k B H L D."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args

    def __call__(self, x: mx.array, offset: int) -> mx.array:
        L, D = x.shape[2], x.shape[3]
        inv_freq, factor = self.args.rope_frequencies(offset + L)  # float32; seq_len matters for dynamic only
        angles = np.arange(offset, offset + L, dtype=np.float32)[:, None] * inv_freq[None]   # L D/2, float32
        angles = np.concatenate([angles, angles], axis=-1)                                     # L D
        cos = mx.array((np.cos(angles) * np.float32(factor)).astype(np.float64))
        sin = mx.array((np.sin(angles) * np.float32(factor)).astype(np.float64))
        rotated = mx.concatenate([-x[..., D // 2:], x[..., :D // 2]], axis=-1)               # rotate_half
        return x * cos + rotated * sin


class HFRMSNorm(nn.Module):
    """RMSNorm for the float64 maps as HF's Qwen2/Qwen3 RMSNorm computes it whatever the model's dtype:
    normalized in float32, widened, then scaled by the (float64) weight."""

    def __init__(self, norm: nn.RMSNorm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def __call__(self, x: mx.array) -> mx.array:
        x32 = x.astype(mx.float32)
        y = x32 * mx.rsqrt((x32 * x32).mean(axis=-1, keepdims=True) + self.eps)
        return self.weight * y.astype(x.dtype)


def float64_model(model: Qwen2ForCausalLM) -> Qwen2ForCausalLM:
    """Convert `model` in place for the maps (module docstring): float64 weights and activations, with HF's
    float32 islands (RoPE angles, RMSNorm). MLX computes float64 on the CPU only; `attention_maps` runs it there."""
    if model.args.num_experts:
        raise QwenError("float64 attention maps need a dense model: MLX's gather_mm (the experts) has no float64; "
                        "use --dtype float32")
    if model.args.hybrid:  # its islands (partial RoPE, zero-centred norms, the float32 delta rule) differ
        raise QwenError(f"float64 attention maps are for Qwen2/Qwen3 models; for {model.args.model_type} use "
                        "--dtype float32")
    model.set_dtype(mx.float64)
    for layer in model.model.layers:
        a = layer.self_attn
        a.rope = HFRoPE(model.args)
        layer.input_layernorm = HFRMSNorm(layer.input_layernorm)
        layer.post_attention_layernorm = HFRMSNorm(layer.post_attention_layernorm)
        if a.qk_norm:
            a.q_norm, a.k_norm = HFRMSNorm(a.q_norm), HFRMSNorm(a.k_norm)
    model.model.norm = HFRMSNorm(model.model.norm)
    return model


def attention_maps(model: Qwen2ForCausalLM, ids: Sequence[int], layers: Sequence[int],
                   heads: Sequence[int]) -> np.ndarray:
    """One forward pass over `ids` -> float32 [layers, heads, tokens, tokens] (row i: query token i)."""
    if not ids:
        raise QwenError("the prompt is empty")
    recorded: dict[int, mx.array] = {}
    attn = [model.model.layers[i].self_attn for i in layers]
    for i, a in zip(layers, attn):
        a.on_weights = lambda w, i=i: recorded.__setitem__(i, w[0][mx.array(list(heads))])  # heads T T
    f64 = model.model.norm.weight.dtype == mx.float64
    try:
        with mx.stream(mx.cpu if f64 else mx.default_stream(mx.default_device())):
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
