"""Export a checkpoint to an ONNX folder that optimum, onnxruntime-genai and transformers.js can all load.

The PyTorch twin (export/model.py) is traced with torch.onnx's dynamo exporter: it names the inputs and
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
from typing import Iterator

from qwen_mlx.checkpoint import Checkpoint, read_generation_config
from qwen_mlx.errors import QwenError
from qwen_mlx.files import staged_folder

from .onnx_format import DEFAULT_MOE_GRAPH, MOE_GRAPHS, check_attention, io_names, model_filename, normalize_options
from .onnx_validate import validate_export
from .optimize import fuse_skip_rms_norm, optimize, pack_gqa_qkv
from .quantize import INT4_BLOCK_SIZE, quantize_int4

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
                attention: str = "standard", moe: str = DEFAULT_MOE_GRAPH) -> Path:
    """Write the ONNX folder `out_dir`; returns the path of the .onnx model file in it. `attention`:
    "standard" (standard ONNX ops, exact for any padding and RoPE scaling) or "gqa" (com.microsoft
    GroupQueryAttention, onnxruntime-genai's builder form; export/gqa.py says what it cannot represent). `moe`:
    the routed experts as onnxruntime's com.microsoft MoE/QMoE op ("fused") or standard ops ("standard");
    see export/moe_onnx.py."""
    dtype, quantize, opset = normalize_options(dtype, quantize, opset)
    if moe not in MOE_GRAPHS:
        raise QwenError(f"unknown MoE graph {moe!r} (choose from {', '.join(MOE_GRAPHS)})")
    if ckpt.args.dual_chunk is not None:
        raise QwenError("this model uses Dual Chunk Attention (config.json dual_chunk_attention_config), which "
                        "the ONNX export does not carry: its graph would attend with plain RoPE and differ past "
                        f"{ckpt.args.dual_chunk.plain_up_to} tokens; run it with the mlx or torch backend")
    attention = check_attention(attention)
    if attention == "gqa":
        from .gqa import check_gqa_supported

        check_gqa_supported(ckpt.args)  # before any work
    out_dir = Path(out_dir).expanduser().absolute()
    source = ckpt.folder.resolve()
    if out_dir.resolve() == source or source.is_relative_to(out_dir.resolve()):
        raise QwenError(f"{out_dir}: refusing to export over the checkpoint being exported")
    name = model_filename(dtype, quantize)
    with staged_folder(out_dir, force) as staging:
        (staging / "onnx").mkdir()
        external = _build_model(ckpt, staging / "onnx" / name, dtype, quantize, opset, attention, moe)
        write_side_files(ckpt, staging, f"onnx/{name}", dtype, quantize, external, attention)
        if validate:
            with _step("checking the ONNX model against the PyTorch twin"):
                validate_export(ckpt, staging, dtype, quantize)
    return out_dir / "onnx" / name


# ---- the graph -----------------------------------------------------------------------------------------

def trace(ckpt: Checkpoint, dtype: str, opset: int, attention: str = "standard", moe: str = DEFAULT_MOE_GRAPH):
    """Trace the twin with the dynamo exporter -> onnx ModelProto (weights in memory); `attention` and `moe`
    as export_onnx."""
    import onnx_ir as ir
    import torch

    from .model import load_model
    from .moe_onnx import CUSTOM_TRANSLATIONS, fuse_moe_blocks

    with _step(f"loading the PyTorch twin ({dtype})"):
        model = load_model(ckpt, dtype)
    translations = {}
    if moe == "fused" and fuse_moe_blocks(model):
        translations.update(CUSTOM_TRANSLATIONS)
    if attention == "gqa":
        from .gqa import GQAForCausalLM, translation_table

        model = GQAForCausalLM(model)
        translations.update(translation_table())
    a = ckpt.args
    # Example sizes above 1: torch.export specializes dimensions whose example size is 0 or 1.
    B, L, P = 2, 3, 4
    kv_shape = (B, a.num_key_value_heads, P, a.head_dim)
    # Distinct tensors for every key and value: the tracer merges inputs that are one tensor object.
    dtype_ = model.model.norm.weight.dtype
    past = [(torch.zeros(kv_shape, dtype=dtype_), torch.zeros(kv_shape, dtype=dtype_))
            for _ in range(a.num_hidden_layers)]
    example = (torch.zeros((B, L), dtype=torch.int64), torch.ones((B, P + L), dtype=torch.int64),
               *([torch.arange(P, P + L).repeat(B, 1)] if attention == "standard" else []), past)
    Dim = torch.export.Dim
    batch, seq, past_len = Dim("batch"), Dim("sequence"), Dim("past_sequence")
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: Dim.AUTO},
               **({"position_ids": {0: batch, 1: seq}} if attention == "standard" else {}),
               "past_key_values": [({0: batch, 2: past_len}, {0: batch, 2: past_len}) for _ in past]}
    inputs, outputs = io_names(a.num_hidden_layers, position_ids=attention == "standard")
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


def _build_model(ckpt: Checkpoint, path: Path, dtype: str, quantize: str | None, opset: int,
                 attention: str = "standard", moe: str = DEFAULT_MOE_GRAPH) -> bool:
    """Trace (+ quantize) and save to `path`; returns whether the weights went to external data."""
    import onnx

    proto = trace(ckpt, dtype, opset, attention, moe)
    with _step("fusing sibling MatMuls, canonicalizing RMSNorm (export/optimize.py)"):
        optimize(proto)  # before quantizing: a fused q/k/v or gate/up MatMul is quantized as one
        if attention == "gqa":  # the builder's form: packed q/k/v into the op, residual Adds inside the norms
            pack_gqa_qkv(proto.graph)
            fuse_skip_rms_norm(proto.graph)
    kept = 0
    if quantize == "int4" and ckpt.quantization is not None:
        from .stored_quant import int4_from_stored
        with _step("MatMulNBits from the stored codes, scales and zero points (export/stored_quant.py)"):
            proto, kept = int4_from_stored(proto, ckpt)  # the publisher's quantization; what it kept float stays
    if quantize == "int4" and not kept:
        with _step(f"quantizing MatMul weights to int4 (MatMulNBits, block {INT4_BLOCK_SIZE})"):
            proto = quantize_int4(proto)
    external = _weight_bytes(proto) > EXTERNAL_DATA_BYTES
    with _step(f"writing {path.name}" + (f" + {path.name}_data" if external else "")):
        onnx.save_model(proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=f"{path.name}_data", size_threshold=1024)
        onnx.checker.check_model(str(path))  # by path: works past 2 GB with external data
    umask = os.umask(0)
    os.umask(umask)
    for written in path.parent.iterdir():  # onnx creates the data file 0600: make it as readable as the rest
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


def write_side_files(ckpt: Checkpoint, folder: Path, model_file: str, dtype: str, quantize: str | None,
                     external: bool, attention: str = "standard") -> None:
    """config.json, generation_config.json, tokenizer files and genai_config.json next to onnx/."""
    src = ckpt.folder
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    js_dtype = {"model.onnx": "fp32", "model_fp16.onnx": "fp16", "model_q4.onnx": "q4",
                "model_q4f16.onnx": "q4f16"}[Path(model_file).name]
    js_config: dict = {"dtype": js_dtype}  # the variant transformers.js loads by default
    if dtype == "float16":
        js_config["kv_cache_dtype"] = {js_dtype: "float16"}
    if external:
        js_config["use_external_data_format"] = True
    config["transformers.js_config"] = js_config
    _dump(folder / "config.json", config)
    generation = read_generation_config(src)
    if generation:
        _dump(folder / "generation_config.json", generation)
    _write_tokenizer(src, folder)
    _dump(folder / "genai_config.json", genai_config(ckpt, config, generation, model_file, attention))


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
