"""Our ONNX export, loaded untouched by the edge runtimes, reproduces our ONNX backend's greedy tokens.

The peers (onnxruntime-genai, optimum-onnx, transformers.js in Node) live in their own environments under
$QWEN_MLX_PEERS (default /work/venvs), made by `bash benchmarks/peers/setup_peers.sh`. A missing one is skipped
with the reason on a developer's machine, and fails the run in CI (CI=true), where setup_peers.sh runs first.
Each runtime runs as a subprocess through benchmarks/peers/edge_runtimes.py, on tiny random Qwen2 models
exported by export.onnx_export: an untied one in float32 (onnx/model.onnx) and int4 (onnx/model_q4.onnx), and a tied
one in int4, whose embedding is read through com.microsoft GatherBlockQuantized from the lm_head's
MatMulNBits weight.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from benchmarks.peers import edge_runtimes as er  # standard library only at import time
from tests.support.needs import needs_peer

N_TOKENS = 16
# variant -> (tiny model, quantize, file)
VARIANTS = {"fp32": ("gqa2-untied", None, "model.onnx"), "q4": ("gqa2-untied", "int4", "model_q4.onnx"),
            "q4-tied": ("gqa4-tied", "int4", "model_q4.onnx")}
MODELS = sorted({model for model, _, _ in VARIANTS.values()})


# ---- the helpers themselves (no peers needed) ------------------------------------------------------------

def test_first_divergence():
    assert er.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert er.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert er.first_divergence([1, 2, 3], [1, 2]) == 2  # one stopped early (an EOS the other did not stop at)
    assert er.first_divergence([], []) is None


def test_compare_reports_the_divergence_and_errors():
    ref = er.RunResult("hf", True, tokens=[[1, 2], [3, 4]])
    assert er.compare(ref, er.RunResult("x", True, tokens=[[1, 2], [3, 4]])) == "yes"
    assert er.compare(ref, er.RunResult("x", True, tokens=[[1, 2], [3, 9]])) == \
        "no (prompt 1: first divergence at token 1: ref 4 vs 9)"
    assert er.compare(ref, er.RunResult("x", False, error="Traceback\nValueError: boom")) == "error: ValueError: boom"


def test_missing_peer_has_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN_MLX_PEERS", str(tmp_path))
    for runtime in er.PEER_RUNTIMES:
        reason = er.missing_reason(runtime)
        assert reason, runtime
        result = er.run_runtime(runtime, tmp_path, [[1, 2]], 2)
        assert not result.ok and result.error.startswith("skipped:")


def test_missing_peer_fails_in_ci(monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN_MLX_PEERS", str(tmp_path))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="missing in CI"):
        needs_peer("genai")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="setup_peers.sh"):
        needs_peer("genai")


# ---- the export, through every peer ----------------------------------------------------------------------

def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its sha256: a runtime must neither change nor add files there."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> dict[str, Path]:
    from benchmarks.checkpoints.tiny_models import write_tiny_model

    root = tmp_path_factory.mktemp("edge")
    return {name: write_tiny_model(root / name, name) for name in MODELS}


@pytest.fixture(scope="module")
def prompts(tiny_hf) -> tuple[list[str], list[list[int]]]:
    # One tokenizer for every tiny model (benchmarks/checkpoints/tiny_tokenizer.py): the same ids for all of them.
    return er.reference_prompts(tiny_hf[MODELS[0]], ["hello world", "def f(x): return x"], chat=True)


@pytest.fixture(scope="module")
def exports(tiny_hf, tmp_path_factory, prompts):
    """variant -> (export folder, our ONNX backend's greedy tokens on it: the expectation), built on first use."""
    from export.onnx_export import export_onnx
    from qwen_mlx.checkpoint import prepare_model

    texts, ids = prompts
    base = tmp_path_factory.mktemp("exports")
    cache: dict[str, tuple[Path, er.RunResult]] = {}

    def get(variant: str) -> tuple[Path, er.RunResult]:
        if variant not in cache:
            model, quantize, onnx_file = VARIANTS[variant]
            folder = base / variant
            # The exporter's own accuracy check is its tests' business (int4 on a random tiny model is far
            # from the float twin by nature); here the question is only whether the peers run what it wrote
            # as we do.
            export_onnx(prepare_model(str(tiny_hf[model])), folder, dtype="float32", quantize=quantize,
                        validate=False)
            assert (folder / "onnx" / onnx_file).is_file()
            ours = er.run_runtime("ours", folder, ids, N_TOKENS, texts=texts, onnx_file=onnx_file, quantize=quantize)
            assert ours.ok, f"our ONNX backend failed on the {variant} export:\n{ours.error}"
            cache[variant] = (folder, ours)
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("runtime", er.PEER_RUNTIMES)
def test_runtime_reproduces_our_greedy_tokens(runtime, variant, exports, prompts):
    needs_peer(runtime)
    texts, ids = prompts
    folder, ours = exports(variant)
    _, quantize, onnx_file = VARIANTS[variant]
    before = _snapshot(folder)
    result = er.run_runtime(runtime, folder, ids, N_TOKENS, texts=texts, onnx_file=onnx_file, quantize=quantize,
                            timeout=600)
    assert result.ok, f"{runtime} could not run the {variant} export {folder}:\n{result.error}"
    assert _snapshot(folder) == before, f"{runtime} changed or added files in the export folder"
    assert er.compare(ours, result) == "yes", (
        f"{runtime} on the {variant} export: {er.compare(ours, result)}\n"
        f"ours: {ours.tokens}\n{runtime}: {result.tokens}")
    assert result.prompt_ids == ids, f"{runtime}'s own tokenizer encodes the prompt differently"


# ---- the other architectures: Qwen2-MoE, Qwen3, Qwen3-MoE ---------------------------------------------

# (tiny config, variant, MoE graph). "fused" (export-onnx's default): the routed experts are onnxruntime's
# com.microsoft MoE op, QMoE in int4; "standard": Gather of stacked experts + MatMul, int4 experts
# GatherBlockQuantized (export/moe_onnx.py).
# qwen2moe-shared's int4 QMoE takes the router_weights input (no norm_topk_prob) and blocks of 16.
ARCH_CASES = [("qwen2moe-shared", "fp32", "fused"), ("qwen2moe-shared", "q4", "fused"),
              ("qwen2moe-shared", "fp32", "standard"), ("qwen3moe-norm", "fp32", "fused"),
              ("qwen3-untied", "fp32", "fused")]
# optimum-onnx 0.1's ORTModelForCausalLM sizes the empty past it feeds from hidden_size / num_attention_heads
# (ignoring an explicit head_dim) and, for model types outside its list (qwen2_moe), from num_attention_heads
# instead of num_key_value_heads: exports whose shapes differ from those are refused by onnxruntime.
OPTIMUM_CANNOT = {"qwen3-untied": "optimum-onnx 0.1 ignores Qwen3's explicit head_dim (32 here, hidden/heads 12) "
                                  "when it builds the first, empty past: its limitation, not the graph's"}


@pytest.fixture(scope="module")
def arch_exports(tmp_path_factory):
    """(name, variant) -> (export folder, prompt texts, ids, our ONNX backend's greedy tokens), on first use."""
    from export.onnx_export import export_onnx
    from qwen_mlx.checkpoint import prepare_model
    from benchmarks.checkpoints.tiny_models import write_tiny_model

    base = tmp_path_factory.mktemp("arch-edge")
    cache: dict = {}

    def get(name: str, variant: str, moe: str):
        if (name, variant, moe) not in cache:
            hf = base / name
            if not hf.exists():
                write_tiny_model(hf, name)
            texts, ids = er.reference_prompts(hf, ["hello world", "def f(x): return x"], chat=True)
            _, quantize, onnx_file = VARIANTS[variant]  # the variant's precision, on this architecture
            folder = base / f"{name}-{variant}-{moe}"
            export_onnx(prepare_model(str(hf)), folder, quantize=quantize, validate=False, moe=moe)
            ours = er.run_runtime("ours", folder, ids, N_TOKENS, texts=texts, onnx_file=onnx_file, quantize=quantize)
            assert ours.ok, f"our ONNX backend failed on {folder}:\n{ours.error}"
            cache[name, variant, moe] = folder, texts, ids, ours
        return cache[name, variant, moe]

    return get


@pytest.mark.parametrize("name,variant,moe", ARCH_CASES)
@pytest.mark.parametrize("runtime", er.PEER_RUNTIMES)
def test_runtime_runs_every_architecture(runtime, name, variant, moe, arch_exports):
    needs_peer(runtime)
    if runtime == "optimum" and name in OPTIMUM_CANNOT:
        pytest.skip(OPTIMUM_CANNOT[name])
    folder, texts, ids, ours = arch_exports(name, variant, moe)
    _, quantize, onnx_file = VARIANTS[variant]
    result = er.run_runtime(runtime, folder, ids, N_TOKENS, texts=texts, onnx_file=onnx_file, quantize=quantize,
                            timeout=600)
    assert result.ok, f"{runtime} could not run {folder}:\n{result.error}"
    assert er.compare(ours, result) == "yes", f"{runtime} on {name} {variant}: {er.compare(ours, result)}"
