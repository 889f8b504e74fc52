"""Export a checkpoint to an ONNX folder that optimum, onnxruntime-genai and transformers.js can all load.

The PyTorch twin (export/model.py) is traced with torch.onnx's dynamo exporter: it names the inputs and
outputs as given, keeps head counts and head_dim static and batch / sequence / past dynamic, and folds
each Linear's weight transpose into one initializer. Then: readable initializer and axis names, optional
int4 weight quantization by onnxruntime's own MatMulNBits quantizer (a tied embedding stays one table, int4
at both ends: export/quantize.py), weights to external data above the
protobuf limit, the side files (config, generation config, tokenizer with its chat template, genai config),
and a check of the result on onnxruntime against the twin. Everything is written into a temporary sibling
folder that is renamed into place only when complete.
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

import numpy as np

from qwen_mlx.checkpoint import Checkpoint, read_generation_config
from qwen_mlx.errors import QwenError

from .optimize import optimize
from .quantize import INT4_BLOCK_SIZE, quantize_int4

DTYPES = ("float32", "float16")
QUANTIZATIONS = ("int4",)
DEFAULT_OPSET = 18  # the dynamo exporter's lowest; MatMulNBits lives in com.microsoft, outside it
MIN_OPSET = 18
# Weights above this go to `<model>.onnx_data`. The protobuf limit (2 GiB) forces it for float32, and it pays
# below that too: onnxruntime parses an inline 850 MB int4 protobuf into a second copy in memory (peak RSS
# 1.40 GB against 0.61 GB with external data, measured with onnxruntime-genai on the real 0.5B model).
EXTERNAL_DATA_BYTES = 64 << 20
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json")
# Axis names as onnxruntime-genai's builder writes them.
AXES = {"batch": "batch_size", "sequence": "sequence_length", "past_sequence": "past_sequence_length",
        "total": "total_sequence_length"}
# (max |logit diff| relative to the largest logit, greedy agreement required) against the float32 twin.
# fp32 differs only by summation order (measured ~2e-6 on tiny models). fp16 and int4 bounds are measured
# values with a wide margin (tiny random models: fp16 2e-3 / 100%, int4 0.46 / 89%, the worst case, as
# random weights quantize badly): they catch a broken export, not a slightly lossy one.
TOLERANCE = {"float32": (2e-4, 1.0), "float16": (2e-2, 0.75), "int4": (0.75, 0.5)}


def model_filename(dtype: str, quantize: str | None) -> str:
    """transformers.js' names: model.onnx, model_fp16.onnx, model_q4.onnx, model_q4f16.onnx."""
    if quantize == "int4":
        return "model_q4.onnx" if dtype == "float32" else "model_q4f16.onnx"
    return "model.onnx" if dtype == "float32" else "model_fp16.onnx"


def normalize_options(dtype: str | None, quantize: str | int | None, opset: int | None) -> tuple[str, str | None, int]:
    """Check the user's choices before any work; accepts `--quantize 4` and `int4` alike."""
    dtype = dtype or "float32"
    if dtype not in DTYPES:
        raise QwenError(f"unknown dtype {dtype!r} for the ONNX export (choose from {', '.join(DTYPES)})")
    if quantize is not None:
        q = str(quantize).lower()
        quantize = {"4": "int4", "int4": "int4", "q4": "int4"}.get(q)
        if quantize is None:
            raise QwenError(f"unknown quantization {q!r} for the ONNX export (choose from {', '.join(QUANTIZATIONS)})")
    opset = DEFAULT_OPSET if opset is None else opset
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < MIN_OPSET:
        raise QwenError(f"--opset must be an integer >= {MIN_OPSET} (the dynamo exporter's lowest), got {opset!r}")
    return dtype, quantize, opset


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
                opset: int | None = None, force: bool = False, validate: bool = True) -> Path:
    """Write the ONNX folder `out_dir`; returns the path of the .onnx model file in it."""
    dtype, quantize, opset = normalize_options(dtype, quantize, opset)
    out_dir = Path(out_dir).expanduser().absolute()
    source = ckpt.folder.resolve()
    if out_dir.resolve() == source or source.is_relative_to(out_dir.resolve()):
        raise QwenError(f"{out_dir}: refusing to export over the checkpoint being exported")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise QwenError(f"{out_dir} exists and is not a folder")
        if any(out_dir.iterdir()) and not force:
            raise QwenError(f"{out_dir} is not empty (pass --force to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "onnx").mkdir(parents=True)
        name = model_filename(dtype, quantize)
        external = _build_model(ckpt, tmp / "onnx" / name, dtype, quantize, opset)
        write_side_files(ckpt, tmp, f"onnx/{name}", dtype, quantize, external)
        if validate:
            with _step("checking the ONNX model against the PyTorch twin"):
                validate_export(ckpt, tmp, dtype, quantize)
        _replace_folder(tmp, out_dir)
    except BaseException:  # KeyboardInterrupt included: never leave a half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / "onnx" / name


def _replace_folder(tmp: Path, out_dir: Path) -> None:
    """Move the finished folder into place; an old one (force) is renamed aside first, then removed."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- the graph -----------------------------------------------------------------------------------------

def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def trace(ckpt: Checkpoint, dtype: str, opset: int):
    """Trace the twin with the dynamo exporter -> onnx ModelProto (weights in memory)."""
    import onnx_ir as ir
    import torch

    from .model import load_model

    with _step(f"loading the PyTorch twin ({dtype})"):
        model = load_model(ckpt, dtype)
    a = ckpt.args
    # Example sizes above 1: torch.export specializes dimensions whose example size is 0 or 1.
    B, L, P = 2, 3, 4
    kv_shape = (B, a.num_key_value_heads, P, a.head_dim)
    # Distinct tensors for every key and value: the tracer merges inputs that are one tensor object.
    dtype_ = model.model.norm.weight.dtype
    past = [(torch.zeros(kv_shape, dtype=dtype_), torch.zeros(kv_shape, dtype=dtype_))
            for _ in range(a.num_hidden_layers)]
    example = (torch.zeros((B, L), dtype=torch.int64), torch.ones((B, P + L), dtype=torch.int64),
               torch.arange(P, P + L).repeat(B, 1), past)
    Dim = torch.export.Dim
    batch, seq, past_len = Dim("batch"), Dim("sequence"), Dim("past_sequence")
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: Dim.AUTO},
               "position_ids": {0: batch, 1: seq},
               "past_key_values": [({0: batch, 2: past_len}, {0: batch, 2: past_len}) for _ in past]}
    inputs, outputs = io_names(a.num_hidden_layers)
    with _step("tracing the twin to ONNX (torch.onnx dynamo exporter)"), \
            contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, example, dynamo=True, input_names=inputs, output_names=outputs,
                                    dynamic_shapes=dynamic, opset_version=opset, optimize=True, verbose=False)
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


def _build_model(ckpt: Checkpoint, path: Path, dtype: str, quantize: str | None, opset: int) -> bool:
    """Trace (+ quantize) and save to `path`; returns whether the weights went to external data."""
    import onnx

    proto = trace(ckpt, dtype, opset)
    with _step("fusing sibling MatMuls, canonicalizing RMSNorm (export/optimize.py)"):
        optimize(proto)  # before quantizing: a fused q/k/v or gate/up MatMul is quantized as one
    if quantize == "int4":
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
                     external: bool) -> None:
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
    _dump(folder / "genai_config.json", genai_config(ckpt, config, generation, model_file))


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


def genai_config(ckpt: Checkpoint, config: dict, generation: dict, model_file: str) -> dict:
    """onnxruntime-genai's genai_config.json, with the keys its builder (0.18) writes for a decoder."""
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
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": a.num_attention_heads,
                "num_hidden_layers": a.num_hidden_layers,
                "num_key_value_heads": a.num_key_value_heads,
            },
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": pad,
            "type": "qwen2",
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
            # The graph concatenates past and new keys into a new present: no shared buffer.
            "past_present_share_buffer": False,
            "repetition_penalty": float(generation.get("repetition_penalty", 1.0)),
            "temperature": float(generation.get("temperature", 1.0)),
            "top_k": int(generation.get("top_k") or 50),
            "top_p": float(generation.get("top_p", 1.0)),
        },
    }


# ---- validation ----------------------------------------------------------------------------------------

def _validation_prompt(ckpt: Checkpoint) -> list[int]:
    """A chat prompt through the checkpoint's own tokenizer, else fixed random ids."""
    try:
        from qwen_mlx.tokenizer import Tokenizer

        tok = Tokenizer.from_folder(ckpt.folder)
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Write a haiku about rivers."}]))
        if ids and max(ids) < ckpt.args.vocab_size:
            return ids
    except QwenError:
        pass
    return np.random.default_rng(0).integers(0, ckpt.args.vocab_size, size=12).tolist()


def teacher_forced_logits(backend, prompt: list[int], tokens: list[int]) -> list[np.ndarray]:
    """Logits after the prompt and after each of `tokens` fed one by one (cached decode)."""
    backend.trim(0)
    out = [backend.forward(prompt)]
    for t in tokens:
        out.append(backend.forward([t]))
    return out


def compare(reference: list[np.ndarray], other: list[np.ndarray]) -> dict:
    """Max |logit diff|, that relative to the largest reference logit, and greedy agreement."""
    diff = max(float(np.abs(r - o).max()) for r, o in zip(reference, other))
    scale = max(1.0, max(float(np.abs(r).max()) for r in reference))
    agree = float(np.mean([int(np.argmax(r)) == int(np.argmax(o)) for r, o in zip(reference, other)]))
    return {"max_abs_diff": diff, "relative_diff": diff / scale, "greedy_agreement": agree}


def measure_export(ckpt: Checkpoint, folder: Path, dtype: str, quantize: str | None, steps: int = 8) -> dict:
    """Run the export on onnxruntime beside the float32 twin (and MLX when importable) on a prompt plus
    `steps` cached decode steps; print the figures on stderr and return them (see compare)."""
    from .onnx_backend import OnnxBackend
    from .torch_backend import TorchBackend

    prompt = _validation_prompt(ckpt)
    twin = TorchBackend(ckpt, "float32")
    reference = [twin.forward(prompt)]
    tokens = []
    for _ in range(steps):  # the twin's own greedy continuation, then every backend is fed the same tokens
        tokens.append(int(np.argmax(reference[-1])))
        reference.append(twin.forward(tokens[-1:]))
    del twin
    onnx_backend = OnnxBackend(folder, dtype, quantize)
    result = compare(reference, teacher_forced_logits(onnx_backend, prompt, tokens))
    result["device"] = onnx_backend.device
    del onnx_backend
    print(f"validate: onnx ({model_filename(dtype, quantize)}) vs torch float32 on {len(prompt)} prompt tokens + "
          f"{steps} steps: max |logit diff| {result['max_abs_diff']:.3g} (relative {result['relative_diff']:.3g}), "
          f"greedy agreement {result['greedy_agreement']:.0%}", file=sys.stderr)
    mlx = _mlx_figures(ckpt, prompt, tokens, reference)
    if mlx:
        result["mlx"] = mlx
        print(f"validate: mlx float32 vs torch float32: max |logit diff| {mlx['max_abs_diff']:.3g}, "
              f"greedy agreement {mlx['greedy_agreement']:.0%}", file=sys.stderr)
    return result


def validate_export(ckpt: Checkpoint, folder: Path, dtype: str, quantize: str | None, steps: int = 8) -> dict:
    """measure_export, then QwenError when outside TOLERANCE."""
    result = measure_export(ckpt, folder, dtype, quantize, steps)
    max_rel, min_agree = TOLERANCE["int4" if quantize else dtype]
    if result["relative_diff"] > max_rel or result["greedy_agreement"] < min_agree:
        raise QwenError(f"the exported model does not match the PyTorch twin: relative logit diff "
                        f"{result['relative_diff']:.3g} (allowed {max_rel:g}), greedy agreement "
                        f"{result['greedy_agreement']:.0%} (required {min_agree:.0%}); nothing was written")
    return result


def _mlx_figures(ckpt: Checkpoint, prompt: list[int], tokens: list[int], reference: list[np.ndarray]) -> dict | None:
    """The same comparison for the MLX model, when MLX imports here (it is informative, not a gate)."""
    try:
        from qwen_mlx.mlx_backend import MLXBackend
    except ImportError:
        return None
    return compare(reference, teacher_forced_logits(MLXBackend(ckpt, "float32"), prompt, tokens))
