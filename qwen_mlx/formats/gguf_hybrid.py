"""The hybrid family's GGUFs (architectures `qwen3next`, `qwen35`, `qwen35moe`): what qwen_mlx/formats/gguf.py
needs beyond the dense Qwen families, kept apart so that module reads as the generic conversion.

llama.cpp's converter (`convert_hf_to_gguf.py`, conversion/qwen.py) rewrites tensors, and each rewrite is undone
here (`Source`: which GGUF tensors, which rows and columns, which value fix):
- `A_log` is stored as -exp(A_log) (`ssm_a`); `dt_bias` as `ssm_dt.bias`; the conv weight C 1 K squeezed to C K;
- the zero-centred norms (all but the linear layer's gated `ssm_norm`) are stored as 1 + w;
- Qwen3-Next's `in_proj_qkvz` (q, k, v, z per key head) is split into `attn_qkv` (all q, all k, all v) and
  `attn_gate` (z); `in_proj_ba` is kept as `ssm_ba`;
- Qwen3.5's value heads, where they outnumber key heads, are reordered from grouped by key head to tiled
  (rows of the v part of `attn_qkv`, of `attn_gate`, `ssm_alpha`, `ssm_beta`, `ssm_a`, `ssm_dt`, the conv's v
  channels, and the columns of `ssm_out`);
- the multi-token-prediction layer is appended as one more block ("nextn", `{arch}.nextn_predict_layers`):
  `block_prefix` and MTP_NAMES name its tensors as the release does (`mtp.*`), gguf.py's `read_mtp` reads them,
  and the conversion leaves them out of the folder for now;
- `--fuse-qkv` (a full-attention layer's `attn_qkv`) and `--fuse-gate-up-exps` (`ffn_gate_up_exps`, split in
  gguf.py's `_sources`, as for any MoE file) are split.
A row permutation keeps quantized blocks (a block never spans rows); a column permutation keeps them where
whole blocks move, else the tensor is dequantized. Also the config's hybrid fields (`hybrid_config`). The names:
gguf_names.py; the writer (gguf_write.py) applies each rewrite with the same row orders (`qkvz_rows`, `untile`).

`Source` lives here, below gguf.py's plan, because the rewrites are what its rows, cols and fix express; gguf.py
reads every tensor through it.

Deliberately free of torch and mlx: numpy only.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np

from ..errors import QwenError
from .gguf_names import PLUS_ONE
from .gguf_tokenizer import require  # the metadata helper every GGUF module shares; gguf_tokenizer imports none


class Source(NamedTuple):
    """Where one HF tensor's values sit in the GGUF: its `parts` (GGUF tensors) stacked along their rows, then
    `rows` taken from those (None: all, in order; an index array: all, reordered; a slice: one part of a fused
    tensor), `cols` reordered, and `fix` applied to the float values: each undoes one of llama.cpp's rewrites
    (the module docstring lists them). An expert stack's rows are each expert's own."""
    parts: tuple[Any, ...]
    rows: np.ndarray | slice | None = None
    cols: np.ndarray | None = None
    fix: Callable[[np.ndarray], np.ndarray] | None = None


def hybrid_config(meta: dict[str, Any], arch: str, config: dict[str, Any]) -> dict[str, Any]:
    """The hybrid family's fields from llama.cpp's keys: the Gated DeltaNet sizes (`ssm.*`: the value heads are
    its time-step rank, the key heads its group count), which layers are linear (`attention.recurrent_layers`,
    else every `full_attention_interval`-th is full), the rotated share of a head (`rope.dimension_count`)."""
    layers, head_dim = config["num_hidden_layers"], config["head_dim"]
    sizes = {key: int(require(meta, f"{arch}.ssm.{key}")) for key in
             ("conv_kernel", "state_size", "group_count", "time_step_rank", "inner_size")}
    if min(sizes.values()) <= 0:
        raise QwenError(f"GGUF {arch}.ssm.* sizes must be positive, got {sizes}")
    value_heads = sizes["time_step_rank"]
    interval = int(meta.get(f"{arch}.full_attention_interval", 4))
    # The per-layer list first: the converter writes an interval of 4 whenever config.json has none (transformers
    # 5 saves layer_types alone), whatever the layers are.
    recurrent = meta.get(f"{arch}.attention.recurrent_layers")
    if recurrent is not None and len(recurrent) < layers:
        raise QwenError(f"GGUF {arch}.attention.recurrent_layers names {len(recurrent)} layers, the model has {layers}")
    kinds = ([bool(r) for r in recurrent[:layers]] if recurrent is not None
             else [(i + 1) % interval != 0 for i in range(layers)])
    rotated = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    out: dict[str, Any] = {
        "layer_types": ["linear_attention" if linear else "full_attention" for linear in kinds],
        "full_attention_interval": interval,
        "linear_conv_kernel_dim": sizes["conv_kernel"],
        "linear_key_head_dim": sizes["state_size"],
        "linear_num_key_heads": sizes["group_count"],
        "linear_num_value_heads": value_heads,
        "linear_value_head_dim": sizes["inner_size"] // value_heads,
        "partial_rotary_factor": rotated / head_dim,
        "attention_bias": False,
        # transformers 5 reads RoPE from here; the top-level keys stay for older readers (Qwen3-Next's release).
        "rope_parameters": {"rope_type": "default", "rope_theta": config["rope_theta"],
                            "partial_rotary_factor": rotated / head_dim},
    }
    sections = meta.get(f"{arch}.rope.dimension_sections")
    if arch != "qwen3next" and sections is not None:
        # Qwen3.5's interleaved multimodal RoPE: with text alone every section sees the same position, so it
        # is plain RoPE here; kept for the record.
        out["rope_parameters"] |= {"mrope_section": [int(x) for x in sections[:3]], "mrope_interleaved": True}
    if f"{arch}.nextn_predict_layers" in meta:
        out["mtp_num_hidden_layers"] = int(meta[f"{arch}.nextn_predict_layers"])
    return out


def block_prefix(n: int, config: dict[str, Any]) -> str | None:
    """Block n's HF prefix: a decoder layer's, or for the blocks after them (llama.cpp's "nextn") the release's
    multi-token-prediction layer's. With MTP_NAMES (its `mtp.fc` and norms) the one place that block is named:
    gguf.py's `_plan` leaves `mtp.*` out of the folder for now and its `read_mtp` reads it."""
    layers = config["num_hidden_layers"]
    if n < layers:
        return f"model.layers.{n}."
    return f"mtp.layers.{n - layers}." if n < layers + config.get("mtp_num_hidden_layers", 0) else None


def hybrid_qkv(gguf_name: str, tensors: dict[str, Any], config: dict[str, Any],
               arch: str) -> list[tuple[Source, str, int | None]]:
    """`attn_qkv` / `attn_gate`: a linear layer's projections (Qwen3-Next's two joined back into
    `in_proj_qkvz`), or, in a full-attention layer, `--fuse-qkv`'s q, k, v stacked (split again)."""
    _, n, leaf = gguf_name.split(".", 2)
    prefix, tensor = block_prefix(int(n), config), tensors[gguf_name]
    if prefix is None:
        raise QwenError(f"unexpected tensor {gguf_name!r} in a {config['model_type']} GGUF")
    if prefix.startswith("model.") and config["layer_types"][int(n)] == "linear_attention":
        if arch != "qwen3next":
            name = prefix + ("linear_attn.in_proj_qkv.weight" if leaf == "attn_qkv.weight" else
                             "linear_attn.in_proj_z.weight")
            return [(hybrid_source(Source((tensor,)), name, config), name, None)]
        if leaf == "attn_gate.weight":
            return []  # joined to its attn_qkv
        gate = tensors.get(gguf_name.replace("attn_qkv", "attn_gate"))
        if gate is None:
            raise QwenError(f"GGUF has {gguf_name!r} but not its attn_gate (Qwen3-Next's z projection)")
        return [(Source((tensor, gate), qkvz_rows(config)), prefix + "linear_attn.in_proj_qkvz.weight", None)]
    if leaf == "attn_gate.weight":
        raise QwenError(f"unexpected tensor {gguf_name!r} in a full-attention layer of a {arch} GGUF")
    q = 2 * config["num_attention_heads"] * config["head_dim"]  # the queries and their output gate
    kv = config["num_key_value_heads"] * config["head_dim"]
    if int(tensor.shape[1]) != q + 2 * kv:
        raise QwenError(f"GGUF tensor {gguf_name!r} has {int(tensor.shape[1])} rows, the metadata implies {q + 2 * kv}")
    spans = {"q_proj": slice(0, q), "k_proj": slice(q, q + kv), "v_proj": slice(q + kv, q + 2 * kv)}
    return [(Source((tensor,), span), f"{prefix}self_attn.{proj}.weight", None) for proj, span in spans.items()]


def qkvz_rows(config: dict[str, Any]) -> np.ndarray:
    """Qwen3-Next: rows of [attn_qkv; attn_gate] (q of every key head, then k, v, z) in `in_proj_qkvz`'s order
    (q, k, v, z of key head 0, then of key head 1, ...)."""
    heads, dk = config["linear_num_key_heads"], config["linear_key_head_dim"]
    dv = config["linear_num_value_heads"] // heads * config["linear_value_head_dim"]  # values per key head
    kd = heads * dk
    starts = [(0, dk), (kd, dk), (2 * kd, dv), (2 * kd + heads * dv, dv)]  # q, k, v, z: offset, rows per head
    return np.concatenate([np.arange(at + g * size, at + (g + 1) * size) for g in range(heads) for at, size in starts])


def untile(config: dict[str, Any], size: int) -> np.ndarray | None:
    """Qwen3.5: llama.cpp stores the value heads tiled (head r of key head g at r * key_heads + g), the release
    grouped by key head (at g * per_key + r); `size` features each. The gather that undoes it, None if none."""
    heads = config["linear_num_key_heads"]
    per_key = config["linear_num_value_heads"] // heads
    if per_key == 1:
        return None
    return np.arange(per_key * heads * size).reshape(per_key, heads, size).transpose(1, 0, 2).reshape(-1)


def qkv_untile(config: dict[str, Any]) -> np.ndarray | None:
    """The same for q, k, v stacked (in_proj_qkv's rows, the conv's channels): q and k stay, v is untiled."""
    v = untile(config, config["linear_value_head_dim"])
    kd = 2 * config["linear_num_key_heads"] * config["linear_key_head_dim"]
    return None if v is None else np.concatenate([np.arange(kd), kd + v])


def hybrid_source(source: Source, name: str, config: dict[str, Any]) -> Source:
    """The value fixes every hybrid GGUF needs (norms stored 1 + w, A_log as -exp(A_log)), and Qwen3.5's
    value-head order undone."""
    if name.endswith(PLUS_ONE):
        source = source._replace(fix=_minus_one)
    elif name.endswith(".A_log"):
        source = source._replace(fix=_a_log)
    if config["model_type"] == "qwen3_next":
        return source
    if name.endswith(("in_proj_qkv.weight", "conv1d.weight")):
        return source._replace(rows=qkv_untile(config))
    if name.endswith("in_proj_z.weight"):
        return source._replace(rows=untile(config, config["linear_value_head_dim"]))
    if name.endswith(("in_proj_a.weight", "in_proj_b.weight", ".A_log", ".dt_bias")):
        return source._replace(rows=untile(config, 1))
    if name.endswith("out_proj.weight"):
        return source._replace(cols=untile(config, config["linear_value_head_dim"]))
    return source


def _minus_one(values: np.ndarray) -> np.ndarray:
    """A zero-centred norm's w from the stored 1 + w (exact: a float32 in [0.5, 2] minus 1 is)."""
    return values - np.float32(1)


def _a_log(values: np.ndarray) -> np.ndarray:
    """A_log from the stored -exp(A_log)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(-values)
