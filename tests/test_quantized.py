"""MLX-quantized folders (mlx_lm.convert -q) in: loaded as stored on MLX, dequantized for the torch twin,
checked against mlx-lm itself on folders mlx-lm wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from qwen_mlx.checkpoint import prepare_model
from qwen_mlx.errors import QwenError
from qwen_mlx.backends.mlx import MLXBackend
from qwen_mlx.formats.affine import QuantParams, dequantize
from benchmarks.checkpoints.tiny_models import mlx_lm_readable

# (tiny model, bits, group size): dense tied, dense untied with only its 128-wide o_proj quantizable (a
# folder mixing float and quantized layers), and MoE experts (mlx-lm's stacked switch_mlp,
# with the router at mlx-lm's own 8-bit override).
CASES = [("gqa4-tied", 4, 32), ("qwen3-untied", 8, 64), ("qwen3moe-q64", 4, 32)]
PROMPT = [1, 5, 9, 33, 100, 7, 250]


@pytest.fixture(scope="session")
def mlx_lm_quantized(tiny_model, tmp_path_factory):
    """mlx_lm_quantized(name, bits, group) -> a folder written by mlx_lm.convert -q (built once)."""
    from mlx_lm import convert

    built: dict[tuple, Path] = {}

    def get(name: str, bits: int, group: int) -> Path:
        if (name, bits, group) not in built:
            root = tmp_path_factory.mktemp(f"{name}-q{bits}")
            src = mlx_lm_readable(tiny_model(name), root / "hf")
            convert(str(src), str(root / "q"), quantize=True, q_bits=bits, q_group_size=group)
            built[name, bits, group] = root / "q"
        return built[name, bits, group]

    return get


def _mlx_lm_greedy(folder: Path, prompt: list[int], n: int) -> tuple[np.ndarray, list[int]]:
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(folder))
    logits = np.array(model(mx.array([prompt]))[0, -1])
    tokens = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n)]  # argmax by default
    return logits, tokens


def _greedy(backend, prompt: list[int], n: int) -> tuple[np.ndarray, list[int]]:
    first = logits = backend.forward(prompt)
    tokens = []
    for _ in range(n):
        tokens.append(int(np.argmax(logits)))
        logits = backend.forward([tokens[-1]])
    return first, tokens


@pytest.mark.parametrize("name,bits,group", CASES)
def test_mlx_lm_folder_matches_mlx_lm(mlx_lm_quantized, name, bits, group):
    folder = mlx_lm_quantized(name, bits, group)
    ckpt = prepare_model(str(folder))
    assert ckpt.quantization["bits"] == bits
    ours = MLXBackend(ckpt, "float32")
    assert f"{bits}-bit as stored" in ours.device
    ref_logits, ref_tokens = _mlx_lm_greedy(folder, PROMPT, 12)
    logits, tokens = _greedy(ours, PROMPT, 12)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
    assert tokens == ref_tokens


@pytest.fixture
def dequantized_path(monkeypatch):
    """Counts the CPU layers' choices: "dense"/"experts" -> how many multiplies took the dequantized matrix."""
    import qwen_mlx.models.layers as layers

    taken = {"dense": 0, "experts": 0}
    original = layers._dequantize_pays

    def counted(rows, from_rows, layer):
        pays = original(rows, from_rows, layer)
        if pays:
            taken["experts" if from_rows != layers.DEQUANTIZE_FROM_ROWS else "dense"] += 1
        return pays

    monkeypatch.setattr(layers, "_dequantize_pays", counted)
    return taken


@pytest.mark.parametrize("name,bits,group", CASES)
def test_prefill_through_dequantized_matrices_matches_mlx_lm(mlx_lm_quantized, dequantized_path, name, bits, group):
    """A 40-token prompt: on a CPU every quantized layer (the experts too: 160 pairs over 16 experts) multiplies
    it by its dequantized matrix, where mlx-lm runs MLX's quantized kernel. Every position's logits are compared
    (the generation path sends only the last position through the last layer's MLP), then 12 greedy steps."""
    from mlx_lm import load

    folder = mlx_lm_quantized(name, bits, group)
    prompt = [(7 * i + 3) % 500 for i in range(40)]
    ours = MLXBackend(prepare_model(str(folder)), "float32")
    logits = ours.model(mx.array([prompt]), ours.model.make_cache(), last_only=False)
    assert dequantized_path["dense"] > 0 and (dequantized_path["experts"] > 0) == ("moe" in name)
    np.testing.assert_allclose(np.array(logits), np.array(load(str(folder))[0](mx.array([prompt]))), atol=1e-4,
                               rtol=0)
    assert _greedy(ours, prompt, 12)[1] == _mlx_lm_greedy(folder, prompt, 12)[1]


@pytest.mark.parametrize("name,bits,group", CASES)
def test_batched_quantized_rows_get_their_tokens_alone(mlx_lm_quantized, dequantized_path, name, bits, group):
    """Decoding 4 sequences together multiplies by the dequantized matrices, one alone by the quantized kernel:
    every row's greedy tokens still equal the ones it gets alone."""
    from qwen_mlx.backends import load
    from qwen_mlx.engine import Engine, Request, Token, run_requests
    from qwen_mlx.backends.batching import batch_backend
    from qwen_mlx.backends.base import Session, greedy_tokens
    from qwen_mlx.sampling import SamplingParams

    # keep_quantized: the quantized layers themselves (loaded by name, a CPU would dequantize them at load)
    loaded = load("mlx", str(mlx_lm_quantized(name, bits, group)), "float32", keep_quantized=True)
    loaded.tokenizer.eos_token_ids = frozenset()
    prompts = [[(11 * i + 5 * j) % 500 for j in range(3 + 7 * i)] for i in range(4)]
    alone = [greedy_tokens(Session(loaded.backend), p, 10) for p in prompts]
    dequantized_path["dense"] = 0
    engine = Engine(batch_backend(loaded.backend, 4), loaded.tokenizer, prefill_chunk=16).start()
    try:
        events = run_requests(engine, [Request(p, SamplingParams(temperature=0), 10) for p in prompts])
    finally:
        engine.shutdown(0)
    assert dequantized_path["dense"] > 0
    assert [[e.id for e in ev if isinstance(e, Token)] for ev in events] == alone


def test_quantized_layers_choose_by_rows(dequantized_path):
    """Below the row thresholds the quantized kernel runs; above, the dequantized matrix gives the same output."""
    from qwen_mlx.models.qwen2 import SwitchLinear
    from qwen_mlx.models.layers import Linear, QuantizedLinear

    mx.random.seed(0)
    for bias in (False, True):
        q = Linear(256, 96, bias=bias).to_quantized(64, 4)
        assert type(q) is QuantizedLinear
        for rows in (1, 3, 4, 64):
            x = mx.random.normal((rows, 256))
            want = mx.quantized_matmul(x, q.weight, q.scales, q.biases, transpose=True, group_size=64, bits=4)
            np.testing.assert_allclose(np.array(q(x)), np.array(want + q.bias if bias else want), atol=1e-5)
    assert dequantized_path["dense"] == 4  # rows 4 and 64, with and without bias
    linear = SwitchLinear(128, 64, 4)
    linear.weight = mx.random.normal((4, 64, 128))
    q = linear.to_quantized(64, 8)
    for pairs in (8, 23, 24, 100):
        x, idx = mx.random.normal((pairs, 1, 128)), mx.sort(mx.random.randint(0, 4, (pairs,)))
        want = mx.gather_qmm(x, q.weight, q.scales, q.biases, rhs_indices=idx, transpose=True, group_size=64,
                             bits=8, sorted_indices=True)
        # float32 rounding of 128-term sums in another order (BLAS splits them by its thread count): relative
        np.testing.assert_allclose(np.array(q(x, idx, True)), np.array(want), atol=1e-5, rtol=2e-6)
    assert dequantized_path["experts"] == 2  # 24 and 100 pairs over 4 experts


def test_slow_unpacks_and_big_matrices_keep_the_kernel_longer(dequantized_path, monkeypatch):
    import qwen_mlx.models.layers as layers

    six = layers.Linear(256, 64, bias=False).to_quantized(64, 6)
    for rows in (4, 31, 32):
        x = mx.random.normal((rows, 256))
        want = mx.quantized_matmul(x, six.weight, six.scales, six.biases, transpose=True, group_size=64, bits=6)
        np.testing.assert_allclose(np.array(six(x)), np.array(want), atol=1e-5)
    assert dequantized_path["dense"] == 1  # 32 rows: 8x the 4-bit threshold
    monkeypatch.setattr(layers, "DEQUANTIZE_UP_TO", 64 * 256 - 1)
    four = layers.Linear(256, 64, bias=False).to_quantized(64, 4)
    mx.eval(four(mx.random.normal((64, 256))))
    assert dequantized_path["dense"] == 1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16: a KV cache's scales in a half model
def test_fast_dequantize_is_mx_dequantize_bit_for_bit(bits, group, dtype):
    from qwen_mlx.models.layers import dequantize

    for shape in [(96, 256), (3, 32, 128), (1, 2, 40, 128)]:  # 2-D, stacked experts, a KV cache B K T D
        q, s, b = mx.quantize(mx.random.normal(shape).astype(getattr(mx, dtype)), group, bits)
        assert mx.array_equal(dequantize(q, s, b, group, bits), mx.dequantize(q, s, b, group, bits)).item()


@pytest.mark.parametrize("name,bits,group", CASES)
def test_torch_twin_takes_the_folder_dequantized(mlx_lm_quantized, name, bits, group):
    from export.backends.torch import TorchBackend

    ckpt = prepare_model(str(mlx_lm_quantized(name, bits, group)))
    mlx_logits, mlx_tokens = _greedy(MLXBackend(ckpt, "float32"), PROMPT, 8)
    torch_logits, torch_tokens = _greedy(TorchBackend(ckpt, "float32"), PROMPT, 8)
    np.testing.assert_allclose(torch_logits, mlx_logits, atol=1e-4, rtol=0)
    assert torch_tokens == mlx_tokens


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_dequantize_is_mlx_exactly(bits, group):
    w = mx.random.normal((2, 8, 256), key=mx.random.key(bits * group))
    q, scales, biases = mx.quantize(w, group, bits)
    ours = dequantize(np.array(q), np.array(scales), np.array(biases), QuantParams(group, bits))
    np.testing.assert_array_equal(ours, np.array(mx.dequantize(q, scales, biases, group, bits)))


def _edited(folder: Path, tmp_path: Path, **changes) -> Path:
    dst = tmp_path / "edited"
    shutil.copytree(folder, dst)
    config = json.loads((dst / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        config[key] = {**config[key], **changes}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("changes,message", [
    (dict(bits=7), "bits 7 is not supported"),
    (dict(mode="mxfp4"), "mode 'mxfp4' is not supported"),
    (dict(group_size=64), "shapes that do not match config.json"),
    ({"model.layers.0.mlp.down_proj": False}, "holds quantization scales but config.json says it is not"),
])
def test_bad_quantization_configs_are_one_error(mlx_lm_quantized, tmp_path, changes, message):
    with pytest.raises(QwenError, match=message):
        prepare_model(str(_edited(mlx_lm_quantized("gqa4-tied", 4, 32), tmp_path, **changes)))


def test_quantizing_a_quantized_folder_is_refused(mlx_lm_quantized):
    with pytest.raises(QwenError, match="already quantized"):
        MLXBackend(prepare_model(str(mlx_lm_quantized("gqa4-tied", 4, 32))), "float32", quantize=8)


# convert --quantize out: folders from the unmodified tiny HF folders (transformers 5 configs), which
# mlx_lm.load must run as written. qwen3-untied and qwen2moe-shared quantize only their widths that split
# into groups. (Not mqa-headdim: mlx-lm's qwen2 ignores an explicit head_dim, float or quantized.)
OUT_CASES = [("gqa4-tied", "4", "32"), ("qwen3-untied", "8", "32"), ("qwen3moe-q64", "4", "64"),
             ("qwen2moe-shared", "8", "32")]


@pytest.mark.parametrize("name,bits,group", OUT_CASES)
def test_convert_quantize_runs_in_mlx_lm(tiny_model, tmp_path, name, bits, group):
    from tests.support.cli import run

    out = tmp_path / "q"
    r = run("convert", "--model", str(tiny_model(name)), "--quantize", bits, "--group-size", group, "--out", str(out))
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"] == {
        "group_size": int(group), "bits": int(bits), "mode": "affine"}
    ckpt = prepare_model(str(out))
    assert any(k.endswith(".scales") for k in ckpt.tensors)
    ref_logits, ref_tokens = _mlx_lm_greedy(out, PROMPT, 12)
    logits, tokens = _greedy(MLXBackend(ckpt, "float32"), PROMPT, 12)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
    assert tokens == ref_tokens
    # The folder holds what loading with --quantize makes: same logits as quantizing at load time.
    if group == "64":
        at_load = MLXBackend(prepare_model(str(tiny_model(name))), "float32", quantize=int(bits))
        np.testing.assert_allclose(at_load.forward(PROMPT), logits, atol=1e-5, rtol=0)


def test_convert_quantize_bad_inputs(tiny_model, mlx_lm_quantized, tmp_path):
    from tests.support.cli import run

    r = run("convert", "--quantize", "4", "--out", str(tmp_path / "a"))
    assert r.returncode != 0 and r.stderr.strip().startswith("error: ") and "--model" in r.stderr
    r = run("convert", "--model", str(mlx_lm_quantized("gqa4-tied", 4, 32)), "--quantize", "8",
            "--out", str(tmp_path / "b"))
    assert r.returncode != 0 and "already quantized" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep").write_text("x")
    r = run("convert", "--model", str(tiny_model("gqa4-tied")), "--quantize", "4", "--out", str(tmp_path / "c"))
    assert r.returncode != 0 and (tmp_path / "c" / "keep").exists()


def test_info_shows_the_stored_quantization(mlx_lm_quantized):
    from tests.support.cli import run

    r = run("info", "--model", str(mlx_lm_quantized("qwen3moe-q64", 4, 32)))
    assert r.returncode == 0, r.stderr
    # mlx-lm keeps the MoE router at 8 bits, group 64, as a per-module override.
    assert "quantized    4-bit affine, group size 32; overrides: 1 module 8-bit/64" in r.stdout
    assert "as stored" in r.stdout and "MLX, quantized as stored" in r.stdout


@pytest.mark.real
def test_real_checkpoint_quantized_both_ways(real_model_dir, tmp_path):
    """The real 0.5B checkpoint: our 4-bit folder in mlx-lm, mlx-lm's 4-bit folder here, 16 greedy tokens."""
    from mlx_lm import convert

    from tests.support.cli import run

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    r = run("convert", "--model", str(real_model_dir), "--quantize", "4", "--out", str(ours))
    assert r.returncode == 0, r.stderr
    convert(str(real_model_dir), str(theirs), quantize=True, q_bits=4, q_group_size=64)
    prompt = [750, 75698, 1445, 1648]  # "def fibonacci(n):" in the Qwen2.5 vocabulary
    for folder in (ours, theirs):
        _, ref_tokens = _mlx_lm_greedy(folder, prompt, 16)
        _, tokens = _greedy(MLXBackend(prepare_model(str(folder)), "float32"), prompt, 16)
        assert tokens == ref_tokens
