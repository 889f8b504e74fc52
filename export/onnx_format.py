"""What an exported ONNX folder looks like: the graph's input/output names, the model file names and the
export options. The exporter (onnx_export.py) writes this layout and the backend (onnx_backend.py) reads it;
both import it from here.

The files are transformers.js' set, named by its `dtype` option (`from_pretrained(id, {dtype})` loads
`onnx/model{suffix}.onnx`): fp32 model.onnx, fp16 model_fp16.onnx, q8 model_quantized.onnx (its default on the
browser's wasm backend), int8 model_int8.onnx, uint8 model_uint8.onnx, q4 model_q4.onnx, q4f16
model_q4f16.onnx (the usual WebGPU choice). Each variant comes from one traced float graph (BASE_DTYPE) and a
weight transform (QUANTIZATION of it).
"""

from __future__ import annotations

from typing import Sequence

from qwen_mlx.dtypes import check_dtype
from qwen_mlx.errors import QwenError

DTYPES = ("float32", "float16")  # of qwen_mlx.dtypes.DTYPES, those onnxruntime runs on every provider
QUANTIZATIONS = ("int4",)
ATTENTIONS = ("standard", "gqa")  # standard ONNX ops (the default) or com.microsoft GroupQueryAttention
DEFAULT_OPSET = 18  # the dynamo exporter's lowest; MatMulNBits lives in com.microsoft, outside it
MIN_OPSET = 18
# The routed experts' graph (export/moe_onnx.py): onnxruntime's com.microsoft MoE / QMoE op, or standard ops.
MOE_GRAPHS = ("fused", "standard")
DEFAULT_MOE_GRAPH = "fused"


# transformers.js dtype -> the file it loads (its DEFAULT_DTYPE_SUFFIX_MAPPING), in a fixed order.
VARIANT_FILES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "q8": "model_quantized.onnx",
                 "int8": "model_int8.onnx", "uint8": "model_uint8.onnx", "q4": "model_q4.onnx",
                 "q4f16": "model_q4f16.onnx"}
VARIANTS = tuple(VARIANT_FILES)
# The traced float graph each variant is made from, and what is done to its weights then.
BASE_DTYPE = {"fp32": "float32", "fp16": "float16", "q8": "float32", "int8": "float32", "uint8": "float32",
              "q4": "float32", "q4f16": "float16"}
QUANTIZATION = {"fp32": None, "fp16": None, "q8": "q8", "int8": "int8", "uint8": "uint8", "q4": "int4",
                "q4f16": "int4"}
EIGHT_BIT = ("q8", "int8", "uint8")  # onnxruntime's dynamic quantizer (MatMulInteger), export/quantize.py
# What `export-onnx` writes when told neither --dtypes nor --dtype/--quantize: the float32 reference, the
# defaults of transformers.js' devices (fp32 in Node, q8 on wasm, q4f16 the WebGPU habit), fp16, and q4, the
# one onnxruntime-genai runs fastest. int8 duplicates q8 for this graph (the same QInt8 weights) and uint8 is
# asked for by name (docs/BENCHMARKS.md has every variant's quality and size).
DEFAULT_VARIANTS = ("fp32", "fp16", "q8", "q4", "q4f16")


def variant_of(dtype: str, quantize: str | None) -> str:
    """The single-file spelling (--dtype float32|float16, --quantize int4) as a name of the set."""
    return {("float32", None): "fp32", ("float16", None): "fp16", ("float32", "int4"): "q4",
            ("float16", "int4"): "q4f16"}[dtype, quantize]


def parse_variants(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """`fp32,q8,q4` (or `all`, or a list of names) -> the names, checked, without repeats, in the set's
    order."""
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if names == ["all"]:
        return list(VARIANTS)
    unknown = [n for n in names if n not in VARIANT_FILES]
    if unknown or not names:
        what = f"unknown ONNX dtype {unknown[0]!r}" if unknown else "no ONNX dtype named"
        raise QwenError(f"{what} (choose from {', '.join(VARIANTS)}, or all)")
    return [v for v in VARIANTS if v in names]


def io_names(num_layers: int, position_ids: bool = True, linear: Sequence[int] = ()) -> tuple[list[str], list[str]]:
    """The names optimum, onnxruntime-genai and transformers.js share, in the graph's order. The
    `--attention gqa` graph has no position_ids (GroupQueryAttention derives positions from the mask). The hybrid
    family's `linear` layers (Gated DeltaNet) carry a conv window and a recurrent state instead of keys and values,
    named as transformers.js v4 names them (its configs.js `getCacheNames`)."""
    inputs = ["input_ids", "attention_mask"] + (["position_ids"] if position_ids else [])
    outputs = ["logits"]
    for i in range(num_layers):
        if i in linear:
            inputs += [f"past_conv.{i}", f"past_recurrent.{i}"]
            outputs += [f"present_conv.{i}", f"present_recurrent.{i}"]
        else:
            inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
            outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def model_filename(dtype: str, quantize: str | None) -> str:
    """transformers.js' names: model.onnx, model_fp16.onnx, model_q4.onnx, model_q4f16.onnx."""
    return VARIANT_FILES[variant_of(dtype, quantize)]


def normalize_options(dtype: str | None, quantize: str | int | None, opset: int | None) -> tuple[str, str | None, int]:
    """Check the user's choices before any work; accepts `--quantize 4` and `int4` alike."""
    dtype = check_dtype(dtype or "float32", DTYPES, "the ONNX export")
    if quantize is not None:
        q = str(quantize).lower()
        quantize = {"4": "int4", "int4": "int4", "q4": "int4"}.get(q)
        if quantize is None:
            raise QwenError(f"unknown quantization {q!r} for the ONNX export (choose from {', '.join(QUANTIZATIONS)})")
    opset = DEFAULT_OPSET if opset is None else opset
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < MIN_OPSET:
        raise QwenError(f"--opset must be an integer >= {MIN_OPSET} (the dynamo exporter's lowest), got {opset!r}")
    return dtype, quantize, opset


def check_attention(attention: str | None) -> str:
    attention = (attention or "standard").lower()
    if attention not in ATTENTIONS:
        raise QwenError(f"unknown attention form {attention!r} for the ONNX export "
                        f"(choose from {', '.join(ATTENTIONS)})")
    return attention


__all__ = ["VARIANT_FILES", "VARIANTS", "BASE_DTYPE", "QUANTIZATION", "EIGHT_BIT", "DEFAULT_VARIANTS", "variant_of",
           "parse_variants", "DTYPES", "QUANTIZATIONS", "ATTENTIONS", "check_attention", "MOE_GRAPHS",
           "DEFAULT_MOE_GRAPH", "DEFAULT_OPSET", "MIN_OPSET", "io_names", "model_filename", "normalize_options"]
