"""GGUF out (`convert --model M --out FILE.gguf`, qwen_mlx/formats/gguf_write.py) on a tiny model of every
architecture the project runs: qwen2, qwen2moe, qwen3, qwen3moe and the hybrids qwen3next, qwen35, qwen35moe.

- Round trip: our reader (qwen_mlx/formats/gguf.py) reads the GGUF we write back to the source's tensors (the
  multi-token-prediction layer included) and the MLX backend's logits and greedy tokens on it equal those on the
  source: float32 to 1e-5; q8_0 with every matrix within Q8_0's rounding of the source, logits near the float
  ones; q4_0 exactly gguf's own dequantization of what was written.
- The converter's layout: llama.cpp's own convert_hf_to_gguf.py (tests/support/llama_converter.py) writes the same
  tensors (names, shapes, types, values) and the same llama.cpp keys for each tiny model.
- llama.cpp itself (opt-in, `-m llama_cpp`: llama-cpp-python built from its sdist, tests/support/llama_runtime.py):
  its greedy tokens on the GGUF we write equal transformers' on the source, per architecture.
- The CLI: the path it wrote, one error line for a bad type, an existing file without --force, an unwritable path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.quality.reference import PROMPT, STEPS, backend_logits, reference_greedy
from qwen_mlx.backends.base import Session, greedy_tokens
from qwen_mlx.checkpoint import prepare_model
from qwen_mlx.convert import gguf_file
from qwen_mlx.paths import cache_dir
from tests.support.cli import run
from tests.support.hybrid_models import HF_CLASSES, write_hybrid_model
from tests.support.llama_converter import ConverterUnavailable, convert, converter_dir
from tests.support.needs import unavailable

# GGUF architecture -> a tiny model of it (tiny_model's or hybrid_model's names).
DENSE = {"qwen2": "gqa2-untied", "qwen2moe": "qwen2moe-shared", "qwen3": "qwen3-bias-tied", "qwen3moe": "qwen3moe-norm"}
HYBRID = {"qwen3next": "next-moe", "qwen35": "q35-tied", "qwen35moe": "q35-moe"}
ARCHS = [*DENSE, *HYBRID]


@pytest.fixture(scope="module")
def source(tiny_model, hybrid_model):
    """source(arch) -> the tiny HF folder of that architecture (the hybrids as released, mtp.* included)."""
    return lambda arch: tiny_model(DENSE[arch]) if arch in DENSE else hybrid_model(HYBRID[arch])


def _mlx(spec: Path) -> Session:
    """The MLX backend on a model spec, resolved as `--model` resolves it (a .gguf read by our reader)."""
    from qwen_mlx.backends.mlx import MLXBackend

    return Session(MLXBackend(prepare_model(str(spec)), "float32"))


def _read_back(gguf: Path, cache: Path) -> Path:
    """The float32 folder our reader makes of a GGUF (the one `--model x.gguf` runs)."""
    _mlx(gguf)
    return next((cache / "gguf").glob("*-float32"))


def _source_tensors(folder: Path) -> dict[str, np.ndarray]:
    """The source's text-model tensors (and mtp.*) under the reader's names: experts one by one."""
    from safetensors.numpy import load_file

    weights: dict[str, np.ndarray] = {}
    for file in folder.glob("*.safetensors"):
        weights.update(load_file(str(file)))
    return {k.replace("model.language_model.", "model."): v for k, v in weights.items() if "visual" not in k}


@pytest.mark.parametrize("arch", ARCHS)
def test_float32_round_trip(source, arch, tmp_path, monkeypatch):
    from safetensors.numpy import load_file

    from qwen_mlx.formats.gguf import read_mtp

    monkeypatch.setenv("QWEN_MLX_CACHE", str(tmp_path / "cache"))
    folder = source(arch)
    out = gguf_file(prepare_model(str(folder)), tmp_path / "m.gguf", "f32")
    from gguf import GGUFReader

    assert GGUFReader(out).fields["general.architecture"].contents() == arch
    # Every tensor back, the nextn block as the release's mtp.* (float32 rounding of 1 + w and -exp(A_log)).
    back = load_file(str(_read_back(out, tmp_path / "cache") / "model.safetensors")) | read_mtp(out)
    want = _source_tensors(folder)
    assert set(back) == set(want)
    for key, value in back.items():
        np.testing.assert_allclose(value.reshape(want[key].shape), want[key], rtol=1e-6, atol=1e-6, err_msg=key)
    # The model: the same logits and greedy tokens as on the source.
    expected = backend_logits(_mlx(folder), PROMPT, STEPS)
    logits = backend_logits(_mlx(out), PROMPT, STEPS)
    assert np.abs(logits - expected).max() < 1e-5 * max(1.0, np.abs(expected).max())
    assert greedy_tokens(_mlx(out), PROMPT, 12) == greedy_tokens(_mlx(folder), PROMPT, 12)


# Models whose matrices are mostly 32 wide or more (hidden 64): Q8_0's blocks cover them.
Q8_MODELS = {"qwen2": "mqa-headdim", "qwen3moe": "qwen3moe-q64", "qwen3next": "next-moe", "qwen35moe": "q35-moe"}


@pytest.mark.parametrize("arch", list(Q8_MODELS))
def test_q8_0_within_its_rounding(tiny_model, hybrid_model, arch, tmp_path, monkeypatch):
    """Q8_0 stores each block of 32 as round(w / d) * d with d = max|w| / 127 (float16): every weight read back
    moves by at most d / 2 plus d's own rounding, so by less than max|row| / 127; vectors, norms, routers and the
    conv stay float32 (f16 where a row does not split into blocks). That is the whole of its error: the logits
    are not compared with the float model's, because these tiny random models are chaotic enough that Q8_0's
    rounding alone moves some of them by more than any bound would say (in transformers too; see
    tests/test_hybrid_gguf.py), while the float32 round trip shows the layout exact."""
    from safetensors.numpy import load_file

    monkeypatch.setenv("QWEN_MLX_CACHE", str(tmp_path / "cache"))
    folder = hybrid_model(Q8_MODELS[arch]) if arch in HYBRID else tiny_model(Q8_MODELS[arch])
    out = gguf_file(prepare_model(str(folder)), tmp_path / "m.gguf", "q8_0")
    back = load_file(str(_read_back(out, tmp_path / "cache") / "model.safetensors"))
    want = _source_tensors(folder)
    quantized = 0
    for key, value in back.items():
        w = want[key].reshape(value.shape)
        err = np.abs(value - w)
        routers = key.endswith(("mlp.gate.weight", "expert_gate.weight", "conv1d.weight"))
        if value.ndim == 2 and w.shape[-1] % 32 == 0 and not routers:
            quantized += 1
            assert (err <= np.abs(w).max(axis=-1, keepdims=True) / 127 + 1e-7).all(), key
            assert err.max() > 0, key  # rounded, so stored as Q8_0 indeed
        else:
            assert (err <= np.abs(w) * 2 ** -11 + 1e-7).all(), key
    assert quantized >= 8
    # Still a model of the same shape that runs: finite logits, as many greedy tokens as asked.
    assert np.isfinite(backend_logits(_mlx(out), PROMPT, STEPS)).all()


def test_q4_0_is_gguf_own_dequantization(source, tmp_path, monkeypatch):
    """q4_0 (gguf's numpy quantizer): what the reader returns is exactly gguf's dequantization of what was stored."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import load_file

    monkeypatch.setenv("QWEN_MLX_CACHE", str(tmp_path / "cache"))
    out = gguf_file(prepare_model(str(source("qwen35"))), tmp_path / "m.gguf", "q4_0")
    stored = {t.name: t for t in GGUFReader(out).tensors}
    assert stored["blk.3.attn_q.weight"].tensor_type.name == "Q4_0"
    assert stored["blk.3.attn_norm.weight"].tensor_type.name == "F32"
    back = load_file(str(_read_back(out, tmp_path / "cache") / "model.safetensors"))
    for gguf_name, name in (("blk.3.ffn_down.weight", "model.layers.3.mlp.down_proj.weight"),
                            ("blk.3.attn_k.weight", "model.layers.3.self_attn.k_proj.weight")):
        q = stored[gguf_name]
        np.testing.assert_array_equal(back[name], dequantize(q.data, q.tensor_type))


# ---- llama.cpp's converter lays the same file out -----------------------------------------------------------

# llama.cpp's qwen3next has no dense-MLP tensors: its converter (and llama.cpp) want every layer MoE. Its qwen3
# loads no attn_output.bias (Qwen3 with attention_bias: its converter writes one llama.cpp then refuses), so the
# Qwen3 there is one without biases.
LLAMA_OVERRIDES = {"next-moe": {"mlp_only_layers": []}}
LLAMA_DENSE = {**DENSE, "qwen3": "qwen3-untied"}


@pytest.fixture(scope="module")
def llama_sources(source, tiny_model, tmp_path_factory) -> dict[str, Path]:
    """arch -> a tiny model llama.cpp takes (next-moe without its dense layer, Qwen3 without biases)."""
    root = tmp_path_factory.mktemp("llama-sources")
    return {arch: tiny_model(LLAMA_DENSE[arch]) if arch in DENSE else
            write_hybrid_model(root / HYBRID[arch], HYBRID[arch], **LLAMA_OVERRIDES[HYBRID[arch]])
            if HYBRID[arch] in LLAMA_OVERRIDES else source(arch) for arch in ARCHS}


def test_same_file_as_llama_cpp_converter(llama_sources, tmp_path):
    """Our GGUF and convert_hf_to_gguf.py's (float32, one child process for all) hold the same tensors, types
    and values, and the same keys but for the converter's naming extras and our expert_weights_norm (llama.cpp
    fixes that per architecture; our reader takes it), with the same values."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        llama = converter_dir(cache_dir())
    except ConverterUnavailable as error:
        unavailable(str(error))
    convert(llama, [("qwen2", [str(folder), "--no-lazy", "--outtype", "f32", "--outfile", str(tmp_path / f"{a}.gguf")])
                    for a, folder in llama_sources.items()])
    for arch, folder in llama_sources.items():
        ours = GGUFReader(gguf_file(prepare_model(str(folder)), tmp_path / f"{arch}-ours.gguf", "f32"))
        theirs = GGUFReader(tmp_path / f"{arch}.gguf")
        mine, other = {t.name: t for t in ours.tensors}, {t.name: t for t in theirs.tensors}
        assert set(mine) == set(other), arch
        for name, t in other.items():
            m = mine[name]
            assert (list(m.shape), m.tensor_type) == (list(t.shape), t.tensor_type), (arch, name)
            np.testing.assert_allclose(dequantize(m.data, m.tensor_type), dequantize(t.data, t.tensor_type),
                                       rtol=0, atol=1e-6, err_msg=f"{arch} {name}")
        extras = {"general.name", "general.size_label", "general.type", "tokenizer.ggml.add_eos_token",
                  "GGUF.kv_count", f"{arch}.expert_weights_norm", f"{arch}.attention.key_length",
                  f"{arch}.attention.value_length"}
        keys = (set(ours.fields) | set(theirs.fields)) - extras
        assert keys <= set(ours.fields) & set(theirs.fields), (arch, keys - set(ours.fields) & set(theirs.fields))
        for key in keys:
            assert ours.fields[key].contents() == theirs.fields[key].contents(), (arch, key)


# ---- llama.cpp itself (opt-in) --------------------------------------------------------------------------------


@pytest.mark.llama_cpp
def test_llama_cpp_greedy_equals_transformers(llama_sources, tmp_path, request):
    """llama.cpp (llama-cpp-python, built from its sdist) runs the float32 GGUF we write of each architecture to
    transformers' greedy tokens on the source, its logits within 1e-4 (relative to the largest) at every position.
    Opt-in: `pytest -m llama_cpp` (a build takes minutes)."""
    import torch
    import transformers

    from tests.support.llama_runtime import LlamaCppUnavailable, greedy, llama_cpp_python

    if "llama_cpp" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("opt-in: run with -m llama_cpp")
    try:
        python = llama_cpp_python()
    except LlamaCppUnavailable as error:
        pytest.skip(str(error))
    prompt, n = PROMPT[:16], 16
    jobs = {arch: str(gguf_file(prepare_model(str(folder)), tmp_path / f"{arch}.gguf", "f32"))
            for arch, folder in llama_sources.items()}
    got = greedy(python, jobs, prompt, n)
    results, failed = {}, []
    for arch, folder in llama_sources.items():
        config = json.loads((folder / "config.json").read_text())
        classes = HF_CLASSES.get(config["model_type"])
        cls = getattr(transformers, classes[1]) if classes else transformers.AutoModelForCausalLM
        reference = cls.from_pretrained(folder, dtype=torch.float32).eval()
        want = reference_greedy(reference, prompt, n)
        if isinstance(got[arch], str):  # llama.cpp did not load it
            results[arch] = got[arch]
            failed.append(arch)
            continue
        # llama.cpp's logits on the same positions, transformers' computed on llama.cpp's tokens.
        with torch.no_grad():
            expected = reference(torch.tensor([prompt + got[arch]["tokens"][:-1]])).logits[0].numpy()
        error = float(np.abs(np.array(got[arch]["logits"]) - expected).max() / max(1.0, np.abs(expected).max()))
        same = got[arch]["tokens"] == want
        results[arch] = f"{'equal' if same else 'DIFFER'} ({n} tokens), logits within {error:.1e}"
        if not same or error > 1e-4:
            results[arch] += f": llama.cpp {got[arch]['tokens']} transformers {want}"
            failed.append(arch)
    print("\nllama.cpp vs transformers:", json.dumps(results, indent=1))
    assert not failed, {arch: results[arch] for arch in failed}


# ---- the command line ---------------------------------------------------------------------------------------


def test_cli_writes_and_refuses_in_one_line(source, tmp_path):
    folder = source("qwen35")
    out = tmp_path / "m.gguf"
    done = run("convert", "--model", str(folder), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    from gguf import GGUFReader

    # The default: f16 for a float32 checkpoint (bf16 for a bfloat16 one), as the converter's `auto`.
    assert GGUFReader(out).fields["general.file_type"].contents() == 1
    size = out.stat().st_size
    for args, says in [
        (["--model", str(folder), "--out", str(out)], "exists (pass --force"),
        (["--model", str(folder), "--out", str(tmp_path / "x.gguf"), "--gguf-type", "q3_k"], "--gguf-type must be"),
        (["--model", str(folder), "--out", str(tmp_path / "dir"), "--gguf-type", "f32"], "give --out FILE.gguf"),
        (["--model", str(folder), "--out", "/proc/m.gguf"], "cannot write"),
        (["--model", str(folder), "--out", str(tmp_path / "y.gguf"), "--quantize", "4"], "choose --gguf-type"),
        (["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "z.gguf")], "no such file"),
    ]:
        done = run("convert", *args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and says in lines[0], (args, done.stderr)
    assert out.stat().st_size == size  # untouched without --force
    assert run("convert", "--model", str(folder), "--out", str(out), "--gguf-type", "q8_0", "--force").returncode == 0
    assert GGUFReader(out).fields["general.file_type"].contents() == 7
    assert not list(tmp_path.glob(".m.tmp-*"))  # no staging file left behind


def test_a_gguf_retyped_keeps_every_tensor(source, tmp_path):
    """`convert --gguf A.gguf --out B.gguf`: through our reader and back, the same tensors, the nextn block too
    (-exp(log(-a)) may move the float32 ssm_a by an ulp; every other value comes back bit for bit)."""
    from gguf import GGUFReader

    first = gguf_file(prepare_model(str(source("qwen35moe"))), tmp_path / "a.gguf", "f32")
    done = run("convert", "--gguf", str(first), "--out", str(tmp_path / "b.gguf"), "--gguf-type", "f32")
    assert done.returncode == 0, done.stderr
    a, b = ({t.name: t for t in GGUFReader(p).tensors} for p in (first, tmp_path / "b.gguf"))
    assert set(a) == set(b) and any(".nextn." in name for name in a)
    for name, t in a.items():
        np.testing.assert_allclose(np.asarray(t.data), np.asarray(b[name].data), rtol=2e-7 if name.endswith("ssm_a")
                                   else 0, atol=0, err_msg=name)


def test_what_llama_cpp_would_run_otherwise_is_said(source, tiny_model):
    """The file is written whole either way; a note names what llama.cpp's loaders fix otherwise than the model."""
    from qwen_mlx.config import ModelArgs
    from qwen_mlx.formats.gguf_write import llama_cpp_caveats

    notes = {arch: llama_cpp_caveats(ModelArgs.from_folder(source(arch))) for arch in ARCHS}
    assert notes["qwen3next"] == ["llama.cpp's qwen3next wants every layer MoE; this model has dense layers [3]"]
    assert len(notes["qwen3"]) == 1 and "attn_output.bias" in notes["qwen3"][0]
    assert not any(notes[arch] for arch in ("qwen2", "qwen2moe", "qwen3moe", "qwen35", "qwen35moe"))
    assert "does not renormalize" in llama_cpp_caveats(ModelArgs.from_folder(tiny_model("qwen2moe-norm-mlponly")))[0]
