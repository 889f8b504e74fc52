"""Export a checkpoint to an ONNX folder that optimum, onnxruntime-genai and transformers.js can all load.

The PyTorch twin (export/models/qwen2.py) is traced with torch.onnx's dynamo exporter: it names the inputs and
outputs as given, keeps head counts and head_dim static and batch / sequence / past dynamic, and folds
each Linear's weight transpose into one initializer (with `attention="gqa"`, each layer's attention core is
one com.microsoft GroupQueryAttention instead: export/gqa.py). Then: readable initializer and axis names, optional
int4 weight quantization by onnxruntime's own MatMulNBits quantizer (a tied embedding stays one table, int4
at both ends: export/quantize.py), weights to external data above the protobuf limit, the side files
(config, generation config, tokenizer with its chat template, genai config), and a check of the result on
onnxruntime against the twin (export/onnx_validate.py). Everything is written into a staging sibling that
replaces the folder only when complete (qwen_mlx.files.staged_folder): a failure, Ctrl-C or kill leaves
nothing half-written, and the next run removes what a killed one left.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator, Sequence

from qwen_mlx.checkpoint import Checkpoint, read_generation_config
from qwen_mlx.errors import QwenError
from qwen_mlx.files import staged_folder

from .onnx_format import (BASE_DTYPE, DEFAULT_MOE_GRAPH, DEFAULT_VARIANTS, EIGHT_BIT, MOE_GRAPHS, QUANTIZATION,
                          VARIANT_FILES, check_attention, io_names, normalize_options, parse_variants, variant_of)
from .onnx_validate import validate_export
from .optimize import fuse_skip_rms_norm, optimize, pack_gqa_qkv
from .quantize import INT4_BLOCK_SIZE, eight_bit_weights, quantize_8bit, quantize_int4

# Weights above this go to `<model>.onnx_data`. The protobuf limit (2 GiB) forces it for float32, and it pays
# below that too: onnxruntime parses an inline 850 MB int4 protobuf into a second copy in memory (peak RSS
# 1.40 GB against 0.61 GB with external data, measured with onnxruntime-genai on the real 0.5B model).
EXTERNAL_DATA_BYTES = 64 << 20
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json")
# Axis names as onnxruntime-genai's builder writes them.
AXES = {"batch": "batch_size", "sequence": "sequence_length", "past_sequence": "past_sequence_length",
        "total": "total_sequence_length"}


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    """Announce a long step on stderr and time it (silent under QWEN_MLX_QUIET)."""
    quiet = bool(os.environ.get("QWEN_MLX_QUIET"))
    if not quiet:
        print(f"export: {what} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    if not quiet:
        print(f"export: {what}: done in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)


def export_onnx(ckpt: Checkpoint, out_dir: Path, dtype: str = "float32", quantize: str | None = None,
                opset: int | None = None, force: bool = False, validate: bool = True,
                attention: str = "standard", moe: str = DEFAULT_MOE_GRAPH,
                variants: Sequence[str] | None = None) -> Path:
    """Write the ONNX folder `out_dir`; returns the path of the (first) .onnx model file in it. `variants`:
    names of transformers.js' set to write in one run (fp32, fp16, q8, int8, uint8, q4, q4f16: see
    export_onnx_variants); without it, the one file `dtype` and `quantize` name (float32 / float16, int4).
    `attention`: "standard" (standard ONNX ops, exact for any padding and RoPE scaling) or "gqa" (com.microsoft
    GroupQueryAttention, onnxruntime-genai's builder form; export/gqa.py says what it cannot represent). `moe`:
    the routed experts as onnxruntime's com.microsoft MoE/QMoE op ("fused") or standard ops ("standard");
    see export/moe_onnx.py."""
    return export_onnx_variants(ckpt, out_dir, variants, dtype, quantize, opset, force, validate, attention, moe)[0]


def default_variants(ckpt: Checkpoint, moe: str = DEFAULT_MOE_GRAPH) -> tuple[list[str], str | None]:
    """The files `export-onnx` writes when none are named: DEFAULT_VARIANTS less those this model cannot hold,
    and a note saying which were left out and why (None when none were)."""
    variants = list(DEFAULT_VARIANTS)
    if ckpt.args.num_experts and moe == "fused":
        left_out = [v for v in variants if v in EIGHT_BIT]
        variants = [v for v in variants if v not in EIGHT_BIT]
        return variants, (f"{', '.join(left_out)} left out: the 8-bit ONNX variants cannot hold the fused MoE "
                          "experts (onnxruntime's dynamic quantizer leaves com.microsoft MoE float32); for them, "
                          "pass --moe standard --dtypes with the files you want")
    return variants, None


def unsupported(ckpt: Checkpoint) -> str | None:
    """Why this exporter cannot take `ckpt` at all, or None: checked before any work here, and asked by
    `--backend auto` (export/cached_export.py) before it chooses the ONNX path, so the two never disagree."""
    if ckpt.args.dual_chunk is not None:
        return ("this model uses Dual Chunk Attention (config.json dual_chunk_attention_config), which the ONNX "
                "export does not carry: its graph would attend with plain RoPE and differ past "
                f"{ckpt.args.dual_chunk.plain_up_to} tokens; run it with the mlx or torch backend")
    from .models import model_class

    try:
        model_class(ckpt.args.model_type)  # the PyTorch twin the export traces
    except QwenError as e:
        return str(e)
    return None


def export_onnx_variants(ckpt: Checkpoint, out_dir: Path, variants: Sequence[str] | str | None = None,
                         dtype: str = "float32", quantize: str | None = None, opset: int | None = None,
                         force: bool = False, validate: bool = True, attention: str = "standard",
                         moe: str = DEFAULT_MOE_GRAPH) -> list[Path]:
    """Write every file of `variants` (see export_onnx) into one folder, all or nothing; returns their paths.
    One trace per float dtype: fp32, q8, int8, uint8 and q4 come from the float32 graph, fp16 and q4f16 from
    the float16 one; each file is checked against the twin (TOLERANCE in export/onnx_validate.py)."""
    dtype, quantize, opset = normalize_options(dtype, quantize, opset)
    if variants is None:
        variants = [variant_of(dtype, quantize)]
    elif dtype != "float32" or quantize is not None:
        raise QwenError("name the files either by a list of ONNX dtypes (--dtypes) or by --dtype/--quantize, not both")
    variants = parse_variants(variants)
    if moe not in MOE_GRAPHS:
        raise QwenError(f"unknown MoE graph {moe!r} (choose from {', '.join(MOE_GRAPHS)})")
    if (refusal := unsupported(ckpt)) is not None:
        raise QwenError(refusal)
    attention = check_attention(attention)
    if attention == "gqa":
        from .gqa import check_gqa_supported

        check_gqa_supported(ckpt.args)  # before any work
    eight_bit = [v for v in variants if v in EIGHT_BIT]
    if eight_bit and ckpt.args.num_experts and moe == "fused":
        raise QwenError(f"{', '.join(eight_bit)}: the 8-bit ONNX variants cannot hold the fused MoE experts "
                        "(onnxruntime's dynamic quantizer leaves com.microsoft MoE float32); export q4 / q4f16 "
                        "(QMoE), or pass --moe standard")
    out_dir = Path(out_dir).expanduser().absolute()
    source = ckpt.folder.resolve()
    if out_dir.resolve() == source or source.is_relative_to(out_dir.resolve()):
        raise QwenError(f"{out_dir}: refusing to export over the checkpoint being exported")
    with staged_folder(out_dir, force) as staging:
        (staging / "onnx").mkdir()
        external = write_variants(ckpt, staging / "onnx", variants, opset, attention, moe)
        write_side_files(ckpt, staging, external, attention)
        if validate:
            with _step("checking every ONNX file against the PyTorch twin"):
                validate_export(ckpt, staging, variants=variants)
    return [out_dir / "onnx" / VARIANT_FILES[v] for v in variants]


# ---- the graph -----------------------------------------------------------------------------------------

def trace(ckpt: Checkpoint, dtype: str, opset: int, attention: str = "standard", moe: str = DEFAULT_MOE_GRAPH):
    """Trace the twin with the dynamo exporter -> onnx ModelProto (weights in memory); `attention` and `moe`
    as export_onnx."""
    import onnx_ir as ir
    import torch

    from .models.load import load_model
    from .moe_onnx import CUSTOM_TRANSLATIONS, fuse_moe_blocks

    with _step(f"loading the PyTorch twin ({dtype})"):
        model = load_model(ckpt, dtype)
    if ckpt.args.hybrid:  # the delta rule's scan traces its autograd form otherwise, which the exporter cannot lower
        model.requires_grad_(False)
    translations = {}
    if moe == "fused" and fuse_moe_blocks(model):
        translations.update(CUSTOM_TRANSLATIONS)
    if attention == "gqa":
        from .gqa import GQAForCausalLM, translation_table

        model = GQAForCausalLM(model)
        translations.update(translation_table())
    a = ckpt.args
    # Example sizes above 1: torch.export specializes dimensions whose example size is 0 or 1. The hybrid
    # family's example prompt spans two chunks of its traced delta rule (export/models/qwen3_next.py), so the
    # count of chunks stays symbolic too.
    B, L, P = 2, (20 if a.hybrid else 3), 4
    kv_shape = (B, a.num_key_value_heads, P, a.head_dim)
    # Distinct tensors for every key and value: the tracer merges inputs that are one tensor object.
    dtype_ = model.model.norm.weight.dtype
    past = [(torch.zeros(kv_shape, dtype=dtype_), torch.zeros(kv_shape, dtype=dtype_))
            for _ in range(a.num_hidden_layers)]
    linear = a.linear_layers
    if linear:  # a fixed-size window and state per row: only the batch axis is dynamic
        for i, (conv, state) in enumerate(model.empty_cache(B)):
            if i in linear:
                past[i] = (conv.clone(), state.clone())
    example = (torch.zeros((B, L), dtype=torch.int64), torch.ones((B, P + L), dtype=torch.int64),
               *([torch.arange(P, P + L).repeat(B, 1)] if attention == "standard" else []), past)
    Dim = torch.export.Dim
    batch, seq, past_len = Dim("batch"), Dim("sequence"), Dim("past_sequence")
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: Dim.AUTO},
               **({"position_ids": {0: batch, 1: seq}} if attention == "standard" else {}),
               "past_key_values": [({0: batch}, {0: batch}) if i in linear else
                                   ({0: batch, 2: past_len}, {0: batch, 2: past_len}) for i in range(len(past))]}
    inputs, outputs = io_names(a.num_hidden_layers, position_ids=attention == "standard", linear=linear)
    with _step("tracing the twin to ONNX (torch.onnx dynamo exporter)"), \
            contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, example, dynamo=True, input_names=inputs, output_names=outputs,
                                    dynamic_shapes=dynamic, opset_version=opset, optimize=True, verbose=False,
                                    custom_translation_table=translations or None)
    del model
    with _step("serializing the graph"):
        proto = ir.to_proto(program.model)
    del program
    _tidy_names(proto)
    return proto


def _tidy_names(proto) -> None:
    """Name axes as genai/optimum do and folded weight transposes after their module."""
    graph = proto.graph
    # Axis symbols: the mask's total length is a symbol of its own (Dim.AUTO); presents' is a sum.
    mask_axis = graph.input[1].type.tensor_type.shape.dim[1].dim_param
    rename = {"batch": AXES["batch"], "sequence": AXES["sequence"], "past_sequence": AXES["past_sequence"],
              "past_sequence + sequence": AXES["total"], mask_axis: AXES["total"]}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]
    # `val_95` -> `model.layers.0.self_attn.q_proj.weight.T`, from the node's module scope metadata.
    initializers = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in initializers or not node.input[1].startswith("val_"):
            continue
        meta = {p.key: p.value for p in node.metadata_props}
        try:
            scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        except (ValueError, SyntaxError):
            continue
        module = scopes[-2] if len(scopes) >= 2 and scopes[-2] else None
        if not module:
            continue
        new = f"{module}.weight.T"
        if new in initializers:
            continue
        old = node.input[1]
        initializers[old].name = new
        initializers[new] = initializers.pop(old)
        for other in graph.node:
            for i, name in enumerate(other.input):
                if name == old:
                    other.input[i] = new


def _weight_bytes(proto) -> int:
    return sum(len(t.raw_data) + 4 * (len(t.float_data) + len(t.int32_data)) + 8 * len(t.int64_data)
               for t in proto.graph.initializer)


def write_variants(ckpt: Checkpoint, onnx_dir: Path, variants: Sequence[str], opset: int,
                   attention: str = "standard", moe: str = DEFAULT_MOE_GRAPH) -> dict[str, bool]:
    """Trace once per float dtype the set needs and write each variant's file into `onnx_dir`, one at a time
    (the real 0.5B model's float32 graph is 2.5 GB in memory, and the 8-bit quantizer needs ~3x that): a
    float variant is the graph itself; a quantized one is made from the float graph saved on disk (reloaded
    for each, since the quantizers rewrite the graph in place), and files with the same weights are quantized
    once. Returns {variant: whether its weights went to external data}."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    external: dict[str, bool] = {}
    for base in ("float32", "float16"):
        members = [v for v in variants if BASE_DTYPE[v] == base]
        if not members:
            continue
        proto = _float_graph(ckpt, base, opset, attention, moe)
        derived = [v for v in members if QUANTIZATION[v] is not None]
        # Variants whose weights come out identical (q8 is int8 or uint8, by the graph's ops) share one run.
        transforms: dict[str, list[str]] = {}
        for v in derived:
            transform = QUANTIZATION[v] if QUANTIZATION[v] == "int4" else eight_bit_weights(proto, v)
            transforms.setdefault(transform, []).append(v)
        plain = [v for v in members if QUANTIZATION[v] is None]
        source = None
        if plain:
            source = onnx_dir / VARIANT_FILES[plain[0]]
            external[plain[0]] = _save(proto, source)
        elif len(transforms) > 1:
            source = onnx_dir / f".{base}-graph.onnx"  # scratch: removed below, never in the result
            _save(proto, source)
        for transform, names in transforms.items():
            if source is not None:
                del proto
                proto = onnx.load(str(source))
            proto = _quantized(ckpt, proto, transform)
            for i, v in enumerate(names):
                if i and external[names[i - 1]]:  # saving moved the weights out of `proto`: read them back
                    load_external_data_for_model(proto, str(onnx_dir))
                external[v] = _save(proto, onnx_dir / VARIANT_FILES[v])
        del proto
        if source is not None and not plain:
            for scratch in onnx_dir.glob(f"{source.name}*"):
                scratch.unlink()
    return external


def _float_graph(ckpt: Checkpoint, dtype: str, opset: int, attention: str, moe: str):
    """The traced graph of one float dtype, optimized (export/optimize.py)."""
    proto = trace(ckpt, dtype, opset, attention, moe)
    with _step("fusing sibling MatMuls, canonicalizing RMSNorm (export/optimize.py)"):
        optimize(proto)  # before quantizing: a fused q/k/v or gate/up MatMul is quantized as one
        if attention == "gqa":  # the builder's form: packed q/k/v into the op, residual Adds inside the norms
            pack_gqa_qkv(proto.graph)
            fuse_skip_rms_norm(proto.graph)
    return proto


def _quantized(ckpt: Checkpoint, proto, transform: str):
    """`proto` with its weights in int4 (MatMulNBits) or 8 bits ("int8" / "uint8" weights, MatMulInteger)."""
    if transform != "int4":
        with _step(f"quantizing MatMul weights to {transform} (onnxruntime's dynamic quantizer, per tensor)"):
            return quantize_8bit(proto, transform)
    kept = 0
    if ckpt.quantization is not None:
        from .stored_quant import int4_from_stored
        with _step("MatMulNBits from the stored codes, scales and zero points (export/stored_quant.py)"):
            proto, kept = int4_from_stored(proto, ckpt)  # the publisher's quantization; what it kept float stays
    if not kept:
        with _step(f"quantizing MatMul weights to int4 (MatMulNBits, block {INT4_BLOCK_SIZE})"):
            proto = quantize_int4(proto)
    return proto


def _save(proto, path: Path) -> bool:
    """Save and check `proto` at `path`; returns whether the weights went to external data (then they are
    no longer in `proto`)."""
    import onnx

    external = _weight_bytes(proto) > EXTERNAL_DATA_BYTES
    with _step(f"writing {path.name}" + (f" + {path.name}_data" if external else "")):
        onnx.save_model(proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=f"{path.name}_data", size_threshold=1024)
        onnx.checker.check_model(str(path))  # by path: works past 2 GB with external data
    umask = os.umask(0)
    os.umask(umask)
    for written in path.parent.glob(f"{path.name}*"):  # onnx creates the data file 0600: as readable as the rest
        os.chmod(written, 0o666 & ~umask)
    return external


# ---- the side files ------------------------------------------------------------------------------------

def _dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _token_ids(value) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


# The file onnxruntime-genai is pointed at, first present: int4 is what it runs fastest on a CPU (its own
# builder's habit), then the float32 reference; 8-bit MatMulInteger graphs last.
GENAI_PREFERENCE = ("q4", "fp32", "q4f16", "fp16", "uint8", "q8", "int8")
# transformers.js' default file per device when config.json names no dtype: fp32 (Node CPU, WebGPU) and q8
# (the browser's wasm backend).
TJS_DEVICE_DEFAULTS = ("fp32", "q8")


def transformers_js_config(external: dict[str, bool]) -> dict:
    """config.json's `transformers.js_config` for the files written ({variant: external data?}):
    - `dtype`: left out when every device's default file is there (so each device loads its own default);
      else the first file of the set present, so that a plain from_pretrained finds a file;
    - `kv_cache_dtype`: float16 for the fp16 / q4f16 graphs (their cache inputs are float16);
    - `use_external_data_format`: true when every file keeps its weights in `<file>_data`, else a map of
      the files that do (transformers.js 3.x reads the boolean, 4.x a map keyed by file name too)."""
    config: dict = {}
    if not all(v in external for v in TJS_DEVICE_DEFAULTS):
        config["dtype"] = next(iter(external))
    half = {v: "float16" for v in ("fp16", "q4f16") if v in external}
    if half:
        config["kv_cache_dtype"] = half
    if all(external.values()):
        config["use_external_data_format"] = True
    elif any(external.values()):
        config["use_external_data_format"] = {VARIANT_FILES[v]: True for v, ext in external.items() if ext}
    return config


def write_side_files(ckpt: Checkpoint, folder: Path, external: dict[str, bool], attention: str = "standard") -> None:
    """config.json, generation_config.json, tokenizer files and genai_config.json next to onnx/, for the
    files `external` names ({variant: whether its weights are in external data}, in the set's order)."""
    src = ckpt.folder
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    external = {v: external[v] for v in VARIANT_FILES if v in external}
    config["transformers.js_config"] = transformers_js_config(external)
    _dump(folder / "config.json", config)
    generation = read_generation_config(src)
    if generation:
        _dump(folder / "generation_config.json", generation)
    _write_tokenizer(src, folder)
    if ckpt.args.hybrid:
        # genai's config for a recurrent-state decoder is its own builder's (not written here yet): a
        # genai_config.json naming only keys and values would describe a graph this is not.
        return
    genai_file = next(v for v in GENAI_PREFERENCE if v in external)
    _dump(folder / "genai_config.json",
          genai_config(ckpt, config, generation, f"onnx/{VARIANT_FILES[genai_file]}", attention))


def _write_tokenizer(src: Path, folder: Path) -> None:
    if not (src / "tokenizer.json").is_file():
        print(f"warning: {src} has no tokenizer.json; the ONNX folder will have no tokenizer", file=sys.stderr)
        return
    from qwen_mlx.tokenizer import Tokenizer

    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, folder / name)
    path = src / "tokenizer_config.json"
    tok_config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    # transformers.js reads the template only from tokenizer_config.json, never chat_template.jinja: inline
    # the one qwen_mlx itself uses, whichever file it came from.
    tok_config["chat_template"] = Tokenizer.from_folder(src).chat_template
    _dump(folder / "tokenizer_config.json", tok_config)


def genai_config(ckpt: Checkpoint, config: dict, generation: dict, model_file: str,
                 attention: str = "standard") -> dict:
    """onnxruntime-genai's genai_config.json, with the keys its builder (0.18) writes for a decoder."""
    gqa = attention == "gqa"
    a = ckpt.args
    eos = _token_ids(generation.get("eos_token_id")) or _token_ids(config.get("eos_token_id"))
    pad = (_token_ids(generation.get("pad_token_id")) or _token_ids(config.get("pad_token_id")) or eos or [0])[0]
    bos = (_token_ids(generation.get("bos_token_id")) or _token_ids(config.get("bos_token_id")) or [pad])[0]
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": a.context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file,
                "head_size": a.head_dim,
                "hidden_size": a.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           **({} if gqa else {"position_ids": "position_ids"}),
                           "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": a.num_attention_heads,
                "num_hidden_layers": a.num_hidden_layers,
                "num_key_value_heads": a.num_key_value_heads,
            },
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": pad,
            # genai knows "qwen2" and "qwen3"; the type picks its decoder-only pipeline and nothing inside
            # the graph, so the MoE variants (the experts live in the graph) take their dense sibling's.
            "type": "qwen3" if a.qk_norm else "qwen2",
            "vocab_size": a.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": bool(generation.get("do_sample", False)),
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": a.context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # The standard graph concatenates past and new keys into a new present: no shared buffer.
            # GroupQueryAttention writes the new keys into the past's buffer in place (genai then
            # allocates each past at max_length once), as the builder's graph does.
            "past_present_share_buffer": gqa,
            "repetition_penalty": float(generation.get("repetition_penalty", 1.0)),
            "temperature": float(generation.get("temperature", 1.0)),
            "top_k": int(generation.get("top_k") or 50),
            "top_p": float(generation.get("top_p", 1.0)),
        },
    }
