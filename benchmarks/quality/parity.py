"""The measuring code behind benchmarks/quality/quality.py and tests/test_real_parity.py (written once, used by both).

Two measurements on one checkpoint:
- float32 parity: the logits of a prefill and of cached decode steps, and greedy continuations, from MLX,
  the PyTorch twin, the ONNX float32 export and HF transformers (the independent reference);
- quality of the reduced precisions (MLX bfloat16 / 8-bit / 4-bit, ONNX float16 / int4): perplexity and
  top-1 agreement with MLX float32, teacher-forced over a fixed text in one chunked prefill.

Every backend is loaded alone and freed before the next one (the float32 0.5B model is 2.5 GB a copy).
"""

from __future__ import annotations

import colorsys
import gc
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

import export  # noqa: F401  (registers the torch and onnx backends)
import qwen_mlx  # noqa: F401  (loads OpenBLAS before anything imports mlx)
from qwen_mlx.backends import LoadedModel, load
from qwen_mlx.backends.base import Session, greedy_tokens
from benchmarks.quality.reference import backend_logits, load_reference, reference_greedy, reference_logits

# ---- float32 parity ------------------------------------------------------------------------------------

LOGIT_PROMPT = "Write a haiku about rivers."  # ~30 tokens with Qwen's default system prompt
N_STEPS = 8  # cached decode steps after the prefill, fed HF's own greedy tokens
N_GREEDY = 32
CHATS = {
    "chat english": "Explain in two sentences why the sky is blue.",
    "chat chinese": "请用三句话介绍一下长城。",
}
RAW_CODE = "import numpy as np\n\n\ndef softmax(x: np.ndarray) -> np.ndarray:\n"
FLOAT32_BACKENDS = ("hf", "mlx", "torch", "onnx")


def parity_prompts(tokenizer) -> dict[str, list[int]]:
    """The greedy prompts: two chats through the chat template, one raw code completion."""
    out = {name: tokenizer.encode_chat([{"role": "user", "content": text}]) for name, text in CHATS.items()}
    out["code raw"] = tokenizer.encode(RAW_CODE)
    return out


def logit_prompt(tokenizer) -> list[int]:
    return tokenizer.encode_chat([{"role": "user", "content": LOGIT_PROMPT}])


@dataclass
class Float32Run:
    name: str
    logits: np.ndarray  # [1 + N_STEPS, V]: after the prompt, then after each cached step
    greedy: dict[str, list[int]]  # prompt name -> N_GREEDY token ids
    seconds: float = 0.0


def run_reference(folder: Path, tokenizer, n_greedy: int = N_GREEDY) -> tuple[Float32Run, list[int]]:
    """HF transformers float32: its run, and the decode steps every other backend is fed (HF's greedy
    continuation of the logit prompt, so all backends see the same tokens)."""
    t = time.perf_counter()
    model = load_reference(folder)
    prompt = logit_prompt(tokenizer)
    steps = reference_greedy(model, prompt, N_STEPS)
    logits = reference_logits(model, prompt, steps)
    greedy = {name: reference_greedy(model, ids, n_greedy) for name, ids in parity_prompts(tokenizer).items()}
    del model
    free_memory()
    return Float32Run("hf", logits, greedy, time.perf_counter() - t), steps


def run_backend(loaded: LoadedModel, name: str, steps: Sequence[int], n_greedy: int = N_GREEDY) -> Float32Run:
    """One of our backends through the shared Session: the same logit rows and greedy continuations."""
    t = time.perf_counter()
    tok = loaded.tokenizer
    logits = backend_logits(Session(loaded.backend), logit_prompt(tok), steps)
    greedy = {p: greedy_tokens(Session(loaded.backend), ids, n_greedy) for p, ids in parity_prompts(tok).items()}
    return Float32Run(name, logits, greedy, time.perf_counter() - t)


def pairwise_max_diff(runs: Sequence[Float32Run]) -> dict[tuple[str, str], float]:
    """max |logit a - logit b| over the prefill row and every step row, for each pair of runs."""
    return {(a.name, b.name): float(np.abs(a.logits - b.logits).max())
            for i, a in enumerate(runs) for b in runs[i + 1:]}


def greedy_agreement(runs: Sequence[Float32Run]) -> dict[str, bool]:
    """prompt name -> whether every run produced the same greedy tokens."""
    return {p: all(r.greedy[p] == runs[0].greedy[p] for r in runs) for p in runs[0].greedy}


# ---- reduced precision, teacher-forced -----------------------------------------------------------------

TEXT_TOKENS = 1024
CHUNK = 256  # positions per forward: bounds the [CHUNK, V] float32 logits (155 MB) and the activations
# name -> (backend, dtype, quantize); the ONNX ones name an export folder, made by `export_variant`.
VARIANTS: dict[str, tuple[str, str, str | None]] = {
    "mlx float32": ("mlx", "float32", None),  # the reference of the others
    "mlx bfloat16": ("mlx", "bfloat16", None),
    "mlx 8-bit": ("mlx", "float32", "8"),
    "mlx 4-bit": ("mlx", "float32", "4"),
    "onnx float32": ("onnx", "float32", None),  # checks the per-position ONNX path itself
    "onnx float16": ("onnx", "float16", None),
    "onnx int4": ("onnx", "float32", "int4"),
}
REFERENCE = "mlx float32"


def quality_text() -> str:
    """A fixed text of a few thousand tokens that ships with every Python: the stdlib colorsys.py.
    It has hardly changed for a decade; the one edit within the first 1024 tokens is the gh-106498 fix
    (in 3.12+ and recent 3.10/3.11 patch releases), which changes the last ~40 tokens. `text_digest`
    names the exact text so that figures from different Pythons are not compared blindly."""
    return Path(colorsys.__file__).read_text(encoding="utf-8")


def text_ids(tokenizer, n: int = TEXT_TOKENS) -> list[int]:
    ids = tokenizer.encode(quality_text())[:n]
    assert len(ids) == n, f"colorsys.py gives only {len(ids)} tokens"
    return ids


def text_digest(ids: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest()[:12]


def mlx_position_logits(loaded: LoadedModel, ids: Sequence[int], chunk: int = CHUNK) -> Iterator[np.ndarray]:
    """float32 logits at every position [c, V], chunk by chunk through the KV cache (the Backend protocol
    returns only the last position, so this calls the model itself)."""
    import mlx.core as mx

    model = loaded.backend.model
    cache = model.make_cache()
    for s in range(0, len(ids), chunk):
        out = model(mx.array([list(ids[s:s + chunk])], dtype=mx.int32), cache, last_only=False)
        yield np.array(out[0].astype(mx.float32))
        del out


def onnx_position_logits(loaded: LoadedModel, ids: Sequence[int], chunk: int = CHUNK) -> Iterator[np.ndarray]:
    """The same from an ONNX session: its graph returns every position's logits; the feeds are built as
    OnnxBackend.forward builds them (CPU path: numpy pasts fed back)."""
    b = loaded.backend
    b.trim(0)  # empties its cache: b.past is now the zero-length pasts of the first step
    past = list(b.past)
    for s in range(0, len(ids), chunk):
        part = list(ids[s:s + chunk])
        P, L = s, len(part)
        feed = {"input_ids": np.array([part], np.int64), "attention_mask": np.ones((1, P + L), np.int64),
                "position_ids": np.arange(P, P + L, dtype=np.int64)[None], **dict(zip(b.inputs[3:], past))}
        logits, *past = b.session.run(b.outputs, feed)
        yield logits[0].astype(np.float32)
        del logits


def dequantize_mlx(loaded: LoadedModel) -> None:
    """Swap every quantized layer of the MLX model for a float32 one holding exactly its dequantized weights.

    MLX's quantized matmul has no fast CPU path for many positions (~2 positions/s here, so 1024 would take
    ~8 min); with float32 scales it dequantizes and accumulates in float32, so the same weights on float32
    BLAS give the same logits up to summation order. `kernel_gap` checks that on a short window."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    swaps = []
    for name, m in loaded.backend.model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = mx.dequantize(m.weight, m.scales, m.get("biases"), m.group_size, m.bits)
            if isinstance(m, nn.QuantizedEmbedding):
                new = nn.Embedding(*w.shape)
            else:
                new = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
                if "bias" in m:
                    new.bias = m.bias
            new.weight = w
            swaps.append((name, new))
    loaded.backend.model.update_modules(tree_unflatten(swaps))
    mx.eval(loaded.backend.model.parameters())


def kernel_gap(loaded: LoadedModel, ids: Sequence[int]) -> float:
    """max |logit diff| over `ids` between the quantized kernels and `dequantize_mlx`'s float32 weights
    (mutates `loaded` into the dequantized model)."""
    real = next(mlx_position_logits(loaded, ids, len(ids)))
    dequantize_mlx(loaded)
    return float(np.abs(real - next(mlx_position_logits(loaded, ids, len(ids)))).max())


POSITION_LOGITS: dict[str, Callable[..., Iterator[np.ndarray]]] = {"mlx": mlx_position_logits,
                                                                    "onnx": onnx_position_logits}


KERNEL_CHECK_TOKENS = 16  # the window on which quantized kernels are compared with their dequantized weights


@dataclass
class Quality:
    name: str
    nll: np.ndarray  # [n - 1] negative log-likelihood of ids[i + 1] at position i
    argmax: np.ndarray  # [n - 1] predicted ids
    top1_agreement: float  # share of positions whose argmax equals the reference's (1.0 for the reference)
    max_abs_diff: float  # max |logit - reference logit| over all positions and the whole vocabulary
    seconds: float = 0.0
    kernel_gap: float | None = None  # MLX quantized: max |logit diff| of the real kernels vs dequantized
    logits: np.ndarray | None = field(default=None, repr=False)  # [n, V] float32, kept for the reference only

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll.mean()))

    def perplexity_ratio(self, reference: Quality) -> float:
        """Perplexity over reference's perplexity on the same positions (a variant may cover a prefix)."""
        return self.perplexity / float(np.exp(reference.nll[:len(self.nll)].mean()))


def teacher_forced(name: str, chunks: Iterator[np.ndarray], ids: Sequence[int],
                   reference: Quality | None = None, keep: bool = False) -> Quality:
    """Per-position NLL of `ids` from logit chunks, and the distance to `reference` (which may be longer:
    the comparison covers the positions of `ids`). Position i predicts ids[i + 1]; the last predicts nothing."""
    t = time.perf_counter()
    target = np.asarray(ids[1:], np.int64)
    nll, argmax, max_diff, kept, pos = [], [], 0.0, [], 0
    for logits in chunks:
        rows = logits[: max(0, min(len(logits), len(target) - pos))]
        if len(rows):
            m = rows.max(axis=1, keepdims=True)
            lse = m[:, 0] + np.log(np.exp(rows - m).sum(axis=1))  # log-softmax normaliser, chunk by chunk
            nll.append(lse - rows[np.arange(len(rows)), target[pos:pos + len(rows)]])
            argmax.append(rows.argmax(axis=1))
        if reference is not None:
            max_diff = max(max_diff, float(np.abs(logits - reference.logits[pos:pos + len(logits)]).max()))
        if keep:
            kept.append(logits)
        pos += len(logits)
    argmax = np.concatenate(argmax)
    agree = 1.0 if reference is None else float(np.mean(argmax == reference.argmax[:len(argmax)]))
    return Quality(name, np.concatenate(nll).astype(np.float64), argmax, agree, max_diff,
                   time.perf_counter() - t, logits=np.concatenate(kept) if keep else None)


def measure_variant(name: str, model_dir: Path, onnx_dirs: dict[str, Path], ids: Sequence[int],
                    reference: Quality | None = None) -> Quality:
    """Load one variant, teacher-force `ids` through it, free it. The reference keeps its logits.
    MLX quantized variants run on their dequantized weights, after `kernel_gap` checked that is faithful."""
    backend, dtype, quantize = VARIANTS[name]
    folder = onnx_dirs[name] if backend == "onnx" else model_dir
    t = time.perf_counter()
    loaded = load(backend, str(folder), dtype, quantize)
    try:
        gap = kernel_gap(loaded, ids[:KERNEL_CHECK_TOKENS]) if backend == "mlx" and quantize else None
        q = teacher_forced(name, POSITION_LOGITS[backend](loaded, ids), ids, reference, keep=reference is None)
    finally:
        del loaded
        free_memory()
    q.kernel_gap, q.seconds = gap, time.perf_counter() - t
    return q


def export_variant(model_dir: Path, out_dir: Path, dtype: str, quantize: str | None = None) -> tuple[Path, float]:
    """Export the checkpoint to `out_dir` (no built-in validation: the callers compare it themselves);
    returns the folder and the seconds it took."""
    from export.onnx_export import export_onnx
    from qwen_mlx.checkpoint import prepare_model

    t = time.perf_counter()
    export_onnx(prepare_model(str(model_dir)), out_dir, dtype, quantize, force=True, validate=False)
    free_memory()
    return out_dir, time.perf_counter() - t


def int4_from_float32_export(fp32_dir: Path, out_dir: Path) -> tuple[Path, float]:
    """The int4 variant without tracing the model again (~100 s saved on 2 cores): export_onnx's own int4
    step (`quantize_int4`, what it applies to the freshly traced float32 graph) on the saved float32 graph.
    The side files are the float32 export's (OnnxBackend reads only config.json and the tokenizer)."""
    import shutil

    import onnx

    from export.onnx_format import model_filename
    from export.quantize import quantize_int4

    t = time.perf_counter()
    proto = quantize_int4(onnx.load(str(Path(fp32_dir) / "onnx" / model_filename("float32", None))))
    shutil.copytree(fp32_dir, out_dir, ignore=shutil.ignore_patterns("*.onnx", "*.onnx_data"))
    onnx.save_model(proto, str(Path(out_dir) / "onnx" / model_filename("float32", "int4")))  # < 1 GB: one file
    del proto
    free_memory()
    return Path(out_dir), time.perf_counter() - t


def free_memory() -> None:
    """Give the big buffers back now: Python's cycles, then MLX's buffer cache."""
    gc.collect()
    try:
        import mlx.core as mx

        mx.clear_cache()
    except (ImportError, AttributeError):
        pass
