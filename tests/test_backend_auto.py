"""`--backend auto`: the choice itself (a pure function, every branch), the export cache it fills (made once,
reused, never half-written), the same float32 tokens whichever backend it takes, its fallback to MLX when the
exporter refuses a model, and quantized MLX weights dequantized at load on a CPU."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwen_mlx.backends.choice import Asked, Machine, banner, choose_backend, cpu_variant
from qwen_mlx.errors import QwenError
from tests.support.cli import ROOT

NO_GPU = Machine()


def never_asked(variant: str) -> str | None:
    raise AssertionError("the exporter must not be asked when ONNX is not a candidate")


# ---- the choice --------------------------------------------------------------------------------------------

def test_no_gpu_takes_the_int4_onnx_export_as_the_readme_says():
    choice = choose_backend(NO_GPU, Asked(), lambda variant: None)
    assert (choice.backend, choice.variant) == ("onnx", "q4")
    # README's "What runs where": the row for a machine without a GPU names this same path.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## What runs where"):]
    row = next(line for line in section.splitlines() if line.startswith("| ") and "no GPU" in line
               and "default" in line)
    assert "int4 ONNX" in row, row


@pytest.mark.parametrize("machine, asked, backend, variant, says", [
    (Machine(gpu="Metal"), Asked(), "mlx", None, "Metal GPU"),
    (Machine(gpu="CUDA"), Asked(dtype="float32"), "mlx", None, "CUDA GPU"),
    (Machine(launched=True), Asked(), "mlx", None, "several ranks"),
    (NO_GPU, Asked(mlx_only=("--kv-bits",)), "mlx", None, "--kv-bits needs the mlx backend"),
    (NO_GPU, Asked(mlx_only=("--prompt-lookup", "--draft-model")), "mlx", None,
     "--prompt-lookup, --draft-model need the mlx backend"),
    (NO_GPU, Asked(dtype="bfloat16"), "mlx", None, "--dtype bfloat16"),
    (NO_GPU, Asked(dtype="float16"), "mlx", None, "--dtype float16"),
    (NO_GPU, Asked(quantize="8"), "mlx", None, "--quantize 8"),
    (Machine(gpu="Metal"), Asked(onnx_folder=True), "onnx", None, "ONNX export folder"),
])
def test_choices_that_never_ask_the_exporter(machine, asked, backend, variant, says):
    choice = choose_backend(machine, asked, never_asked)
    assert (choice.backend, choice.variant) == (backend, variant)
    assert says in choice.reason
    assert "--backend mlx|onnx|torch" in banner(choice)  # how to choose another


@pytest.mark.parametrize("dtype, quantize, variant", [
    (None, None, "q4"), (None, "4", "q4"), (None, "int4", "q4"), ("float32", "int4", "q4"), ("float32", None, "fp32"),
])
def test_cpu_variants_honour_dtype_and_quantize(dtype, quantize, variant):
    assert cpu_variant(dtype, quantize)[0] == variant
    asked: list[str] = []
    choice = choose_backend(NO_GPU, Asked(dtype=dtype, quantize=quantize), lambda v: asked.append(v))
    assert (choice.backend, choice.variant, asked) == ("onnx", variant, [variant])


def test_missing_export_extra_falls_back_to_mlx_with_a_one_line_hint():
    choice = choose_backend(Machine(missing_export=("torch", "onnx")), Asked(), never_asked)
    assert choice.backend == "mlx" and "torch, onnx" in choice.reason
    assert choice.hint and "\n" not in choice.hint and "pip install -e '.[export]'" in choice.hint


def test_a_refusing_exporter_falls_back_to_mlx_with_its_reason():
    choice = choose_backend(NO_GPU, Asked(), lambda variant: "the twin of qwen3_5 is not written yet")
    assert choice.backend == "mlx" and choice.reason.endswith("the twin of qwen3_5 is not written yet")


def test_onnx_dtype_with_an_mlx_only_flag_is_refused():
    with pytest.raises(QwenError, match="--onnx-dtype runs the onnx backend, but --kv-bits needs the mlx"):
        choose_backend(NO_GPU, Asked(onnx_dtype="q4", mlx_only=("--kv-bits",)), never_asked)


# ---- the CLI on a tiny model: the export cache -------------------------------------------------------------

def auto(*args: str, cache: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`cli.py` with QWEN_MLX_BACKEND unset (the default is auto) and its cache at `cache`."""
    env = {k: v for k, v in (env or os.environ).items() if k != "QWEN_MLX_BACKEND"}
    env.update(QWEN_MLX_QUIET="1", HF_HUB_OFFLINE="1", QWEN_MLX_CACHE=str(cache))
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)


def banner_line(stderr: str) -> str:
    """The banner: the last `backend auto:` line (an export first announces itself on one of its own)."""
    return [line for line in stderr.splitlines() if line.startswith("backend auto:")][-1]


GEN = ("generate", "--raw", "--prompt", "one two three", "--temperature", "0", "--max-tokens", "8")


def test_default_backend_is_auto(tmp_path):
    r = auto("generate", "--help", cache=tmp_path)
    found = re.search(r"--backend \[auto\|mlx\|torch\|onnx\].*?\[default:\s+(\w+)\]", r.stdout, re.S)
    assert found and found[1] == "auto", r.stdout


def test_export_is_made_once_then_reused(tiny_model, tmp_path):
    folder = str(tiny_model("gqa2-untied"))
    first = auto(*GEN, "--model", folder, cache=tmp_path)
    assert first.returncode == 0, first.stderr
    made = banner_line(first.stderr)
    assert made.startswith("backend auto: onnx q4 (made ") and "no Metal or CUDA GPU" in made
    entry = Path(re.search(r"\(made (\S+)\)", made)[1])
    model_file = entry / "onnx" / "model_q4.onnx"
    before = model_file.stat()
    second = auto(*GEN, "--model", folder, cache=tmp_path)
    assert second.returncode == 0, second.stderr
    assert banner_line(second.stderr).startswith(f"backend auto: onnx q4 (reused {entry})")
    after = model_file.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # the same file: no re-export
    assert second.stdout == first.stdout
    # Only the entry (and its lock) in the cache: no staging folder, no failure marker.
    assert sorted(p.name for p in entry.parent.iterdir()) == sorted([entry.name, f".{entry.name}.lock"])


def test_float32_tokens_are_the_same_whichever_backend_auto_takes(tiny_model, tmp_path):
    folder = str(tiny_model("gqa2-untied"))
    r = auto(*GEN, "--model", folder, "--dtype", "float32", cache=tmp_path)
    assert r.returncode == 0, r.stderr
    assert banner_line(r.stderr).startswith("backend auto: onnx fp32 (made ")
    mlx = auto(*GEN, "--model", folder, "--dtype", "float32", "--backend", "mlx", cache=tmp_path)
    assert mlx.returncode == 0, mlx.stderr
    assert r.stdout == mlx.stdout and r.stdout.strip()


def test_a_model_the_exporter_refuses_runs_on_mlx_and_says_why(tiny_model, tmp_path):
    from export.onnx_export import unsupported
    from qwen_mlx.checkpoint import prepare_model

    folder = str(tiny_model("dca"))
    reason = unsupported(prepare_model(folder))
    assert reason and "Dual Chunk Attention" in reason
    r = auto(*GEN, "--model", folder, cache=tmp_path)
    assert r.returncode == 0, r.stderr
    assert banner_line(r.stderr).startswith("backend auto: mlx: no GPU for MLX here, but the ONNX exporter cannot "
                                            f"take this model: {reason}")
    assert not (tmp_path / "onnx").exists() or not any((tmp_path / "onnx").iterdir())


@pytest.mark.parametrize("name", ["q35-tied"])
def test_a_hybrid_model_follows_the_exporters_answer(hybrid_model, tmp_path, name):
    """Qwen3.5: MLX with the exporter's own reason while it refuses the model (asked, not hardcoded)."""
    from export.onnx_export import unsupported
    from qwen_mlx.checkpoint import prepare_model

    folder = str(hybrid_model(name))
    reason = unsupported(prepare_model(folder))
    if reason is None:
        pytest.skip("the exporter takes hybrid models now: the export path is covered by the tests above")
    r = auto(*GEN, "--model", folder, cache=tmp_path)
    assert r.returncode == 0, r.stderr
    assert banner_line(r.stderr).endswith(f"cannot take this model: {reason}; --backend mlx|onnx|torch picks one "
                                          "yourself")


def test_mlx_only_flags_choose_mlx_and_are_honoured(tiny_model, tmp_path):
    r = auto(*GEN, "--model", str(tiny_model("kv-head64")), "--kv-bits", "8", "--prompt-lookup", cache=tmp_path)
    assert r.returncode == 0, r.stderr
    assert banner_line(r.stderr).startswith("backend auto: mlx: --kv-bits, --prompt-lookup need the mlx backend")
    assert '"draft_tokens"' in r.stderr  # speculative decoding ran


def test_an_earlier_failed_export_is_not_retried(tiny_model, tmp_path, monkeypatch):
    from export.cached_export import entry, refusal
    from qwen_mlx.checkpoint import prepare_model

    monkeypatch.setenv("QWEN_MLX_CACHE", str(tmp_path))
    folder = tiny_model("gqa2-untied")
    target = entry(folder, "q4")
    assert refusal(prepare_model(str(folder)), target) is None
    target.parent.mkdir(parents=True)
    marker = target.parent / f"{target.name}.failed"
    marker.write_text("validation: greedy agreement 10%\n")
    assert refusal(prepare_model(str(folder)), target) == (
        f"an earlier export failed (validation: greedy agreement 10%; delete {marker} to try again)")


def _start_export(folder: str, cache: Path) -> tuple[subprocess.Popen, Path]:
    """A first `--backend auto` run, stopped once its export is writing into a staging folder."""
    env = {k: v for k, v in os.environ.items() if k != "QWEN_MLX_BACKEND"}
    env.update(QWEN_MLX_QUIET="1", QWEN_MLX_CACHE=str(cache))
    # SIGINT back to its default in the child: a test run started in the background inherits it ignored, and
    # Python then never turns Ctrl-C into KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *GEN, "--model", folder], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        # this run's own staging folder (its pid in the name), not one an earlier killed run left
        staging = list((cache / "onnx").glob(f".*.tmp-{proc.pid}-*")) if (cache / "onnx").is_dir() else []
        if staging:
            return proc, staging[0]
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the export never started")


def test_an_interrupted_export_leaves_no_cache_entry(tiny_model, tmp_path):
    folder = str(tiny_model("gqa2-untied"))
    # kill -9 mid-export: the staging folder stays, but it is no entry (nothing is renamed into place) ...
    proc, killed = _start_export(folder, tmp_path)
    proc.kill()
    proc.wait()
    entries = [p for p in (tmp_path / "onnx").iterdir() if not p.name.startswith(".")]
    assert entries == [] and killed.exists()
    # ... Ctrl-C mid-export: exit 130, its own staging folder removed, and the dead run's leftover too.
    proc, staging = _start_export(folder, tmp_path)
    proc.send_signal(signal.SIGINT)  # at once: a tiny model's whole export can end within half a second
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted"
    assert [p.name for p in (tmp_path / "onnx").iterdir() if not p.name.endswith(".lock")] == []


# ---- quantized MLX weights on a CPU ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quantized_folder(tiny_model, tmp_path_factory) -> Path:
    from qwen_mlx.checkpoint import prepare_model
    from qwen_mlx.convert import quantize_folder

    # hidden 64: every matrix splits into groups of 64 (gqa2-untied's 48 would stay float)
    return quantize_folder(prepare_model(str(tiny_model("gqa4-tied"))), tmp_path_factory.mktemp("q4") / "q4", 4)


def test_stored_quantized_weights_are_dequantized_on_a_cpu(quantized_folder):
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from qwen_mlx.backends import load

    assert mx.default_device() == mx.cpu
    fast = load("mlx", str(quantized_folder)).backend  # by name, as the CLI and the server load it
    kept = load("mlx", str(quantized_folder), keep_quantized=True).backend
    assert "dequantized from 4-bit at load, +" in fast.device and "--keep-quantized keeps them" in fast.device
    assert "4-bit as stored (--keep-quantized" in kept.device
    layers = dict(fast.model.named_modules())
    assert not any(isinstance(m, nn.QuantizedLinear) for m in layers.values())
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in kept.model.named_modules())
    tokens = [1, 5, 9, 3, 7]
    np.testing.assert_allclose(fast.forward(tokens), kept.forward(tokens), atol=1e-4, rtol=1e-4)


def test_dequantizing_is_skipped_where_it_would_not_fit(quantized_folder):
    from qwen_mlx.checkpoint import prepare_model
    from qwen_mlx.models.dequantize import dequantize_at_load, weight_bytes

    ckpt = prepare_model(str(quantized_folder))
    stored, as_float = weight_bytes(ckpt, "float32")
    assert as_float > 2 * stored
    assert dequantize_at_load(ckpt, "float32", on_cpu=True, keep=False, memory_bytes=as_float)[0] is False
    assert dequantize_at_load(ckpt, "float32", on_cpu=True, keep=False, memory_bytes=4 * as_float)[0] is True
    assert dequantize_at_load(ckpt, "float32", on_cpu=False, keep=False)[0] is False  # Metal/CUDA: kernels


def test_keep_quantized_is_an_mlx_flag(tiny_model, tmp_path):
    r = auto("generate", "--model", str(tiny_model("gqa2-untied")), "--prompt", "hi", "--backend", "onnx",
             "--keep-quantized", cache=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --keep-quantized is an mlx backend option (its CPU quantized kernels), not onnx's"]
