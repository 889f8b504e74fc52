"""export-onnx and the torch/onnx backends through the command line, as a user runs them."""

from __future__ import annotations

import pytest

from tests.support.cli import run

GEN = ("generate", "--prompt", "Tell me about cats.", "--temperature", "0", "--max-tokens", "10")


@pytest.fixture(scope="module")
def exported(tiny_onnx):
    out = tiny_onnx("gqa2-untied")  # the session's `export-onnx` run (tests/conftest.py)
    assert (out / "onnx" / "model.onnx").is_file() and (out / "genai_config.json").is_file()
    return out


def test_every_backend_prints_the_same_greedy_reply(tiny_model, exported):
    folder = str(tiny_model("gqa2-untied"))
    replies = {b: run(*GEN, "--backend", b, "--model", folder if b != "onnx" else str(exported))
               for b in ("mlx", "torch", "onnx")}
    for backend, r in replies.items():
        assert r.returncode == 0, (backend, r.stderr)
    assert replies["mlx"].stdout == replies["torch"].stdout == replies["onnx"].stdout


def test_export_refuses_a_non_empty_folder(tiny_model, exported):
    before = sorted(p.name for p in exported.iterdir())
    r = run("export-onnx", "--model", str(tiny_model("gqa2-untied")), "--out", str(exported))
    assert r.returncode == 2 and "--force" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in exported.iterdir()) == before


@pytest.mark.parametrize("args,words", [
    (["--model", "/no/such/model"], "no such file or folder"),
    (["--dtype", "int8"], "--dtype"),
    (["--quantize", "int3"], "--quantize"),
])
def test_export_bad_input_is_one_line(tiny_model, tmp_path, args, words):
    base = ["export-onnx", "--model", str(tiny_model("gqa2-untied")), "--out", str(tmp_path / "out")]
    r = run(*base, *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_onnx_backend_on_a_folder_without_onnx(tiny_model):
    r = run(*GEN, "--backend", "onnx", "--model", str(tiny_model("gqa2-untied")))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "ONNX" in r.stderr, r.stderr



@pytest.mark.parametrize("name, left_out", [("qwen2moe-shared", ["q8"]), ("gqa2-untied", [])])
def test_the_default_file_set_leaves_out_what_a_model_cannot_hold(tiny_model, name, left_out):
    """With no --dtypes, export-onnx writes what the model can hold: a MoE's fused experts have no 8-bit form,
    so q8 is left out with a note (printed as one `warning:` line) instead of failing the whole run."""
    from export.onnx_export import default_variants
    from export.onnx_format import DEFAULT_VARIANTS
    from qwen_mlx.checkpoint import prepare_model

    variants, note = default_variants(prepare_model(str(tiny_model(name))))
    assert variants == [v for v in DEFAULT_VARIANTS if v not in left_out]
    assert (note is None) == (not left_out) and (not left_out or note.startswith("q8 left out"))
