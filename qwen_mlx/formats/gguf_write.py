"""A model -> one GGUF file that llama.cpp runs (architectures `qwen2`, `qwen2moe`, `qwen3`, `qwen3moe`, `qwen3next`,
`qwen35`, `qwen35moe`): the reverse of qwen_mlx/formats/gguf.py, written with the `gguf` package's GGUFWriter.

The tensors are laid out as llama.cpp's `convert_hf_to_gguf.py` lays them out, so llama.cpp and this project's
reader take the file as they take the converter's: names from gguf_names.py (the reader's tables, inverted), each
layer's experts one [X, out, in] stack, and the hybrid family's rewrites applied (gguf_hybrid.py lists them and
holds the row orders both directions use): norms stored 1 + w, A_log as -exp(A_log), `dt_bias` as `ssm_dt.bias`,
the conv weight squeezed, Qwen3-Next's `in_proj_qkvz` split into `attn_qkv` + `attn_gate`, Qwen3.5's value heads
tiled. A multi-token-prediction layer (`mtp.*`) becomes the converter's "nextn" block after the decoder layers.

Types: every matrix takes `--gguf-type`; vectors, norms, the MoE routers and the conv weight stay float32, as the
converter keeps them (llama.cpp's kernels want them so). A matrix whose rows do not split into 32-wide blocks
falls back to f16, as the converter's does. Tensors stream to the file one at a time (GGUFWriter's tensor-info
then tensor-data calls), so peak memory is the source plus one tensor.

Deliberately free of torch and mlx: the weights come in as arrays numpy can read (the caller's lazy source).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import numpy as np

from ..config import ModelArgs
from ..errors import QwenError
from ..files import check_writable, staged_file
from ..progress import progress_bar
from .gguf_hybrid import qkv_untile, qkvz_rows, untile
from .gguf_names import (
    ARCHITECTURES,
    EXPERT_NAMES,
    HYBRID_ARCHITECTURES,
    HYBRID_LAYER_NAMES,
    LAYER_NAMES,
    MOE_ARCHITECTURES,
    MTP_NAMES,
    PLUS_ONE,
    TOP_NAMES,
)
from .gguf_tokenizer import vocab_for_gguf

# --gguf-type -> (GGMLQuantizationType name, LlamaFileType name). q4_0 is the one 4-bit type gguf's numpy code
# quantizes at any width (its K-quants need rows of 256); the converter stops at q8_0.
GGUF_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
              "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0")}
# GGUF leaves the converter keeps float32 whatever the type (besides vectors and norms): the routers, the conv.
_FLOAT32_LEAVES = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "ssm_conv1d.weight")
# Qwen3.5's mrope sections when config.json names none: the converter's default, which llama.cpp requires.
_DEFAULT_MROPE_SECTION = [11, 11, 10, 0]


class Planned(NamedTuple):
    """One GGUF tensor: its name, numpy shape, GGML type, and how to compute its float32 values."""
    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    values: Callable[[], np.ndarray]


def gguf_arch(model_type: str) -> str:
    """The GGUF architecture for a model_type (the text-only `*_text` types as their release's)."""
    for arch, (hf_type, _) in ARCHITECTURES.items():
        if model_type in (hf_type, hf_type.removesuffix("_text")):
            return arch
    raise QwenError(f"cannot write a GGUF for model type {model_type!r}; supported: "
                    f"{', '.join(t for t, _ in ARCHITECTURES.values())}")


def check_gguf_out(out: Path, gguf_type: str, force: bool) -> None:
    """Refuse, before any work, an unknown type or an output that is not a new (or --force'd) writable .gguf."""
    if gguf_type not in GGUF_TYPES:
        raise QwenError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    if out.suffix.lower() != ".gguf":
        raise QwenError(f"{out}: a GGUF output path must end in .gguf")
    if out.is_dir():
        raise QwenError(f"{out} is a folder; give the .gguf file to write")
    if out.exists() and not force:
        raise QwenError(f"{out} exists (pass --force to replace it)")
    check_writable(out)


def write_gguf(weights: Mapping[str, Any], args: ModelArgs, folder: Path, out: Path, gguf_type: str,
               force: bool = False, mtp: Mapping[str, Any] | None = None, name: str | None = None) -> Path:
    """Write `weights` (the text model's tensors under HF names, experts stacked [X, out, in] as
    `mlp.experts.<proj>.weight`; anything numpy reads, read one at a time) as a GGUF at `out`, with the tokenizer
    and chat template of `folder`. `mtp`: the release's `mtp.*` tensors (experts stacked the same way), written
    as the nextn block. Nothing half-written: the file appears whole, or not at all."""
    import gguf

    out = Path(out)
    check_gguf_out(out, gguf_type, force)
    arch = gguf_arch(args.model_type)
    mtp = dict(mtp or {})
    if mtp and arch not in HYBRID_ARCHITECTURES:
        raise QwenError(f"a {arch} GGUF has no multi-token-prediction block")
    qtype = gguf.GGMLQuantizationType[GGUF_TYPES[gguf_type][0]]
    plan = list(_plan(weights, args, mtp, qtype))
    tokens, types, pre = vocab_for_gguf(folder, args.vocab_size)

    writer = gguf.GGUFWriter(None, arch)
    writer.add_name(name or folder.name)
    writer.add_file_type(gguf.LlamaFileType[GGUF_TYPES[gguf_type][1]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _hparams(writer, args, arch, folder, mtp_layers=1 if mtp else 0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # Merges, special ids (bos/eos/pad) and the chat template, read by gguf's own reader of HF tokenizer files.
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    for item in plan:
        dtype, nbytes = _stored(item.shape, item.qtype)
        writer.add_tensor_info(item.name, item.shape if dtype != np.uint8 else
                               gguf.quant_shape_to_byte_shape(item.shape, item.qtype), dtype, nbytes, item.qtype)
    with staged_file(out) as staging:
        try:
            writer.write_header_to_file(staging)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for item in progress_bar(plan, "writing GGUF tensors"):
                values = np.ascontiguousarray(item.values(), dtype=np.float32)
                if values.shape != item.shape:
                    raise QwenError(f"internal error: {item.name} came out {values.shape}, planned {item.shape}")
                writer.write_tensor_data(gguf.quants.quantize(values, item.qtype))
        finally:
            writer.close()  # before staged_file renames (or removes) the file
    return out


def llama_cpp_caveats(args: ModelArgs) -> list[str]:
    """What llama.cpp would run otherwise than this model is (its loaders fix some choices per architecture); the
    file is written all the same, and reads back whole here."""
    arch = gguf_arch(args.model_type)
    notes = []
    if arch in MOE_ARCHITECTURES and arch != "qwen2moe" and len(args.moe_layers) != args.num_hidden_layers:
        notes.append(f"llama.cpp's {arch} wants every layer MoE; this model has dense layers {args.mlp_only_layers}")
    if arch in MOE_ARCHITECTURES and bool(args.norm_topk_prob) != (arch != "qwen2moe"):
        notes.append(f"llama.cpp's {arch} {'does not renormalize' if arch == 'qwen2moe' else 'renormalizes'} the "
                     f"top-k expert weights; this model's norm_topk_prob is {args.norm_topk_prob}")
    if arch == "qwen3" and args.attention_bias:
        notes.append("llama.cpp's qwen3 loads no attn_output.bias (attention_bias); it refuses this file")
    if arch == "qwen3next" and args.linear_value_head_dim != args.linear_key_head_dim:
        notes.append("llama.cpp's qwen3next takes the value head size to be the key head size; they differ here")
    return notes


def _stored(shape: tuple[int, ...], qtype) -> tuple[type, int]:
    """(numpy dtype, bytes) of a tensor as gguf.quants.quantize returns it."""
    import gguf

    n = int(np.prod(shape))
    if qtype.name in ("F32", "F16"):
        return (np.float32, 4 * n) if qtype.name == "F32" else (np.float16, 2 * n)
    return np.uint8, int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype)))


def _type_for(gguf_name: str, shape: tuple[int, ...], qtype):
    """The converter's rule: float32 for vectors, norms, routers, the conv and every non-`.weight`; the chosen
    type for the rest, f16 where a row does not split into the type's blocks."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) <= 1 or gguf_name.endswith(("_norm.weight", *_FLOAT32_LEAVES)) or not gguf_name.endswith(".weight"):
        return T.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else T.F16


# ------------------------------------------------------------------------------------------------ the plan


def _inverse(table: dict[str, str]) -> dict[str, str]:
    return {hf: leaf for leaf, hf in table.items()}


def _plan(weights: Mapping[str, Any], args: ModelArgs, mtp: dict[str, Any], qtype) -> Iterator[Planned]:
    """Every GGUF tensor in the converter's order (top tensors, then blocks), each rewrite applied lazily."""
    arch = gguf_arch(args.model_type)
    hybrid = arch in HYBRID_ARCHITECTURES
    leaves = _inverse(LAYER_NAMES)
    if hybrid:  # the linear layers' own; q, k, v (and Qwen3-Next's z, split off in _planned) join in attn_qkv
        leaves |= _inverse(HYBRID_LAYER_NAMES) | {"linear_attn.in_proj_qkv.weight": "attn_qkv.weight",
                                                 "linear_attn.in_proj_qkvz.weight": "attn_qkv.weight"}
    layers = args.num_hidden_layers
    known = set()
    for hf, leaf in _inverse(TOP_NAMES).items():
        if hf in weights:
            known.add(hf)
            yield from _planned(leaf, hf, weights[hf], args, qtype)
    # The nextn block under the decoder layers' names: its layer tensors as block `layers`, its own four by
    # MTP_NAMES.
    blocks = dict(weights) | {f"model.layers.{layers}." + k.removeprefix("mtp.layers.0."): v
                              for k, v in mtp.items() if k.startswith("mtp.layers.0.")}
    nextn = {_inverse(MTP_NAMES)[k]: (k, v) for k, v in mtp.items() if k in MTP_NAMES.values()}
    unknown = [k for k in mtp if not k.startswith("mtp.layers.0.") and k not in MTP_NAMES.values()]
    if unknown:
        raise QwenError(f"unexpected multi-token-prediction tensors {unknown[:3]} (one mtp layer is written)")
    for n in range(layers + (1 if mtp else 0)):
        prefix = f"model.layers.{n}."
        for hf in [k for k in blocks if k.startswith(prefix)]:
            known.add(hf)
            rest = hf.removeprefix(prefix)
            match = re.fullmatch(r"mlp\.experts\.(\w+_proj\.weight)", rest)
            if match and match[1] in EXPERT_NAMES.values():
                leaf = _inverse(EXPERT_NAMES)[match[1]]
            elif rest in leaves:
                leaf = leaves[rest]
            else:
                raise QwenError(f"cannot place tensor {hf!r} in a {arch} GGUF")
            yield from _planned(f"blk.{n}.{leaf}", hf, blocks[hf], args, qtype)
        if n == layers:
            for leaf, (hf, value) in nextn.items():
                yield from _planned(f"blk.{n}.{leaf}", hf, value, args, qtype)
    stray = [k for k in weights if k not in known]
    if stray:
        raise QwenError(f"cannot place tensors {stray[:3]} in a {arch} GGUF")


def _planned(gguf_name: str, hf: str, source: Any, args: ModelArgs, qtype) -> Iterator[Planned]:
    """One HF tensor as the GGUF tensor(s) llama.cpp's converter writes for it."""
    shape = tuple(int(d) for d in source.shape)
    read = lambda: np.asarray(source, dtype=np.float32)  # noqa: E731  (the caller's array, read when written)
    if args.hybrid:
        fix, rows, cols = _hybrid_rewrite(hf, args)
        if hf.endswith("in_proj_qkvz.weight"):  # Qwen3-Next: [attn_qkv; attn_gate] rows, from q k v z per key head
            order = np.argsort(qkvz_rows(_hybrid_sizes(args)))
            split = shape[0] - args.linear_num_value_heads * args.linear_value_head_dim
            for leaf, part in (("attn_qkv", slice(0, split)), ("attn_gate", slice(split, None))):
                name = gguf_name.replace("attn_qkv", leaf)
                part_shape = (len(range(shape[0])[part]), *shape[1:])
                yield Planned(name, part_shape, _type_for(name, part_shape, qtype),
                              lambda part=part: read()[order][part])
            return
        if hf.endswith("conv1d.weight"):  # C 1 K -> C K
            shape = (shape[0], shape[-1])

        def values() -> np.ndarray:
            v = read().reshape(shape)
            v = v if rows is None else v[np.argsort(rows)]
            v = v if cols is None else v[..., np.argsort(cols)]
            return v if fix is None else fix(v)
        yield Planned(gguf_name, shape, _type_for(gguf_name, shape, qtype), values)
        return
    yield Planned(gguf_name, shape, _type_for(gguf_name, shape, qtype), read)


def _hybrid_sizes(args: ModelArgs) -> dict[str, int]:
    """The config fields gguf_hybrid's row orders read."""
    return {k: getattr(args, k) for k in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                                          "linear_value_head_dim")}


def _hybrid_rewrite(hf: str, args: ModelArgs) -> tuple[Callable | None, np.ndarray | None, np.ndarray | None]:
    """(value fix, row order, column order) the converter applies to a hybrid model's tensor; the orders are the
    reader's gathers (gguf_hybrid), which the writer inverts."""
    fix = None
    if hf.endswith(PLUS_ONE):
        fix = _plus_one
    elif hf.endswith(".A_log"):
        fix = _minus_exp
    if args.model_type == "qwen3_next" or "linear_attn." not in hf:
        return fix, None, None
    sizes, v = _hybrid_sizes(args), args.linear_value_head_dim
    if hf.endswith(("in_proj_qkv.weight", "conv1d.weight")):
        return fix, qkv_untile(sizes), None
    if hf.endswith("in_proj_z.weight"):
        return fix, untile(sizes, v), None
    if hf.endswith(("in_proj_a.weight", "in_proj_b.weight", ".A_log", ".dt_bias")):
        return fix, untile(sizes, 1), None
    if hf.endswith("out_proj.weight"):
        return fix, None, untile(sizes, v)
    return fix, None, None


def _plus_one(values: np.ndarray) -> np.ndarray:
    """A zero-centred norm's w stored as the 1 + w llama.cpp multiplies by."""
    return values + np.float32(1)


def _minus_exp(values: np.ndarray) -> np.ndarray:
    """A_log stored as the decay rate llama.cpp uses, -exp(A_log)."""
    return -np.exp(values)


# ------------------------------------------------------------------------------------------------ metadata


def _hparams(writer, args: ModelArgs, arch: str, folder: Path, mtp_layers: int) -> None:
    """The keys llama.cpp's loader reads for `arch` (src/models/<arch>.cpp), as the converter writes them."""
    import gguf

    head_dim = args.head_dim or args.hidden_size // args.num_attention_heads
    writer.add_block_count(args.num_hidden_layers + mtp_layers)
    writer.add_context_length(args.max_position_embeddings)
    writer.add_embedding_length(args.hidden_size)
    if args.intermediate_size:
        writer.add_feed_forward_length(args.intermediate_size)
    writer.add_head_count(args.num_attention_heads)
    writer.add_head_count_kv(args.num_key_value_heads or args.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.rms_norm_eps)
    scaling = args.rope_scaling or {}
    kind = args.rope_type
    if kind in ("linear", "yarn") and scaling.get("factor") is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        if kind == "yarn":
            writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    if arch in MOE_ARCHITECTURES:
        writer.add_expert_count(args.num_experts)
        writer.add_expert_used_count(args.num_experts_per_tok)
        writer.add_expert_feed_forward_length(args.moe_intermediate_size)
        if args.shared_expert:
            writer.add_expert_shared_feed_forward_length(args.shared_expert_intermediate_size)
        # llama.cpp fixes this per architecture (off for qwen2moe, on for the rest); this project's reader takes
        # the key, so a model that differs reads back as it is.
        writer.add_expert_weights_norm(bool(args.norm_topk_prob))
    if arch in HYBRID_ARCHITECTURES:
        writer.add_ssm_conv_kernel(args.linear_conv_kernel_dim)
        writer.add_ssm_state_size(args.linear_key_head_dim)
        writer.add_ssm_group_count(args.linear_num_key_heads)
        writer.add_ssm_time_step_rank(args.linear_num_value_heads)
        writer.add_ssm_inner_size(args.linear_value_head_dim * args.linear_num_value_heads)
        recurrent = [i in set(args.linear_layers) for i in range(args.num_hidden_layers)] + [False] * mtp_layers
        # gguf 0.19 has no add_recurrent_layers yet; the key and its bool array are llama.cpp's.
        writer.add_array(f"{arch}.attention.recurrent_layers", recurrent)
        writer.add_full_attention_interval(args.full_attention_interval)
        writer.add_rope_dimension_count(int(head_dim * args.partial_rotary_factor))
        if arch != "qwen3next":
            writer.add_rope_dimension_sections(_mrope_section(folder))
        if mtp_layers:
            writer.add_nextn_predict_layers(mtp_layers)


def _mrope_section(folder: Path) -> list[int]:
    """Qwen3.5's mrope sections from config.json (text_config or top level; rope_parameters or rope_scaling),
    padded to 4, or the converter's default."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    for scope in (config.get("text_config") or {}, config):
        for key in ("rope_parameters", "rope_scaling"):
            section = (scope.get(key) or {}).get("mrope_section")
            if section:
                return [int(x) for x in section][:4] + [0] * (4 - len(section))
    return list(_DEFAULT_MROPE_SECTION)
