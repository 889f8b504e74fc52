"""All backends on the real Qwen2.5-Coder-0.5B-Instruct checkpoint: float32 parity with HF transformers
(logits and greedy text) and the quality of every reduced precision. The measuring code is tests/parity.py,
shared with benchmarks/quality.py (which prints the same figures as tables).

Budget (2 cores): the float32 ONNX export of the real model dominates; every backend is loaded alone and
freed before the next, so the peak stays near one float32 copy of the model plus its export.
"""

from __future__ import annotations

import pytest

from tests import parity

pytestmark = pytest.mark.real

# max |logit diff| over the prefill + 8 cached steps, per pair of float32 runs: 3x the measured value,
# rounded up (measured on 2 cores, x86_64, Python 3.11, torch 2.13, mlx 0.32.4, onnxruntime 1.23 CPU).
# Every pair differs only by summation order (BLAS kernels, fused attention); a real bug (a wrong RoPE
# position, a stale cache row) moves logits by whole units.
FLOAT32_BOUNDS = {  # measured:
    ("hf", "mlx"): 1e-4,
    ("hf", "torch"): 1e-4,
    ("hf", "onnx"): 1e-4,
    ("mlx", "torch"): 1e-4,
    ("mlx", "onnx"): 1e-4,
    ("torch", "onnx"): 1e-4,
}

# Teacher-forced over the first 1024 tokens of colorsys.py, against MLX float32:
# name -> (max perplexity ratio to float32, min top-1 agreement, max |logit diff|). Measured values in the
# comments; the bounds leave ~3x the measured loss (ratio - 1, 1 - agreement, diff) as margin.
QUALITY_BOUNDS = {  # measured: ppl ratio, top-1, max diff
    "onnx float32": (1.0001, 1.0, 1e-3),
    "mlx bfloat16": (1.05, 0.95, 5.0),
    "mlx 8-bit": (1.05, 0.95, 5.0),
    "mlx 4-bit": (1.3, 0.8, 20.0),
    "onnx float16": (1.05, 0.95, 5.0),
    "onnx int4": (1.3, 0.8, 20.0),
}
# The float32 perplexity of this code text itself (a sane model of Python code predicts it well; a broken
# one is in the thousands). measured:
MAX_REFERENCE_PERPLEXITY = 4.0


# ---- ONNX exports: each traced once per session, on first use ------------------------------------------

@pytest.fixture(scope="session")
def onnx_export_dir(real_model_dir, tmp_path_factory):
    """onnx_export_dir(dtype, quantize) -> an export folder of the real model (made once per session)."""
    made: dict = {}

    def get(dtype: str, quantize: str | None = None):
        key = (dtype, quantize)
        if key not in made:
            out = tmp_path_factory.mktemp(f"onnx-{dtype}-{quantize or 'plain'}")
            made[key], seconds = parity.export_variant(real_model_dir, out / "export", dtype, quantize)
            print(f"\nONNX export of the real model ({dtype}, {quantize or 'no quantization'}): {seconds:.0f}s")
        return made[key]

    return get


# ---- float32 parity -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def float32_runs(real_model_dir, onnx_export_dir) -> dict:
    """The four float32 runs, one backend in memory at a time; HF first (its greedy tokens are the steps)."""
    from qwen_mlx.backends import load
    from qwen_mlx.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(real_model_dir)
    hf, steps = parity.run_reference(real_model_dir, tokenizer)
    runs = {"hf": hf}
    for name in ("mlx", "torch", "onnx"):
        folder = onnx_export_dir("float32") if name == "onnx" else real_model_dir
        loaded = load(name, str(folder), "float32")
        runs[name] = parity.run_backend(loaded, name, steps)
        del loaded
        parity.free_memory()
    return runs


def test_float32_logits_agree_pairwise(float32_runs):
    diffs = parity.pairwise_max_diff(list(float32_runs.values()))
    print("\n" + "\n".join(f"max |logit diff| {a} vs {b}: {d:.3g}" for (a, b), d in diffs.items()))
    bad = {pair: d for pair, d in diffs.items() if d > FLOAT32_BOUNDS[pair]}
    assert not bad, f"float32 logits differ beyond the bounds: {bad}"


def test_greedy_32_tokens_identical_on_all_backends(float32_runs):
    runs = list(float32_runs.values())
    hf = float32_runs["hf"]
    for prompt, same in parity.greedy_agreement(runs).items():
        assert same, prompt + ": " + "; ".join(f"{r.name}: {r.greedy[prompt]}" for r in runs)
        assert len(hf.greedy[prompt]) == parity.N_GREEDY


# ---- reduced precision quality ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_ids(real_model_dir) -> list[int]:
    from qwen_mlx.tokenizer import Tokenizer

    return parity.text_ids(Tokenizer.from_folder(real_model_dir))


@pytest.fixture(scope="module")
def reference_quality(real_model_dir, text_ids) -> parity.Quality:
    """MLX float32 over the text; keeps its [1024, V] logits (0.6 GB) for the comparisons."""
    return parity.measure_variant(parity.REFERENCE, real_model_dir, {}, text_ids)


def test_reference_perplexity_is_sane(reference_quality):
    print(f"\nmlx float32 perplexity over colorsys.py: {reference_quality.perplexity:.3f}")
    assert reference_quality.perplexity < MAX_REFERENCE_PERPLEXITY


@pytest.mark.parametrize("name", list(QUALITY_BOUNDS))
def test_reduced_precision_quality(name, real_model_dir, onnx_export_dir, text_ids, reference_quality):
    backend, dtype, quantize = parity.VARIANTS[name]
    onnx_dirs = {name: onnx_export_dir(dtype, quantize)} if backend == "onnx" else {}
    q = parity.measure_variant(name, real_model_dir, onnx_dirs, text_ids, reference_quality)
    ratio = q.perplexity / reference_quality.perplexity
    print(f"\n{name}: perplexity {q.perplexity:.3f} (x{ratio:.4f} float32), top-1 agreement "
          f"{q.top1_agreement:.1%}, max |logit diff| {q.max_abs_diff:.3g}, {q.seconds:.0f}s")
    max_ratio, min_top1, max_diff = QUALITY_BOUNDS[name]
    assert ratio <= max_ratio, f"perplexity x{ratio:.4f} of float32 (allowed x{max_ratio})"
    assert q.top1_agreement >= min_top1, f"top-1 agreement {q.top1_agreement:.1%} (required {min_top1:.0%})"
    assert q.max_abs_diff <= max_diff, f"max |logit diff| {q.max_abs_diff:.3g} (allowed {max_diff})"
