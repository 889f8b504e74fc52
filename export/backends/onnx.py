"""An exported ONNX folder as a backend of the shared generation loop, on onnxruntime.

The graph takes the cache as inputs and returns it grown by the new tokens. On the CPU the presents are
numpy arrays fed back as they are. On CUDA everything stays on the GPU (one IO binding, reused every step):
the presents are bound back as the next step's past, the mask and positions are windows of two buffers
made once on the device, and the logits are left there too, so only the token ids go up and only the last
row of logits comes down (export/backends/cuda.py copies it; a prefill's full [L, vocab] never crosses the bus).
The hybrid family's graph (Qwen3-Next, Qwen3.5) takes a conv window and a recurrent state per linear layer beside
the attention layers' keys and values: a HybridPast (export/backends/past.py) holds them, marked at the end of each
prompt chunk; it runs as on the CPU (plain runs, presents fed back) whatever the provider, and batches on the CPU
(export/backends/onnx_hybrid_batch.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from qwen_mlx.config import ModelArgs
from qwen_mlx.errors import QwenError
from qwen_mlx.backends.base import process_peak_rss_gb

from ..onnx_format import DTYPES, VARIANT_FILES, io_names, model_filename, normalize_options, parse_variants
from .past import HybridPast

# The file picked when the caller names none: the most accurate first (the order of their quality on the real
# checkpoint, docs/BENCHMARKS.md), so a folder of the whole set runs its float32 reference.
PREFERENCE = ("fp32", "fp16", "q4", "q4f16", "uint8", "q8", "int8")
NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def find_model(folder: Path, dtype: str | None = None, quantize: str | None = None,
               variant: str | None = None) -> Path:
    """The .onnx file of `folder` (its onnx/ subfolder, or the folder itself): the one `variant` names
    (transformers.js' dtype: fp32, fp16, q8, int8, uint8, q4, q4f16), else the one dtype/quantize name, else
    the first of PREFERENCE there."""
    if not folder.is_dir():
        raise QwenError(f"{folder}: no such folder")
    found = {p.name: p for d in (folder / "onnx", folder) if d.is_dir() for p in sorted(d.glob("*.onnx"))}
    if not found:
        raise QwenError(f"{folder}: no ONNX model (expected onnx/model.onnx; create one with `export`)")
    if variant is not None:
        if dtype is not None or quantize is not None:
            raise QwenError("name the ONNX file either by its dtype (--onnx-dtype fp32|q8|q4|...) or by "
                            "--dtype/--quantize, not both")
        if "," in variant or variant.strip().lower() == "all":
            raise QwenError(f"name one ONNX dtype to run, not {variant!r}")
        variant = parse_variants(variant)[0]
        name, what = VARIANT_FILES[variant], f"dtype {variant}"
    elif dtype is None and quantize is None:
        for name in (VARIANT_FILES[v] for v in PREFERENCE):
            if name in found:
                return found[name]
        return next(iter(found.values()))
    else:
        dtype, quantize, _ = normalize_options(dtype, quantize, None)
        name, what = model_filename(dtype, quantize), f"dtype {dtype}" + (f", {quantize}" if quantize else "")
    if name not in found:
        raise QwenError(f"{folder}: no {name} for {what} (found {', '.join(sorted(found))})")
    return found[name]


def cuda_usable() -> bool:
    """onnxruntime-gpu lists CUDAExecutionProvider even on machines without a GPU: also ask the driver."""
    import onnxruntime as ort

    from .cuda import device_count

    return "CUDAExecutionProvider" in ort.get_available_providers() and device_count() > 0


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def cpu_oversubscribed(cores: int) -> bool:
    """Whether other processes already keep every core busy (1-minute load average >= cores).

    onnxruntime's intra-op workers spin between kernels by default. On a machine with a free core that
    wins; when every core is taken they burn time slices the busy neighbours need (both measured on int4
    decode on 2 cores, interleaved). Threads stay one per physical core either way: 2 threads beat 1 in both
    cases."""
    try:
        return os.getloadavg()[0] >= cores
    except (OSError, AttributeError):  # no load average (Windows)
        return False


class OnnxBackend:
    """`threads`: onnxruntime intra-op threads (default: physical cores); `spinning`: let them spin while
    waiting for work (default: yes unless the CPU is already oversubscribed, see cpu_oversubscribed)."""

    name = "onnx"

    def __init__(self, folder: Path, dtype: str | None = None, quantize: str | None = None,
                 provider: str | None = None, threads: int | None = None, spinning: bool | None = None,
                 variant: str | None = None):
        import onnxruntime as ort

        folder = Path(folder)
        self.path = find_model(folder, dtype, quantize, variant)
        self.variant = next((v for v, name in VARIANT_FILES.items() if name == self.path.name), None)
        self.args = ModelArgs.from_folder(folder if (folder / "config.json").is_file() else self.path.parent.parent)
        if provider is None:
            provider = "CUDAExecutionProvider" if cuda_usable() else "CPUExecutionProvider"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        cores = physical_cores()
        options.intra_op_num_threads = threads or cores
        if spinning is None:
            spinning = not cpu_oversubscribed(cores)
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.log_severity_level = 3  # errors only: the CPU fallback notes are expected, not news
        providers = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise QwenError(f"{self.path}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from None
        self.provider = self.session.get_providers()[0]
        self.linear = self.args.linear_layers  # the hybrid family's Gated DeltaNet layers (none in the others)
        self.on_cuda = self.provider == "CUDAExecutionProvider" and not self.linear
        types = {i.name: i.type for i in self.session.get_inputs()}
        # The `--attention gqa` graph (GroupQueryAttention) takes no position_ids: it derives them from the
        # mask, assuming every row's tokens start its cache (one sequence here, so always true).
        self.fused_attention = "position_ids" not in types
        self.inputs, self.outputs = io_names(self.args.num_hidden_layers, position_ids=not self.fused_attention,
                                             linear=self.linear)
        self.past_names = self.inputs[-2 * self.args.num_hidden_layers:]
        missing = [n for n in self.inputs if n not in types]
        if missing:
            raise QwenError(f"{self.path}: not a qwen-mlx style decoder graph (inputs missing: {missing[:3]})")
        attention = next(i for i in range(self.args.num_hidden_layers) if i not in self.linear)
        self.kv_dtype = NP_TYPES[types[f"past_key_values.{attention}.key"]]
        self.past_types = [NP_TYPES[types[n]] for n in self.past_names]
        self.hybrid: HybridPast | None = None
        self.logits_dtype = NP_TYPES[{o.name: o.type for o in self.session.get_outputs()}["logits"]]
        precision = np.dtype(self.kv_dtype).name
        weights = {"q4": ", int4", "q4f16": ", int4", "q8": ", 8-bit", "int8": ", int8", "uint8": ", uint8"}
        self.device = f"onnxruntime {self.provider}, {precision}{weights.get(self.variant, '')}"
        self.past: list = []
        if self.on_cuda:
            self._init_cuda()
        self.trim(0)

    def _empty(self) -> np.ndarray:
        a = self.args
        return np.zeros((1, a.num_key_value_heads, 0, a.head_dim), self.kv_dtype)

    def _empty_hybrid(self) -> list[np.ndarray]:
        """Per linear layer a zero conv window 1 C K-1 and state 1 Hv Dk Dv (in the graph's input types), per
        attention layer empty keys and values."""
        a = self.args
        C = 2 * a.linear_num_key_heads * a.linear_key_head_dim + a.linear_num_value_heads * a.linear_value_head_dim
        shapes = {"conv": (1, C, a.linear_conv_kernel_dim - 1),
                  "recurrent": (1, a.linear_num_value_heads, a.linear_key_head_dim, a.linear_value_head_dim)}
        empty = []
        for name, dtype in zip(self.past_names, self.past_types):
            kind = name.split(".")[0].removeprefix("past_")  # conv, recurrent or key_values
            empty.append(np.zeros(shapes.get(kind, (1, a.num_key_value_heads, 0, a.head_dim)), dtype))
        return empty

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        if self.on_cuda:
            return self._forward_cuda(tokens)
        P, L = self.cache_length, len(tokens)
        feed = {"input_ids": np.array([list(tokens)], np.int64),
                "attention_mask": np.ones((1, P + L), np.int64)}
        if not self.fused_attention:
            feed["position_ids"] = np.arange(P, P + L, dtype=np.int64)[None]
        # Plain run on the CPU: the numpy presents are fed back as they are (no copy). IO binding with
        # OrtValues measured slower here (int4 decode, interleaved): the per-step binding calls cost more
        # than the conversions they save.
        feed.update(zip(self.past_names, self.past))
        logits, *self.past = self.session.run(self.outputs, feed)
        self._length = P + L
        if self.hybrid is not None:  # the end of a prompt chunk: where a recurrent state can be brought back to
            self.hybrid.update(list(zip(self.past[0::2], self.past[1::2])), L, mark=L > 1)
        return logits[0, -1].astype(np.float32)

    # ---- CUDA: one IO binding, buffers on the device ------------------------------------------------------

    def _init_cuda(self) -> None:
        import onnxruntime as ort

        from .cuda import CudaDevice

        self.cuda = CudaDevice(0)  # onnxruntime's CUDA provider runs on device 0 unless told otherwise
        self.binding = self.session.io_binding()
        # Every step's mask is ones[:P + L] and its positions arange[P:P + L]: bound as views of these two.
        window = self.args.context_length
        self._ones = ort.OrtValue.ortvalue_from_numpy(np.ones(window, np.int64), "cuda", 0)
        self._positions = ort.OrtValue.ortvalue_from_numpy(np.arange(window, dtype=np.int64), "cuda", 0)
        self._window = window
        self._row = np.empty(self.args.vocab_size, self.logits_dtype)  # the one row of logits that comes down
        self._peak_bytes = self.cuda.used_bytes()

    def _forward_cuda(self, tokens: Sequence[int]) -> np.ndarray:
        P, L = self._length, len(tokens)
        b = self.binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()  # every output is allocated afresh: the last ones are this step's past
        ids = np.array([list(tokens)], np.int64)  # alive until the run: onnxruntime copies it up from here
        b.bind_cpu_input("input_ids", ids)
        if P + L <= self._window:
            b.bind_input("attention_mask", "cuda", 0, np.int64, [1, P + L], self._ones.data_ptr())
            if not self.fused_attention:
                b.bind_input("position_ids", "cuda", 0, np.int64, [1, L], self._positions.data_ptr() + 8 * P)
        else:  # past the context the buffers were sized for (the loop refuses that before it gets here)
            mask, positions = np.ones((1, P + L), np.int64), np.arange(P, P + L, dtype=np.int64)[None]
            b.bind_cpu_input("attention_mask", mask)
            if not self.fused_attention:
                b.bind_cpu_input("position_ids", positions)
        for name, value in zip(self.past_names, self.past):
            if isinstance(value, np.ndarray):  # the empty cache of a first step
                b.bind_cpu_input(name, value)
            else:
                b.bind_ortvalue_input(name, value)
        for name in self.outputs:
            b.bind_output(name, "cuda")
        self.session.run_with_iobinding(b)  # returns when the device is done (providers synchronized)
        logits, *self.past = b.get_outputs()
        self._length = P + L
        vocab = logits.shape()[-1]
        self.cuda.current()
        self.cuda.to_host(self._row, logits.data_ptr() + (L - 1) * vocab * self._row.itemsize)
        self._peak_bytes = max(self._peak_bytes, self.cuda.used_bytes())
        return self._row.astype(np.float32)  # a new array: the caller may keep it

    def _trim_cuda(self, length: int) -> None:
        """Keep the first `length` positions of every [1, heads, T, head_dim] present, copied on the device:
        per head, one contiguous prefix of T * head_dim."""
        import onnxruntime as ort

        self.cuda.current()
        trimmed = []
        for value in self.past:
            _, heads, T, D = value.shape()
            size = np.dtype(self.kv_dtype).itemsize * D
            out = ort.OrtValue.ortvalue_from_shape_and_type([1, heads, length, D], self.kv_dtype, "cuda", 0)
            for h in range(heads):
                self.cuda.copy(out.data_ptr() + h * length * size, value.data_ptr() + h * T * size, length * size)
            trimmed.append(out)
        self.cuda.synchronize()  # before onnxruntime's stream reads them
        self.past = trimmed

    # ---- the cache -------------------------------------------------------------------------------------

    @property
    def cache_length(self) -> int:
        return self._length

    def trim(self, length: int) -> None:
        if self.linear:
            if self.hybrid is None:
                empty = self._empty_hybrid()
                self.hybrid = HybridPast(list(zip(empty[0::2], empty[1::2])),
                                         [i in self.linear for i in range(self.args.num_hidden_layers)])
            self.hybrid.trim(max(length, 0))
            self.past = [a for pair in self.hybrid.layers for a in pair]
            self._length = self.hybrid.length
            return
        if not self.past or length <= 0:
            self.past, self._length = [self._empty() for _ in self.past_names], 0
            return
        if length >= self._length:
            return
        if self.on_cuda:
            self._trim_cuda(length)
        else:
            self.past = [np.ascontiguousarray(v[:, :, :length]) for v in self.past]
        self._length = length

    def batched(self, max_batch: int):
        """This graph as a continuous-batching backend (export.backends.onnx_batch), or None for the serial path:
        on CUDA, where the one sequence's cache stays on the device (IO binding), and where batching
        would change the math (dynamic NTK RoPE rescales by the longest position in the batch; the
        `--attention gqa` graph reads each row's positions and valid keys from the start of its cache, which
        the batch's left padding breaks: export/gqa.py). The hybrid family's: export/backends/onnx_hybrid_batch.py."""
        if self.on_cuda or self.args.rope_type == "dynamic" or self.fused_attention:
            return None
        if self.linear:
            from .onnx_hybrid_batch import OnnxHybridBatch
            return OnnxHybridBatch(self.session, self.args, self.device, self.past_names, self.outputs, self.kv_dtype,
                                   max_batch, self.peak_memory_gb, self._empty_hybrid())
        from .onnx_batch import OnnxBatch
        return OnnxBatch(self.session, self.args, self.device, self.past_names, self.outputs, self.kv_dtype,
                         max_batch, self.peak_memory_gb)

    def peak_memory_gb(self) -> float:
        """CPU: the process's peak RSS. CUDA: the most device memory in use seen after a step (the whole
        device, CUDA context and onnxruntime's arena included; the GPU's own count, not the process's)."""
        if self.on_cuda:
            return self._peak_bytes / 1e9
        return process_peak_rss_gb()


__all__ = ["OnnxBackend", "find_model", "cuda_usable", "cpu_oversubscribed", "DTYPES"]
