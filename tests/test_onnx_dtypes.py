"""transformers.js' dtype set written by one `export-onnx --dtypes all` run (tests/conftest.py tiny_onnx_set):
the files and side files, every file within its tolerance of the twin (and a damaged one caught), the ONNX
backend's choice of file, the CLI's errors, and every file in transformers.js (Node) and the int4 ones in
onnxruntime-genai reproducing our ONNX backend's greedy tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from export.backends.onnx import OnnxBackend
from export.onnx_format import VARIANT_FILES, VARIANTS, parse_variants
from export.onnx_validate import TOLERANCE, measure_export, tolerance_key, validate_export
from qwen_mlx.checkpoint import prepare_model
from qwen_mlx.errors import QwenError
from benchmarks.peers import edge_runtimes as er  # standard library only at import time
from tests.support.cli import run
from tests.support.needs import needs_peer

N_TOKENS = 16


def _ops(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_the_whole_set_and_its_side_files(tiny_onnx_set):
    onnx_dir = tiny_onnx_set / "onnx"
    assert sorted(p.name for p in onnx_dir.iterdir()) == sorted(VARIANT_FILES.values())  # no scratch file left
    config = json.loads((tiny_onnx_set / "config.json").read_text())["transformers.js_config"]
    # fp32 (Node, WebGPU) and q8 (wasm) are there: no dtype pinned, each device loads its own default.
    assert config == {"kv_cache_dtype": {"fp16": "float16", "q4f16": "float16"}}
    genai = json.loads((tiny_onnx_set / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["filename"] == "onnx/model_q4.onnx"
    for variant in ("q8", "int8", "uint8"):
        ops = _ops(onnx_dir / VARIANT_FILES[variant])
        assert ops.get("MatMulInteger", 0) >= 8 and "MatMulNBits" not in ops, (variant, ops)
    for variant in ("q4", "q4f16"):
        assert _ops(onnx_dir / VARIANT_FILES[variant]).get("MatMulNBits", 0) >= 8
    # transformers.js' rule: q8 is int8 weights (symmetric) for a graph without Conv / GQA / MHA.
    weights = {}
    for variant in ("q8", "int8", "uint8"):
        model = onnx.load(str(onnx_dir / VARIANT_FILES[variant]))
        weights[variant] = {t.name: t for t in model.graph.initializer if t.name.endswith("weight.T_quantized")}
    assert {t.data_type for t in weights["int8"].values()} == {TensorProto.INT8}
    assert {t.data_type for t in weights["uint8"].values()} == {TensorProto.UINT8}
    assert weights["q8"].keys() == weights["int8"].keys()
    for name, tensor in weights["q8"].items():
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), numpy_helper.to_array(weights["int8"][name]))


def test_every_file_is_within_its_tolerance(tiny_onnx_set, tiny_model):
    results = measure_export(prepare_model(str(tiny_model("gqa2-untied"))), tiny_onnx_set, variants=list(VARIANTS),
                             mlx=False)
    assert set(results) == set(VARIANTS)
    for variant, result in results.items():
        max_rel, min_agree = TOLERANCE[tolerance_key(variant)]
        assert result["relative_diff"] <= max_rel and result["greedy_agreement"] >= min_agree, (variant, result)
    # 8 bits sit between float16 and int4 on this tiny model (measured: relative 0.07-0.09 against 0.45)
    assert results["fp16"]["relative_diff"] < results["q8"]["relative_diff"] < results["q4"]["relative_diff"]


def test_a_damaged_8bit_file_fails_the_check(tiny_onnx_set, tiny_model, tmp_path):
    """The embedding table's rows reversed (what a wrong tie or layout would do): the check must refuse it."""
    folder = tmp_path / "damaged"
    shutil.copytree(tiny_onnx_set, folder)
    path = folder / "onnx" / VARIANT_FILES["q8"]
    model = onnx.load(str(path))
    table = next(t for t in model.graph.initializer if t.name.startswith("model.embed_tokens") and len(t.dims) == 2)
    table.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(table)[::-1]), table.name))
    onnx.save(model, str(path))
    with pytest.raises(QwenError, match="model_quantized.onnx does not match the PyTorch twin"):
        validate_export(prepare_model(str(tiny_model("gqa2-untied"))), folder, variants=["q8"])


def test_backend_picks_the_named_file(tiny_onnx_set, tmp_path):
    assert OnnxBackend(tiny_onnx_set).path.name == "model.onnx"  # the most accurate when none is named
    for variant, name in VARIANT_FILES.items():
        backend = OnnxBackend(tiny_onnx_set, variant=variant)
        assert backend.path.name == name and backend.variant == variant
    assert OnnxBackend(tiny_onnx_set, "float16", "int4").path.name == "model_q4f16.onnx"  # the old spelling
    with pytest.raises(QwenError, match="unknown ONNX dtype 'q3'"):
        OnnxBackend(tiny_onnx_set, variant="q3")
    with pytest.raises(QwenError, match="not both"):
        OnnxBackend(tiny_onnx_set, "float32", variant="q8")
    only = tmp_path / "only-q4"
    (only / "onnx").mkdir(parents=True)
    shutil.copy(tiny_onnx_set / "onnx" / "model_q4.onnx", only / "onnx")
    shutil.copy(tiny_onnx_set / "config.json", only)
    with pytest.raises(QwenError, match=r"no model_quantized.onnx for dtype q8 \(found model_q4.onnx\)"):
        OnnxBackend(only, variant="q8")


def test_parse_variants():
    assert parse_variants("q4, fp32,q4") == ["fp32", "q4"]  # the set's order, once each
    assert parse_variants("all") == list(VARIANTS)
    for bad in ("", "q3", "fp32,bf16"):
        with pytest.raises(QwenError, match="choose from fp32, fp16, q8, int8, uint8, q4, q4f16, or all"):
            parse_variants(bad)


@pytest.mark.parametrize("args,words", [
    (["--dtypes", "q3"], "unknown ONNX dtype 'q3'"),
    (["--dtypes", "q4", "--quantize", "int4"], "--dtypes names every file"),
    (["--dtypes", "fp32", "--dtype", "float16"], "--dtypes names every file"),
])
def test_export_bad_dtypes_is_one_line(tiny_model, tmp_path, args, words):
    r = run("export-onnx", "--model", str(tiny_model("gqa2-untied")), "--out", str(tmp_path / "out"), *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_8bit_refused_for_fused_moe_before_any_work(tiny_model, tmp_path):
    from export.onnx_export import export_onnx_variants

    with pytest.raises(QwenError, match="cannot hold the fused MoE experts"):
        export_onnx_variants(prepare_model(str(tiny_model("qwen2moe-shared"))), tmp_path / "out", ["q4", "q8"])
    assert not (tmp_path / "out").exists()


def test_cli_runs_the_named_file(tiny_onnx_set, tiny_model):
    gen = ("generate", "--prompt", "Tell me about cats.", "--temperature", "0", "--max-tokens", "6")
    r = run(*gen, "--backend", "onnx", "--model", str(tiny_onnx_set), "--onnx-dtype", "q8")
    assert r.returncode == 0, r.stderr
    r = run(*gen, "--backend", "mlx", "--model", str(tiny_model("gqa2-untied")), "--onnx-dtype", "q8")
    assert r.returncode == 2 and "needs --backend onnx" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---- the peers -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prompts(tiny_model):
    return er.reference_prompts(tiny_model("gqa2-untied"), ["hello world", "def f(x): return x"], chat=True)


@pytest.fixture(scope="module")
def ours(tiny_onnx_set, prompts):
    """variant -> our ONNX backend's greedy tokens on that file (the expectation), on first use."""
    texts, ids = prompts
    cache: dict[str, er.RunResult] = {}

    def get(variant: str) -> er.RunResult:
        if variant not in cache:
            result = er.run_runtime("ours", tiny_onnx_set, ids, N_TOKENS, texts=texts, onnx_file=VARIANT_FILES[variant])
            assert result.ok, f"our ONNX backend failed on {variant}:\n{result.error}"
            cache[variant] = result
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformersjs_loads_every_dtype(variant, tiny_onnx_set, prompts, ours):
    needs_peer("transformersjs")
    texts, ids = prompts
    result = er.run_runtime("transformersjs", tiny_onnx_set, ids, N_TOKENS, texts=texts,
                            onnx_file=VARIANT_FILES[variant], timeout=600)
    assert result.ok, f"transformers.js could not run dtype {variant}:\n{result.error}"
    assert er.compare(ours(variant), result) == "yes", f"{variant}: {er.compare(ours(variant), result)}"


@pytest.mark.parametrize("variant", ["q4", "q4f16"])
def test_genai_runs_the_int4_files(variant, tiny_onnx_set, prompts, ours):
    needs_peer("genai")
    texts, ids = prompts
    result = er.run_runtime("genai", tiny_onnx_set, ids, N_TOKENS, texts=texts, onnx_file=VARIANT_FILES[variant],
                            timeout=600)
    assert result.ok, f"onnxruntime-genai could not run {variant}:\n{result.error}"
    assert er.compare(ours(variant), result) == "yes", f"{variant}: {er.compare(ours(variant), result)}"


def test_transformers_js_config_follows_the_files():
    from export.onnx_export import transformers_js_config

    # Every device's default file there (fp32: Node and WebGPU, q8: wasm): no dtype pinned.
    assert transformers_js_config({"fp32": True, "q8": True, "q4": True}) == {"use_external_data_format": True}
    # Otherwise the first file of the set, so that a plain from_pretrained finds one.
    assert transformers_js_config({"q4": False}) == {"dtype": "q4"}
    assert transformers_js_config({"fp32": False, "q4": False}) == {"dtype": "fp32"}
    # The float16 graphs' cache, and external data per file when only some files have it.
    assert transformers_js_config({"fp16": True, "q4f16": False}) == {
        "dtype": "fp16", "kv_cache_dtype": {"fp16": "float16", "q4f16": "float16"},
        "use_external_data_format": {"model_fp16.onnx": True}}
