"""All backends on the real Qwen2.5-Coder-0.5B-Instruct checkpoint: float32 parity with HF transformers
(logits and greedy text) and the quality of every reduced precision. The measuring code is
benchmarks/quality/parity.py, shared with benchmarks/quality/quality.py (which prints the same figures as tables).

Budget (2 cores): the float32 ONNX export of the real model dominates; every backend is loaded alone and
freed before the next, so the peak stays near one float32 copy of the model plus its export.
"""

from __future__ import annotations

import pytest

from benchmarks.quality import parity

pytestmark = pytest.mark.real

# max |logit diff| over the prefill + 8 cached steps, per pair of float32 runs: 3x the measured value
# (2 cores, x86_64, OpenBLAS, Python 3.11, torch 2.13, mlx 0.32.4, onnxruntime CPU). Every pair differs only
# by summation order; a real bug (a wrong RoPE position, a stale cache row) moves logits by whole units.
FLOAT32_BOUNDS = {  # measured:
    ("hf", "mlx"): 6e-5,  # 2.0e-5
    ("hf", "torch"): 6e-5,  # 1.8e-5
    ("hf", "onnx"): 6.5e-5,  # 2.1e-5
    ("mlx", "torch"): 6.5e-5,  # 2.2e-5
    ("mlx", "onnx"): 7.5e-5,  # 2.4e-5
    ("torch", "onnx"): 6e-5,  # 2.0e-5
}

# Teacher-forced over the first 1024 tokens of colorsys.py against MLX float32 (benchmarks/quality/quality.py):
# name -> (max perplexity ratio, min top-1 agreement, max |logit diff|). Margins over the measured value:
# 3x the perplexity loss (at least +0.001), 2x the disagreement (top-1 over 1023 positions moves only by
# near-ties), 3x the logit diff. Loose enough for another CPU's summation order, tight enough that a
# broken quantizer (wrong groups, scales, dtype) fails by far.
QUALITY_BOUNDS = {  # measured: ppl ratio, top-1, max diff
    "onnx float32": (1.0001, 0.997, 2e-4),  # x1.0000, 100%, 5.9e-5 (a near-tie may flip elsewhere)
    "mlx bfloat16": (1.007, 0.962, 2.2),  # x1.0023, 98.14%, 0.735
    "mlx 8-bit": (1.003, 0.98, 1.1),  # x0.9996, 99.12%, 0.358
    "mlx 4-bit": (1.19, 0.72, 25.0),  # x1.0636, 86.02%, 8.06
    "onnx float16": (1.003, 0.996, 0.18),  # x1.0002, 99.80%, 0.058
    "onnx int4": (1.19, 0.70, 21.0),  # x1.0617, 85.14%, 6.9
}
# Every precision runs over the whole text, MLX bfloat16 included, though it has no fast CPU matmul
# (~4 positions/s, ~4.5 min of CI): the issue asks for at least 1000 tokens, and a shorter text would
# hide drift that builds up with position.
# MLX quantized kernels vs their dequantized weights on float32 BLAS (the path the quality runs on), over
# 16 positions: 3x the measured (8-bit 3.6e-5, 4-bit 6.6e-5: summation order only).
MAX_KERNEL_GAP = 2e-4
# The float32 perplexity of the text itself (measured 3.670): a sanity bound on the reference (a wrong text
# or tokenizer lands far above; the float32 parity tests check the model itself).
MAX_REFERENCE_PERPLEXITY = 4.5


# ---- ONNX exports: each traced once per session, on first use ------------------------------------------

@pytest.fixture(scope="session")
def onnx_export_dir(real_model_dir, tmp_path_factory):
    """onnx_export_dir(dtype, quantize) -> an export folder of the real model (made once per session, and
    removed at its end: pytest keeps the temporary folders of the last runs, ~4.5 GB of exports each)."""
    import shutil

    made: dict = {}

    def get(dtype: str, quantize: str | None = None):
        key = (dtype, quantize)
        if key not in made:
            out = tmp_path_factory.mktemp(f"onnx-{dtype}-{quantize or 'plain'}") / "export"
            if key == ("float32", "int4"):  # quantize the float32 export's graph: no second trace
                made[key], seconds = parity.int4_from_float32_export(get("float32"), out)
            else:
                made[key], seconds = parity.export_variant(real_model_dir, out, dtype, quantize)
            print(f"\nONNX export of the real model ({dtype}, {quantize or 'no quantization'}): {seconds:.0f}s")
        return made[key]

    yield get
    for folder in made.values():
        shutil.rmtree(folder, ignore_errors=True)


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


@pytest.mark.slow  # ~6 minutes; the float32 parity above stays in the default tier
@pytest.mark.parametrize("name", list(QUALITY_BOUNDS))
def test_reduced_precision_quality(name, real_model_dir, onnx_export_dir, text_ids, reference_quality):
    backend, dtype, quantize = parity.VARIANTS[name]
    onnx_dirs = {name: onnx_export_dir(dtype, quantize)} if backend == "onnx" else {}
    q = parity.measure_variant(name, real_model_dir, onnx_dirs, text_ids, reference_quality)
    ratio = q.perplexity_ratio(reference_quality)
    print(f"\n{name} over {len(text_ids)} tokens: perplexity {q.perplexity:.3f} (x{ratio:.4f} float32), top-1 "
          f"agreement {q.top1_agreement:.1%}, max |logit diff| {q.max_abs_diff:.3g}, kernel gap {q.kernel_gap}, "
          f"{q.seconds:.0f}s")
    if q.kernel_gap is not None:
        assert q.kernel_gap <= MAX_KERNEL_GAP, f"quantized kernels vs dequantized weights: {q.kernel_gap:.3g}"
    max_ratio, min_top1, max_diff = QUALITY_BOUNDS[name]
    assert ratio <= max_ratio, f"perplexity x{ratio:.4f} of float32 (allowed x{max_ratio})"
    assert q.top1_agreement >= min_top1, f"top-1 agreement {q.top1_agreement:.1%} (required {min_top1:.0%})"
    assert q.max_abs_diff <= max_diff, f"max |logit diff| {q.max_abs_diff:.3g} (allowed {max_diff})"


# ---- batching on ONNX (export/backends/onnx_batch.py) ----------------------------------------------------------

def onnx_batch_matches_alone(folder, n_tokens: int = 16) -> tuple[list[list[int]], list[list[int]]]:
    """Eight chats of different lengths, greedy, through the batched engine and each alone (the serial
    ONNX path): (batched, alone) token lists."""
    from qwen_mlx.backends import load
    from qwen_mlx.engine import Engine, Request, Token, run_requests
    from qwen_mlx.backends.batching import batch_backend
    from qwen_mlx.backends.base import Session, greedy_tokens
    from qwen_mlx.sampling import SamplingParams

    loaded = load("onnx", str(folder), "float32")
    tok = loaded.tokenizer
    tok.eos_token_ids = frozenset()  # fixed-length runs: greedy_tokens has no EOS rule either
    ps = [tok.encode_chat([{"role": "user", "content": "Tell me about bridges. " * (i + 1)}]) for i in range(8)]
    alone = [greedy_tokens(Session(loaded.backend), p, n_tokens) for p in ps]
    engine = Engine(batch_backend(loaded.backend, 8), tok).start()
    try:
        events = run_requests(engine, [Request(p, SamplingParams(temperature=0), n_tokens) for p in ps])
    finally:
        engine.shutdown(0)
    return [[e.id for e in ev if isinstance(e, Token)] for ev in events], alone


def test_onnx_batch_of_8_gives_each_chat_its_greedy_tokens_alone(onnx_export_dir):
    batched, alone = onnx_batch_matches_alone(onnx_export_dir("float32"))
    assert batched == alone
