"""Model arguments of a Qwen-family checkpoint, read from its HF `config.json`.

Four architectures share one decoder and differ by a few flags:
- `qwen2`: Qwen1.5, Qwen2 and Qwen2.5 dense models (QKV bias);
- `qwen2_moe`: Qwen1.5-MoE and Qwen2-MoE (QKV bias, routed experts plus a sigmoid-gated shared expert);
- `qwen3`: per-head RMSNorm of queries and keys before RoPE (`q_norm`/`k_norm`), `attention_bias` (off);
- `qwen3_moe`: Qwen3 attention with routed experts and no shared expert.
The hybrid family (Qwen3-Next, Qwen3.5, Qwen3.6) is another decoder, built from the same `ModelArgs`:
- `qwen3_next`, `qwen3_5` and `qwen3_5_moe` (also their text-only `qwen3_5_text` / `qwen3_5_moe_text`): Gated
  DeltaNet layers (`linear_attention` in `layer_types`) between gated full-attention layers with partial RoPE;
  Qwen3.5's multimodal config nests the text model under `text_config`, which is what is read here.
This module is pure Python (numpy at most): the MLX model and its PyTorch twin both build from the same
`ModelArgs`, the same RoPE frequencies and the same table of expected tensor shapes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .dual_chunk import DualChunk
from .errors import QwenError

HYBRID_MODEL_TYPES = ("qwen3_next", "qwen3_5", "qwen3_5_moe", "qwen3_5_text", "qwen3_5_moe_text")
SUPPORTED_MODEL_TYPES = ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe", *HYBRID_MODEL_TYPES)
MOE_MODEL_TYPES = ("qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text")
_HYBRID_DEFAULTS = dict(head_dim=256, attention_bias=False, partial_rotary_factor=0.25, linear_conv_kernel_dim=4,
                        linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16,
                        linear_num_value_heads=32, full_attention_interval=4)
_QWEN35_MOE_DEFAULTS = dict(_HYBRID_DEFAULTS, num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
                            shared_expert_intermediate_size=512)
# What transformers' config classes assume when config.json omits a key (the keys that change the math).
MODEL_TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2": {},
    "qwen2_moe": dict(num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632, qkv_bias=True),
    "qwen3": dict(head_dim=128, attention_bias=False),
    "qwen3_moe": dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, attention_bias=False),
    "qwen3_next": dict(_HYBRID_DEFAULTS, num_experts=512, num_experts_per_tok=10, moe_intermediate_size=512,
                       shared_expert_intermediate_size=512, norm_topk_prob=True),
    "qwen3_5": _HYBRID_DEFAULTS,
    "qwen3_5_text": _HYBRID_DEFAULTS,
    "qwen3_5_moe": _QWEN35_MOE_DEFAULTS,
    "qwen3_5_moe_text": _QWEN35_MOE_DEFAULTS,
}
# Qwen3.5-MoE's router always renormalizes its top-k weights (transformers ignores norm_topk_prob there).
_FORCED = {"qwen3_5_moe": dict(norm_topk_prob=True), "qwen3_5_moe_text": dict(norm_topk_prob=True)}
ROPE_TYPES = ("default", "linear", "dynamic", "yarn")


@dataclass
class ModelArgs:
    # Attribute names are the config.json keys, so `from_dict` needs no renaming table.
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 0
    torch_dtype: str | None = None
    layer_types: list[str] | None = None
    hidden_act: str = "silu"
    # ---- qwen2_moe / qwen3 / qwen3_moe (defaults: the dense qwen2 case) ----
    attention_bias: bool | None = None  # qwen3*: bias on q/k/v/o
    qkv_bias: bool | None = None  # qwen2_moe: bias on q/k/v
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int | None = None
    shared_expert_intermediate_size: int = 0  # qwen2_moe only
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    # ---- the hybrid family (qwen3_next, qwen3_5*): Gated DeltaNet layers and gated full attention ----
    partial_rotary_factor: float = 1.0  # the share of head_dim that RoPE rotates
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    full_attention_interval: int = 4
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:  # Qwen1.5 configs may omit it: plain multi-head attention
            self.num_key_value_heads = self.num_attention_heads
        if self.mlp_only_layers is None:  # as transformers reads it
            self.mlp_only_layers = []
        names = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads", "vocab_size", "max_position_embeddings", "head_dim")
        for name in names:
            if name == "head_dim" and self.head_dim is None:
                self.head_dim = self.hidden_size // self.num_attention_heads
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise QwenError(f"config.json: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise QwenError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise QwenError(f"config.json: head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_type not in ROPE_TYPES:
            raise QwenError(f"config.json: rope scaling type {self.rope_type!r} is not supported "
                            f"(supported: {', '.join(ROPE_TYPES)})")
        if self.rope_type != "default" and not float(self.rope_scaling.get("factor") or 0) > 0:
            raise QwenError(f"config.json: rope scaling {self.rope_type!r} needs a positive 'factor'")
        self._check_dual_chunk()  # a malformed dual_chunk_attention_config is refused at load, not at token 1
        if self.hidden_act != "silu":
            raise QwenError(f"config.json: hidden_act {self.hidden_act!r} is not supported (Qwen uses 'silu')")
        self._check_moe()
        self._check_hybrid()

    def _check_hybrid(self) -> None:
        if not self.hybrid:
            if self.partial_rotary_factor != 1.0:
                raise QwenError(f"config.json: partial_rotary_factor {self.partial_rotary_factor} is not supported "
                                f"for model_type {self.model_type!r} (it rotates the whole head)")
            return
        if self.layer_types is None:  # transformers' rule: every full_attention_interval-th layer is full
            self.layer_types = ["linear_attention" if (i + 1) % self.full_attention_interval else "full_attention"
                                for i in range(self.num_hidden_layers)]
        kinds = ("linear_attention", "full_attention")
        if len(self.layer_types) != self.num_hidden_layers or any(t not in kinds for t in self.layer_types):
            raise QwenError(f"config.json: layer_types must name {self.num_hidden_layers} layers, each "
                            f"linear_attention or full_attention, got {self.layer_types!r}")
        for name in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                     "linear_value_head_dim", "linear_conv_kernel_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise QwenError(f"config.json: {name} must be a positive integer, got {value!r}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise QwenError(f"config.json: linear_num_value_heads ({self.linear_num_value_heads}) is not a "
                            f"multiple of linear_num_key_heads ({self.linear_num_key_heads})")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2:
            raise QwenError(f"config.json: partial_rotary_factor {self.partial_rotary_factor} must give an even "
                            f"number of rotated features of head_dim {self.head_dim}")
        if self.extra.get("attn_output_gate", True) is not True:  # q_proj would hold no gate: other shapes, math
            raise QwenError(f"config.json: attn_output_gate {self.extra['attn_output_gate']!r} is not supported "
                            "(Qwen3-Next, Qwen3.5 and Qwen3.6 gate every full-attention output)")

    def _check_moe(self) -> None:
        if self.model_type not in MOE_MODEL_TYPES:
            if self.num_experts:
                raise QwenError(f"config.json: model_type {self.model_type!r} has no experts, "
                                f"but num_experts is {self.num_experts}")
            return
        for name in ("num_experts", "num_experts_per_tok", "decoder_sparse_step", "shared_expert_intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise QwenError(f"config.json: {name} must be a non-negative integer, got {value!r}")
        if self.num_experts:
            m = self.moe_intermediate_size
            if not isinstance(m, int) or isinstance(m, bool) or m <= 0:
                raise QwenError(f"config.json: moe_intermediate_size must be a positive integer, got {m!r}")
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise QwenError(f"config.json: num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 "
                                f"and num_experts ({self.num_experts})")
            if self.decoder_sparse_step < 1:
                raise QwenError("config.json: decoder_sparse_step must be >= 1")
        if not isinstance(self.mlp_only_layers, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.mlp_only_layers):
            raise QwenError(f"config.json: mlp_only_layers must be a list of layer indices, got {self.mlp_only_layers!r}")

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ModelArgs":
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise QwenError(f"unsupported model_type {model_type!r}: qwen-mlx runs "
                            f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints (Qwen1.5, Qwen2, Qwen2.5, "
                            "Qwen1.5-MoE, Qwen2-MoE, Qwen3, Qwen3-MoE, Qwen3-Next, Qwen3.5, Qwen3.6)")
        config = dict(config)
        if isinstance(config.get("text_config"), dict):
            # Qwen3.5's multimodal config: the text model's fields nest under text_config (the vision tower's
            # under vision_config are not read: images are not supported).
            text = {k: v for k, v in config["text_config"].items() if k != "model_type"}
            top = {k: v for k, v in config.items() if k in ("tie_word_embeddings", "torch_dtype", "dtype")}
            config = {**text, **top, "model_type": model_type}
        if "num_local_experts" in config:  # transformers 5 saves Qwen3-MoE's num_experts under this name
            config.setdefault("num_experts", config.pop("num_local_experts"))
        config = {**MODEL_TYPE_DEFAULTS[model_type], **config, **_FORCED.get(model_type, {})}
        # transformers >= 5 writes rope_theta and the scaling inside `rope_parameters`.
        rope_parameters = config.pop("rope_parameters", None)
        if isinstance(rope_parameters, dict):
            if config.get("rope_theta") is None:
                config["rope_theta"] = rope_parameters.get("rope_theta", 10000.0)
            if "partial_rotary_factor" in rope_parameters and "partial_rotary_factor" not in config:
                config["partial_rotary_factor"] = rope_parameters["partial_rotary_factor"]
            kind = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
            if kind != "default" and not config.get("rope_scaling"):
                config["rope_scaling"] = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
        if config.get("torch_dtype") is None and isinstance(config.get("dtype"), str):
            config["torch_dtype"] = config["dtype"]
        known = {f.name for f in fields(cls)} - {"extra"}
        missing = [k for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                               "num_attention_heads", "vocab_size") if k not in config]
        if missing:
            raise QwenError(f"config.json is missing {', '.join(missing)}")
        args = cls(**{k: v for k, v in config.items() if k in known},
                   extra={k: v for k, v in config.items() if k not in known})
        return args

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelArgs":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise QwenError(f"{folder}: no config.json (not a Hugging Face model folder)")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise QwenError(f"{path}: corrupt JSON ({e})") from None
        if not isinstance(config, dict):
            raise QwenError(f"{path}: expected a JSON object")
        return cls.from_dict(config)

    # ---- derived facts --------------------------------------------------------------------------------
    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def dual_chunk(self) -> DualChunk | None:
        """Dual Chunk Attention (qwen_mlx/dual_chunk.py), when config.json asks for it."""
        value = self.extra.get("dual_chunk_attention_config")
        return None if value is None else DualChunk.from_config(value)

    def _check_dual_chunk(self) -> None:
        if self.dual_chunk is not None and self.rope_type == "dynamic":
            # DCA never rotates past chunk_size, while dynamic NTK grows its base with the sequence length:
            # no implementation defines which length the remapped positions should take it from.
            raise QwenError("config.json: dual_chunk_attention_config with dynamic rope scaling is not supported "
                            "(dynamic NTK follows the sequence length, which Dual Chunk Attention's positions "
                            "never reach); remove one of the two")

    @property
    def sliding_layers(self) -> list[int]:
        """Layers HF runs with a sliding-window mask: those `layer_types` names, else each model type's rule
        (qwen2/qwen3: layers >= max_window_layers; qwen2_moe: even layers below it; qwen3_moe: all)."""
        if not (self.use_sliding_window and self.sliding_window):
            return []
        n = self.num_hidden_layers
        if isinstance(self.layer_types, list) and len(self.layer_types) == n:
            return [i for i, t in enumerate(self.layer_types) if t == "sliding_attention"]
        if self.model_type == "qwen3_moe":
            return list(range(n))
        if self.model_type == "qwen2_moe":
            return [i for i in range(n) if (i + 1) % 2 and i < self.max_window_layers]
        return [i for i in range(n) if i >= self.max_window_layers]

    # ---- architecture flags (what the model files switch on) -------------------------------------------
    @property
    def hybrid(self) -> bool:
        """Qwen3-Next / Qwen3.5 / Qwen3.6: Gated DeltaNet layers between gated full-attention layers."""
        return self.model_type in HYBRID_MODEL_TYPES

    @property
    def rotary_dim(self) -> int:
        """Features of each head that RoPE rotates (the first ones); the rest pass through."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_layers(self) -> list[int]:
        """The Gated DeltaNet layers (a recurrent state instead of a KV cache)."""
        return [i for i, t in enumerate(self.layer_types or []) if t == "linear_attention"] if self.hybrid else []

    @property
    def qk_norm(self) -> bool:
        """Qwen3 and the hybrids: RMSNorm over head_dim of each query and key head, before RoPE."""
        return self.model_type in ("qwen3", "qwen3_moe") or self.hybrid

    @property
    def qkv_has_bias(self) -> bool:
        if self.model_type == "qwen2":
            return True
        if self.model_type == "qwen2_moe":
            return bool(self.qkv_bias)
        return bool(self.attention_bias)

    @property
    def o_has_bias(self) -> bool:
        return self.qk_norm and bool(self.attention_bias)  # only Qwen3's attention_bias covers o_proj

    @property
    def shared_expert(self) -> bool:
        """Qwen2-MoE's (and the hybrid MoEs') always-on expert, scaled by sigmoid(shared_expert_gate(x))."""
        return (self.model_type == "qwen2_moe" or self.hybrid) and self.shared_expert_intermediate_size > 0

    def is_moe_layer(self, i: int) -> bool:
        """transformers' rule: sparse unless listed in mlp_only_layers, every decoder_sparse_step-th layer."""
        return self.num_experts > 0 and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def context_length(self) -> int:
        """The longest sequence this checkpoint is run on: the trained or scaled length, capped where a
        config field asks for attention this project does not implement (see `context_caps`), so that such
        a field is honoured exactly up to the cap instead of silently ignored past it."""
        n = self.max_position_embeddings
        scaling = self.rope_scaling or {}
        if self.rope_type == "yarn":
            original = scaling.get("original_max_position_embeddings") or n
            n = max(n, int(float(scaling["factor"]) * original))
        elif self.rope_type == "dynamic":
            n = int(float(scaling["factor"]) * n)
        return min([n, *(cap for cap, _ in self.context_caps())])

    def context_caps(self) -> list[tuple[int, str]]:
        """(cap, reason) for each config field whose math only plain causal attention would get wrong
        past `cap` tokens.

        - A sliding window changes results only past `sliding_window` tokens.
        """
        caps = []
        if self.sliding_layers:
            caps.append((int(self.sliding_window), f"sliding window of {self.sliding_window} tokens "
                                                   "(not implemented: the context stops where it would slide)"))
        return caps

    def rope_frequencies(self, seq_len: int | None = None) -> tuple[np.ndarray, float]:
        """(inv_freq [head_dim/2] float32, attention_factor) exactly as HF transformers computes them.

        `seq_len` matters only for dynamic NTK scaling, whose base grows once the sequence passes
        max_position_embeddings. The attention factor (yarn's mscale) multiplies both cos and sin.
        """
        dim, base = self.rotary_dim, float(self.rope_theta)
        exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
        scaling = self.rope_scaling or {}
        kind = self.rope_type
        if kind == "dynamic":
            factor, mpe = float(scaling["factor"]), self.max_position_embeddings
            n = max(seq_len or mpe, mpe)
            base = base * ((factor * n / mpe) - (factor - 1)) ** (dim / (dim - 2))
        inv_freq = (1.0 / np.power(np.float32(base), exponents)).astype(np.float32)
        if kind == "linear":
            return (inv_freq / np.float32(scaling["factor"])).astype(np.float32), 1.0
        if kind == "yarn":
            return _yarn(self, scaling, exponents)
        return inv_freq, 1.0

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a checkpoint must hold, by its HF key, with its shape. Experts are listed one by
        one (`mlp.experts.{j}.gate_proj.weight`), as HF checkpoints store them; the models stack them."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        q, d = self.num_attention_heads * self.head_dim, self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h),
                                              "model.norm.weight": (h,)}
        linear = set(self.linear_layers)
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            if i in linear:
                shapes.update(self._linear_attention_shapes(p + "linear_attn."))
                shapes.update(self._mlp_layer_shapes(p, i))
                continue
            a = p + "self_attn."
            # Gated attention (the hybrids): q_proj also yields the output gate, one head_dim per head.
            qp = 2 * q if self.hybrid else q
            shapes.update({a + "q_proj.weight": (qp, h), a + "k_proj.weight": (kv, h),
                           a + "v_proj.weight": (kv, h), a + "o_proj.weight": (h, q)})
            if self.qkv_has_bias:
                shapes.update({a + "q_proj.bias": (qp,), a + "k_proj.bias": (kv,), a + "v_proj.bias": (kv,)})
            if self.o_has_bias:
                shapes[a + "o_proj.bias"] = (h,)
            if self.qk_norm:
                shapes.update({a + "q_norm.weight": (d,), a + "k_norm.weight": (d,)})
            shapes.update(self._mlp_layer_shapes(p, i))
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        return shapes

    def _mlp_layer_shapes(self, p: str, i: int) -> dict[str, tuple[int, ...]]:
        """Layer i's MLP (dense or experts) and its two norms."""
        h, shapes = self.hidden_size, {}
        if self.is_moe_layer(i):
            m = self.moe_intermediate_size
            shapes[p + "mlp.gate.weight"] = (self.num_experts, h)  # the router
            for j in range(self.num_experts):
                shapes.update(_mlp_shapes(f"{p}mlp.experts.{j}.", h, m))
            if self.shared_expert:
                shapes.update(_mlp_shapes(p + "mlp.shared_expert.", h, self.shared_expert_intermediate_size))
                shapes[p + "mlp.shared_expert_gate.weight"] = (1, h)
        else:
            shapes.update(_mlp_shapes(p + "mlp.", h, self.intermediate_size))
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
        return shapes

    def checkpoint_key(self, key: str) -> str | None:
        """A stored tensor's key as the model names it, or None for tensors the text model does not use: Qwen3.5's
        multimodal checkpoints hold the text model under `model.language_model.`, a vision tower under
        `model.visual.` (images are not supported) and a multi-token-prediction layer under `mtp.` (a drafter
        for speculative decoding, not part of the forward). Folders mlx-lm wrote hold the text model under
        `language_model.` (`language_model.model.layers...`, `language_model.lm_head`); a vision tower under
        `vision_tower.` (mlx-vlm's name, which mlx-lm's loader skips too) is not read."""
        if not self.hybrid:
            return key
        if key.startswith(("model.visual.", "vision_tower.", "mtp.")):
            return None
        if key.startswith("language_model."):
            return key.removeprefix("language_model.")
        return "model." + key.removeprefix("model.language_model.") if key.startswith("model.language_model.") \
            else key

    @property
    def packed_linear_projections(self) -> bool:
        """Qwen3-Next packs q, k, v, z into `in_proj_qkvz` and b, a into `in_proj_ba`, grouped per key head;
        Qwen3.5 stores `in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a` apart."""
        return self.model_type == "qwen3_next"

    def _linear_attention_shapes(self, a: str) -> dict[str, tuple[int, ...]]:
        """A Gated DeltaNet layer's tensors: projections, the depthwise conv over q, k, v, the decay's A_log and
        dt_bias, the gated norm and the output projection."""
        h, hv = self.hidden_size, self.linear_num_value_heads
        kd, vd = self.linear_num_key_heads * self.linear_key_head_dim, hv * self.linear_value_head_dim
        conv = 2 * kd + vd
        if self.packed_linear_projections:
            shapes = {a + "in_proj_qkvz.weight": (2 * kd + 2 * vd, h), a + "in_proj_ba.weight": (2 * hv, h)}
        else:
            shapes = {a + "in_proj_qkv.weight": (conv, h), a + "in_proj_z.weight": (vd, h),
                      a + "in_proj_b.weight": (hv, h), a + "in_proj_a.weight": (hv, h)}
        shapes.update({a + "conv1d.weight": (conv, 1, self.linear_conv_kernel_dim), a + "dt_bias": (hv,),
                       a + "A_log": (hv,), a + "norm.weight": (self.linear_value_head_dim,),
                       a + "out_proj.weight": (h, vd)})
        return shapes

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by component, for `cli.py info`. `experts` are the routed experts (each token uses
        num_experts_per_tok of them), `shared_expert` includes its gate, `router` is `mlp.gate`."""
        counts = {"embedding": 0, "attention": 0, "linear_attention": 0, "mlp": 0, "router": 0, "experts": 0,
                  "shared_expert": 0, "norms": 0, "lm_head": 0}
        for key, shape in self.weight_shapes().items():
            n = math.prod(shape)
            if "embed_tokens" in key:
                counts["embedding"] += n
            elif "self_attn" in key and "norm" not in key:
                counts["attention"] += n
            elif "linear_attn" in key:
                counts["linear_attention"] += n
            elif ".mlp.experts." in key:
                counts["experts"] += n
            elif ".mlp.shared_expert" in key:
                counts["shared_expert"] += n
            elif key.endswith(".mlp.gate.weight"):
                counts["router"] += n
            elif ".mlp." in key:
                counts["mlp"] += n
            elif "norm" in key:
                counts["norms"] += n
            else:
                counts["lm_head"] += n
        return counts

    def active_parameters(self) -> int:
        """Parameters one token runs through: all but the routed experts it is not sent to."""
        counts = self.parameter_counts()
        total = sum(counts.values())
        if not self.num_experts:
            return total
        return total - counts["experts"] + counts["experts"] * self.num_experts_per_tok // self.num_experts


def _mlp_shapes(prefix: str, h: int, i: int) -> dict[str, tuple[int, int]]:
    """A SwiGLU MLP's three matrices (a dense MLP, one expert or the shared expert)."""
    return {prefix + "gate_proj.weight": (i, h), prefix + "up_proj.weight": (i, h),
            prefix + "down_proj.weight": (h, i)}


def _yarn(args: ModelArgs, scaling: dict[str, Any], exponents: np.ndarray) -> tuple[np.ndarray, float]:
    """YaRN: interpolate low frequencies, keep high ones, blend linearly in between (HF's recipe)."""
    dim, base = args.head_dim, float(args.rope_theta)
    factor = float(scaling["factor"])
    original = scaling.get("original_max_position_embeddings") or args.max_position_embeddings
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp  # 1 where the original frequency is kept
    pos_freqs = np.power(np.float32(base), exponents)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)
