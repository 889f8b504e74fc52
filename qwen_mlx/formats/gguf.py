"""GGUF (architectures `qwen2`, `qwen2moe`, `qwen3`, `qwen3moe`, and the hybrid family's `qwen3next`, `qwen35`,
`qwen35moe`) -> a standard Hugging Face folder, or an MLX quantized folder that keeps the GGUF's blocks where MLX
holds them exactly (qwen_mlx/formats/gguf_blocks.py).

The folder holds config.json, generation_config.json, model.safetensors, tokenizer.json and
tokenizer_config.json, and loads with transformers' `AutoModelForCausalLM.from_pretrained` (Qwen2, Qwen2-MoE,
Qwen3, Qwen3-MoE, Qwen3-Next, or Qwen3.5(-MoE)'s text-only class) as well as with this project's own loaders.
GGUF stacks each layer's experts into one [X, out, in] tensor (`ffn_gate_exps`); they are written back one per
expert, as HF checkpoints hold them. Weights are dequantized with the `gguf` package's own
`gguf.quants.dequantize` (the code llama.cpp ships), so float32 output is exact. Kept blocks are repacked
bit for bit into MLX's uint32 codes with float32 scales and biases (config.json `quantization`, as mlx-lm
writes it), and load in this project's MLX backend and in `mlx_lm.load` alike.

This module holds the entry points (`convert_gguf`, `cached_conversion`, `read_mtp`), the reading, the config,
the plan (every HF tensor, checked against the config) and the streamed safetensors writing. The hybrid
family's rewrites, each undone, and its config fields: qwen_mlx/formats/gguf_hybrid.py. The tokenizer, chat
template and generation config from the metadata: qwen_mlx/formats/gguf_tokenizer.py. llama.cpp's names:
qwen_mlx/formats/gguf_names.py. The other direction (a model -> one GGUF): qwen_mlx/formats/gguf_write.py.

Deliberately free of torch and mlx: numpy, gguf and tokenizers only.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from ..dtypes import SAFETENSORS, check_dtype
from ..errors import QwenError
from ..files import check_output_folder, file_lock, sha256_file, staged_folder
from ..paths import cache_dir
from ..progress import progress_bar
from .gguf_blocks import GROUP_SIZE, KEPT, kept_bits, to_mlx
from .gguf_hybrid import Source, block_prefix, hybrid_config, hybrid_qkv, hybrid_source
from .gguf_names import (
    ARCHITECTURES,
    EXPERT_NAMES,
    HYBRID_ARCHITECTURES,
    HYBRID_LAYER_NAMES,
    LAYER_NAMES,
    MOE_ARCHITECTURES,
    MTP_NAMES,
    TOP_NAMES,
)
from .gguf_tokenizer import generation_config, require, write_json, write_tokenizer


# The name tables (the reader's and the writer's one home): gguf_names.py. A hybrid model's layer leaves are the
# dense ones and the hybrid family's own.
_HYBRID_ALL_NAMES = LAYER_NAMES | HYBRID_LAYER_NAMES
_HYBRID_MODEL_TYPES = {ARCHITECTURES[arch][0] for arch in HYBRID_ARCHITECTURES}
# HF tensors llama.cpp stores squeezed: the [1, hidden] shared-expert gate (may be a vector), the conv's C 1 K.
_RESHAPED = ("shared_expert_gate.weight", "conv1d.weight")


# ----------------------------------------------------------------------------------------------- reading


def _open(gguf_path: Path):
    """A GGUFReader, with every way a file can be unreadable turned into a QwenError."""
    from gguf import GGUFReader

    if not gguf_path.is_file():
        raise QwenError(f"GGUF file not found: {gguf_path}")
    with open(gguf_path, "rb") as source:
        if source.read(4) != b"GGUF":
            raise QwenError(f"{gguf_path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = GGUFReader(gguf_path)
    except Exception as error:  # ValueError/IndexError/... from a header or tensor table cut short
        raise QwenError(f"{gguf_path} is a truncated or corrupt GGUF file ({type(error).__name__}: {error})") from None
    # The reader memory-maps lazily, so a file cut short can parse fine; check every tensor fits.
    size = gguf_path.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size or tensor.data.nbytes != int(tensor.n_bytes):
            raise QwenError(
                f"{gguf_path} is truncated or corrupt: tensor {tensor.name!r} needs bytes up to {end}, "
                f"the file has {size}"
            )
    return reader


def _metadata(reader) -> dict[str, Any]:
    """Every key/value pair as plain Python values (strings, numbers, lists)."""
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception as error:
            raise QwenError(f"GGUF metadata key {key!r} is unreadable ({error})") from None
    return out


def _float32_decimal(value: float) -> float:
    """The shortest decimal that round-trips the float32 GGUF stores: 9.99999997e-07 -> 1e-06."""
    return float(str(np.float32(value)))


# ------------------------------------------------------------------------------------------------ config


def _build_config(meta: dict[str, Any], tensors: dict[str, Any], dtype: str, arch: str = "qwen2") -> dict[str, Any]:
    model_type, hf_class = ARCHITECTURES[arch]
    hidden = int(require(meta, f"{arch}.embedding_length"))
    heads = int(require(meta, f"{arch}.attention.head_count"))
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    # llama.cpp appends the multi-token-prediction layers to the blocks: they are not decoder layers.
    layers = int(require(meta, f"{arch}.block_count")) - int(meta.get(f"{arch}.nextn_predict_layers", 0))
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise QwenError("GGUF has no token_embd.weight tensor")
    config: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": int(meta.get(f"{arch}.feed_forward_length") or 0)
        or int(require(meta, f"{arch}.expert_feed_forward_length")),  # all-MoE: the dense size is unused
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        # The embedding's rows, not the token list: they can differ and the weights decide the shapes.
        "vocab_size": int(embed.shape[1]),
        "rms_norm_eps": _float32_decimal(require(meta, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_decimal(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(require(meta, f"{arch}.context_length")),
        "tie_word_embeddings": "output.weight" not in tensors,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": layers,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    for name, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            config[name] = int(meta[f"tokenizer.ggml.{key}"])
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    if scaling_type not in (None, "none"):
        scaling: dict[str, Any] = {"type": scaling_type, "rope_type": scaling_type}
        if f"{arch}.rope.scaling.factor" in meta:
            scaling["factor"] = _float32_decimal(meta[f"{arch}.rope.scaling.factor"])
        if f"{arch}.rope.scaling.original_context_length" in meta:
            scaling["original_max_position_embeddings"] = int(meta[f"{arch}.rope.scaling.original_context_length"])
        config["rope_scaling"] = scaling
    if model_type in ("qwen3", "qwen3_moe"):
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    if model_type == "qwen2_moe":
        config["qkv_bias"] = "blk.0.attn_q.bias" in tensors
    if arch in HYBRID_ARCHITECTURES:
        for key in ("use_sliding_window", "sliding_window", "max_window_layers"):  # no sliding window there
            del config[key]
        config.update(hybrid_config(meta, arch, config))
    if arch in MOE_ARCHITECTURES:
        config.update(_moe_config(meta, tensors, arch, config["num_hidden_layers"]))
    return config


def _moe_config(meta: dict[str, Any], tensors: dict[str, Any], arch: str, layers: int) -> dict[str, Any]:
    """Expert counts and sizes from the metadata; which layers are sparse from the tensors they hold (a
    dense layer has ffn_gate/up/down), written as HF's mlp_only_layers."""
    moe_layers = [n for n in range(layers) if f"blk.{n}.ffn_gate_inp.weight" in tensors]
    if not moe_layers:
        raise QwenError(f"a {arch} GGUF without any expert layer (no blk.N.ffn_gate_inp.weight)")
    first = tensors.get(f"blk.{moe_layers[0]}.ffn_gate_exps.weight")
    out: dict[str, Any] = {
        "num_experts": int(require(meta, f"{arch}.expert_count")),
        "num_experts_per_tok": int(require(meta, f"{arch}.expert_used_count")),
        "moe_intermediate_size": int(meta.get(f"{arch}.expert_feed_forward_length")
                                     or (first.shape[1] if first is not None else 0)),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [n for n in range(layers) if n not in moe_layers],
        # llama.cpp renormalizes the top-k weights of qwen3moe and the hybrids, not those of qwen2moe, unless the
        # file says.
        "norm_topk_prob": bool(meta.get(f"{arch}.expert_weights_norm", arch != "qwen2moe")),
    }
    if arch in ("qwen2moe", "qwen3next", "qwen35moe"):  # the shared expert
        shared = tensors.get(f"blk.{moe_layers[0]}.ffn_gate_shexp.weight")
        out["shared_expert_intermediate_size"] = int(meta.get(f"{arch}.expert_shared_feed_forward_length")
                                                     or (shared.shape[1] if shared is not None else 0))
    return out


# ------------------------------------------------------------------------------------------------ tensors

_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4}


class Job(NamedTuple):
    """Tensors written together: their (name, safetensors dtype, shape), and how to compute them."""
    entries: list[tuple[str, str, tuple[int, ...]]]
    run: Callable[[], list[np.ndarray]]


class Entry(NamedTuple):
    """One HF tensor of the folder: where it comes from, its name and shape, its expert index in a stack."""
    source: Source
    name: str
    shape: tuple[int, ...]
    expert: int | None


def _hf_names(gguf_name: str, config: dict[str, Any]) -> list[tuple[str, int | None]]:
    """The HF tensor(s) one GGUF tensor becomes: [(name, None)], or [(expert j's name, j)] for a stack."""
    if gguf_name in TOP_NAMES:
        return [(TOP_NAMES[gguf_name], None)]
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    prefix = block_prefix(int(match[1]), config) if match else None
    if prefix is not None:
        leaf = match[2]
        names = _HYBRID_ALL_NAMES if config["model_type"] in _HYBRID_MODEL_TYPES else LAYER_NAMES
        if prefix.startswith("mtp.") and leaf in MTP_NAMES:
            return [(MTP_NAMES[leaf], None)]
        if leaf in names:
            return [(prefix + names[leaf], None)]
        if leaf in EXPERT_NAMES and "num_experts" in config:
            return [(f"{prefix}mlp.experts.{j}.{EXPERT_NAMES[leaf]}", j) for j in range(config["num_experts"])]
    raise QwenError(f"unexpected tensor {gguf_name!r} in a {config['model_type']} GGUF")


def _sources(tensors: dict[str, Any], config: dict[str, Any], arch: str) -> list[tuple[Source, str, int | None]]:
    """(Source, HF name, expert index or None) for every HF tensor the GGUF holds. Most are one GGUF tensor
    as stored; the hybrid family's rewrites are undone (`hybrid_source`), and fused tensors are split."""
    out: list[tuple[Source, str, int | None]] = []
    for gguf_name, tensor in tensors.items():
        leaf = gguf_name.split(".", 2)[-1]
        if arch in HYBRID_ARCHITECTURES and leaf in ("attn_qkv.weight", "attn_gate.weight"):
            out += hybrid_qkv(gguf_name, tensors, config, arch)
            continue
        if leaf == "ffn_gate_up_exps.weight":  # --fuse-gate-up-exps: gate rows, then up rows, per expert
            half = int(tensor.shape[1]) // 2
            for part, rows in (("ffn_gate_exps", slice(0, half)), ("ffn_up_exps", slice(half, 2 * half))):
                names = _hf_names(gguf_name.replace("ffn_gate_up_exps", part), config)
                out += [(Source((tensor,), rows), name, j) for name, j in names]
            continue
        for name, expert in _hf_names(gguf_name, config):
            source = Source((tensor,))
            out.append((hybrid_source(source, name, config) if arch in HYBRID_ARCHITECTURES else source, name, expert))
    return out


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF name -> shape (the same table the loaders check), so a GGUF whose tensors disagree with its own
    metadata fails loudly."""
    from ..config import ModelArgs

    return ModelArgs.from_dict(config).weight_shapes()


def _cast(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> the stored dtype, round-to-nearest-even like torch's `.to()`."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "float32":
        return values
    if dtype == "float16":
        return values.astype(np.float16)
    # numpy has no bfloat16: keep the top 16 bits of each float32, rounded to nearest even.
    bits = values.view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():  # rounding could carry a NaN's payload into the exponent; use the canonical quiet NaN
        rounded[nan] = np.uint16(0x7FC0)
    return rounded


def _shape(source: Source) -> tuple[int, ...]:
    """The numpy shape of a source's values (an expert stack's X first), before any reshape to the HF shape."""
    shapes = [tuple(int(d) for d in reversed(t.shape)) for t in source.parts]
    axis = max(len(shapes[0]) - 2, 0)  # the rows: a matrix's (each expert's), a vector's elements
    if any(len(s) != len(shapes[0]) or s[:axis] + s[axis + 1:] != shapes[0][:axis] + shapes[0][axis + 1:]
           for s in shapes):
        raise QwenError(f"GGUF tensors {[t.name for t in source.parts]} cannot be stacked: shapes {shapes}")
    shape = list(shapes[0])
    shape[axis] = sum(s[axis] for s in shapes)
    # The reorders come from the metadata's head counts: a file whose tensors disagree must fail here, in words.
    for order, at, what in ((source.rows, axis, "rows"), (source.cols, -1, "columns")):
        if isinstance(order, np.ndarray) and len(order) != shape[at]:
            raise QwenError(f"GGUF tensor {source.parts[0].name!r} has {shape[at]} {what}, the metadata implies "
                            f"{len(order)}")
    if isinstance(source.rows, slice):
        shape[axis] = len(range(shape[axis])[source.rows])
    return tuple(shape)


def _take_rows(values: np.ndarray, rows: np.ndarray | slice | None, axis: int) -> np.ndarray:
    """`values` with Source.rows applied along `axis` (a slice is a view)."""
    if rows is None:
        return values
    index = [slice(None)] * values.ndim
    index[axis] = rows
    return values[tuple(index)]


def _values(source: Source, expert: int | None) -> np.ndarray:
    """A source's float32 values (one expert's, for a stack), dequantized by `gguf.quants.dequantize`."""
    from gguf.quants import dequantize

    # GGUF lists dims fastest-first; `dequantize` returns numpy (row-major) order already. An expert is one row
    # of its stack's leading axis, quantized blocks included (they never span experts).
    arrays = [dequantize(t.data if expert is None else t.data[expert], t.tensor_type) for t in source.parts]
    axis = -2 if arrays[0].ndim > 1 else 0
    values = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=axis)
    values = _take_rows(values, source.rows, axis)
    if source.cols is not None:
        values = np.take(values, source.cols, axis=-1)
    return values if source.fix is None else source.fix(values)


def _block_order(cols: np.ndarray, per_block: int) -> np.ndarray | None:
    """A column gather as a gather of whole quantized blocks (their order), or None where it splits a block."""
    runs = cols.reshape(-1, per_block) if cols.size % per_block == 0 else None
    if runs is None or (runs[:, 0] % per_block).any() or (runs != runs[:, :1] + np.arange(per_block)).any():
        return None
    return runs[:, 0] // per_block


def _raw_rows(source: Source) -> np.ndarray:
    """A kept source's raw blocks [..., rows, row bytes], its rows and whole blocks gathered; the memory map
    itself where nothing moves."""
    data = np.concatenate([np.asarray(t.data) for t in source.parts], axis=-2) if len(source.parts) > 1 \
        else np.asarray(source.parts[0].data)
    data = _take_rows(data, source.rows, data.ndim - 2)
    if source.cols is not None:
        _, _, size, per_block = KEPT[int(source.parts[0].tensor_type)]
        blocks = data.reshape(*data.shape[:-1], -1, size)
        data = blocks[..., _block_order(source.cols, per_block), :].reshape(data.shape)
    return data


def _float_job(entry: Entry, dtype: str) -> Job:
    """One HF tensor (or one expert of a stack) dequantized, its rewrites undone, cast to `dtype`."""
    def run() -> list[np.ndarray]:
        return [_cast(_values(entry.source, entry.expert).reshape(entry.shape), dtype)]
    return Job([(entry.name, SAFETENSORS[dtype], entry.shape)], run)


def _kept_job(source: Source, module: str, shape: tuple[int, ...]) -> Job:
    """One matrix (or expert stack) whose blocks are MLX affine groups: packed codes, float32 scales and biases
    (gguf_blocks). Rows go through in slices so a 150k-row embedding never unpacks all at once."""
    qtype = source.parts[0].tensor_type
    bits = kept_bits(qtype)
    *lead, n = shape
    groups = n // GROUP_SIZE
    entries = [(f"{module}.weight", "U32", (*lead, n * bits // 32)), (f"{module}.scales", "F32", (*lead, groups)),
               (f"{module}.biases", "F32", (*lead, groups))]

    def run() -> list[np.ndarray]:
        data = _raw_rows(source)
        data = data.reshape(-1, data.shape[-1])  # [rows, row bytes]
        parts = [to_mlx(data[i:i + 8192], qtype) for i in range(0, data.shape[0], 8192)]
        if any(p is None for p in parts):
            raise QwenError(f"tensor {source.parts[0].name!r} has non-finite block scales")
        return [np.concatenate([p[k] for p in parts]).reshape(e[2]) for k, e in enumerate(entries)]
    return Job(entries, run)


def _write_safetensors(jobs: list[Job], path: Path, progress: bool) -> None:
    """Stream the jobs' tensors into a safetensors file, so peak memory is one job's output.

    The header needs only names, shapes and dtypes, all known before any data is decoded. Writing the
    format directly (8-byte little-endian header length, JSON header, raw bytes) also gives bfloat16,
    which `safetensors.numpy` cannot express.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for job in jobs:
        for name, code, shape in job.entries:
            size = int(np.prod(shape)) * _ITEMSIZE[code]
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keep the data 8-byte aligned
    with open(path, "wb") as sink:
        sink.write(len(encoded).to_bytes(8, "little"))
        sink.write(encoded)
        for job in (progress_bar(jobs, "converting tensors") if progress else jobs):
            for (name, code, shape), array in zip(job.entries, job.run(), strict=True):
                if array.shape != shape or array.dtype.itemsize != _ITEMSIZE[code]:
                    raise QwenError(f"internal error: {name} came out {array.dtype}{array.shape}, "
                                    f"expected {code}{shape}")
                sink.write(np.ascontiguousarray(array).data)  # the array's own buffer: no extra copy
        if sink.tell() != len(encoded) + 8 + offset:
            raise QwenError(f"internal error: wrote {sink.tell()} bytes to {path}, "
                            f"expected {len(encoded) + 8 + offset}")


# ------------------------------------------------------------------------------------------------ public


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    dtype: str | None = "float32",
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a Qwen GGUF into a folder at `out_dir` (returned); nothing half-written on failure.

    With a `dtype`, every tensor is dequantized to it: an HF folder. With dtype None, the blocks MLX holds
    exactly (gguf_blocks.KEPT) stay quantized: an MLX affine folder in mlx-lm's layout (mixed bits as
    per-module overrides), the rest float32. A GGUF with no such blocks gives the float32 folder."""
    if dtype is not None:
        check_dtype(dtype)
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    check_output_folder(out_dir, force)  # before the long work, not after it

    reader, meta, arch, tensors = _read(gguf_path)
    config = _build_config(meta, tensors, dtype or "float32", arch)
    plan = _plan(tensors, config, arch)
    jobs, quantized = _jobs(plan, dtype, config)
    if quantized:
        config["quantization"] = config["quantization_config"] = quantized

    with staged_folder(out_dir, force) as staging:
        tokens = write_tokenizer(meta, staging, config["max_position_embeddings"])
        write_json(staging / "config.json", config)
        write_json(staging / "generation_config.json", generation_config(meta, tokens))
        _write_safetensors(jobs, staging / "model.safetensors", progress)
        del reader, tensors, plan, jobs  # release the memory map before the swap
    return out_dir


def _read(gguf_path: Path) -> tuple[Any, dict[str, Any], str, dict[str, Any]]:
    """The reader, its metadata, its architecture (one this module converts) and its tensors by name."""
    reader = _open(gguf_path)
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise QwenError(f"{gguf_path.name} has architecture {arch!r}; only {', '.join(map(repr, ARCHITECTURES))} "
                        "GGUFs can be converted")
    return reader, meta, arch, {t.name: t for t in reader.tensors}


def read_mtp(gguf_path: str | Path) -> dict[str, np.ndarray]:
    """A hybrid GGUF's multi-token-prediction layer (llama.cpp's "nextn" block) as float32 arrays under the
    release's names (`mtp.fc.weight`, `mtp.layers.0.*` with experts one by one, ...), each rewrite undone as for
    the decoder layers; {} for a file without one (written with `--no-mtp`). `convert_gguf` leaves it out of the
    folder: a speculative decoder reads it from here, or has `_plan` keep `mtp.*` (checked against the shapes of
    a full-attention layer of the model)."""
    _, meta, arch, tensors = _read(Path(gguf_path))
    if arch not in HYBRID_ARCHITECTURES:
        return {}
    config = _build_config(meta, tensors, "float32", arch)
    _expected_shapes(config)  # the config checked, as for a conversion
    return {name: _values(source, expert) for source, name, expert in _sources(tensors, config, arch)
            if name.startswith("mtp.")}


def _plan(tensors: dict[str, Any], config: dict[str, Any], arch: str) -> list[Entry]:
    """Every HF tensor of the folder, checked against the config."""
    expected = _expected_shapes(config)
    plan: dict[str, Entry] = {}
    for source, name, expert in _sources(tensors, config, arch):
        if name.startswith("mtp."):
            continue  # the multi-token-prediction layer: not run yet (read_mtp reads it)
        stored = source.parts[0].name
        shape = _shape(source)
        if expert is not None:  # an expert stack: X experts of [out, in]
            if shape[0] != config["num_experts"]:
                raise QwenError(f"tensor {stored!r} stacks {shape[0]} experts, "
                                f"the metadata says {config['num_experts']}")
            shape = shape[1:]
        want = expected.get(name)
        if want and want != shape and name.endswith(_RESHAPED) and math.prod(want) == math.prod(shape):
            shape = want  # stored squeezed: the [1, hidden] shared-expert gate, the conv's C 1 K weight
        if want != shape:
            raise QwenError(f"tensor {stored!r} has shape {shape}, the metadata implies {want}")
        if name in plan:
            raise QwenError(f"GGUF holds {name} twice ({plan[name].source.parts[0].name!r} and {stored!r})")
        plan[name] = Entry(source, name, shape, expert)
    missing = set(expected) - set(plan)
    if missing and not any(name.startswith("model.layers.") for name in plan):
        raise QwenError(f"this {arch} GGUF holds no decoder layer (a draft-only file, as convert_hf_to_gguf.py --mtp "
                        "writes?); load the model's own GGUF")
    if missing:
        raise QwenError(f"GGUF lacks {len(missing)} tensors of a {arch} model, e.g. {sorted(missing)[0]!r}")
    return list(plan.values())


def _jobs(plan: list[Entry], dtype: str | None, config: dict[str, Any]) -> tuple[list[Job], dict[str, Any] | None]:
    """What to write, and the folder's `quantization` (None for a float folder). Kept: every matrix whose
    GGUF type is in KEPT, an expert stack as one `mlp.switch_mlp.<proj>` [X, out, in] module as mlx-lm
    stores it; the default bits are the commonest, others per-module overrides, float matrices `false`."""
    def keep(entry: Entry) -> bool:
        source, qtype = entry.source, int(entry.source.parts[0].tensor_type)
        return (dtype is None and qtype in KEPT and source.fix is None
                and all(int(t.tensor_type) == qtype for t in source.parts)
                and entry.name.endswith(".weight") and "norm" not in entry.name and len(entry.shape) == 2
                and _shape(source)[-2:] == entry.shape
                and (source.cols is None or _block_order(source.cols, KEPT[qtype][3]) is not None))

    if not any(keep(entry) for entry in plan):
        return [_float_job(entry, dtype or "float32") for entry in plan], None
    config["torch_dtype"] = config["dtype"] = "float32"
    jobs, bits, floats, stacks = [], {}, [], set()
    for entry in plan:
        module = entry.name.removesuffix(".weight")
        if entry.expert is not None:
            module = re.sub(r"\.experts\.\d+\.", ".switch_mlp.", module)
        if not keep(entry):
            jobs.append(_float_job(entry, "float32"))
            if entry.name.endswith(".weight") and "norm" not in entry.name and len(entry.shape) == 2:
                floats.append(module)
            continue
        shape = entry.shape
        if entry.expert is not None:  # the whole stack at once, the first time one of its experts comes by
            if module in stacks:
                continue
            stacks.add(module)
            shape = (_shape(entry.source)[0], *shape)
        jobs.append(_kept_job(entry.source, module, shape))
        bits[module] = kept_bits(entry.source.parts[0].tensor_type)
    default = max(sorted(set(bits.values())), key=list(bits.values()).count)
    quantization: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": default, "mode": "affine"}
    quantization.update({m: {"group_size": GROUP_SIZE, "bits": b} for m, b in bits.items() if b != default})
    quantization.update({m: False for m in dict.fromkeys(floats)})
    return jobs, quantization


def cached_conversion(gguf_path: str | Path, dtype: str | None = "float32", progress: bool = True) -> Path:
    """convert_gguf into cache_dir()/gguf/<sha256[:16]>-<dtype>/ once (`-blocks` for dtype None: the blocks
    MLX holds exactly kept); later calls return that folder."""
    if dtype is not None:
        check_dtype(dtype)
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise QwenError(f"GGUF file not found: {gguf_path}")
    root = cache_dir() / "gguf"
    target = root / f"{sha256_file(gguf_path)[:16]}-{dtype or 'blocks'}"
    # The folder only ever appears by rename once complete, so its config.json means it is whole.
    if (target / "config.json").is_file():
        return target
    with file_lock(root / f".{target.name}.lock"):
        if (target / "config.json").is_file():
            return target
        return convert_gguf(gguf_path, target, dtype=dtype, force=True, progress=progress)
