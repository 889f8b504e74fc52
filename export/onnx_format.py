"""What an exported ONNX folder looks like: the graph's input/output names, the model file names and the
export options. The exporter (onnx_export.py) writes this layout and the backend (onnx_backend.py) reads it;
both import it from here.
"""

from __future__ import annotations

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


def io_names(num_layers: int, position_ids: bool = True) -> tuple[list[str], list[str]]:
    """The names optimum, onnxruntime-genai and transformers.js share, in the graph's order. The
    `--attention gqa` graph has no position_ids (GroupQueryAttention derives positions from the mask)."""
    inputs = ["input_ids", "attention_mask"] + (["position_ids"] if position_ids else [])
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def model_filename(dtype: str, quantize: str | None) -> str:
    """transformers.js' names: model.onnx, model_fp16.onnx, model_q4.onnx, model_q4f16.onnx."""
    if quantize == "int4":
        return "model_q4.onnx" if dtype == "float32" else "model_q4f16.onnx"
    return "model.onnx" if dtype == "float32" else "model_fp16.onnx"


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
        raise QwenError(f"unknown attention form {attention!r} for the ONNX export (choose from {', '.join(ATTENTIONS)})")
    return attention


__all__ = ["DTYPES", "QUANTIZATIONS", "ATTENTIONS", "check_attention", "MOE_GRAPHS", "DEFAULT_MOE_GRAPH", "DEFAULT_OPSET", "MIN_OPSET", "io_names", "model_filename", "normalize_options"]
