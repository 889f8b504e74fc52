"""llama.cpp's GGUFs of the hybrid family (`qwen3next`, `qwen35`, `qwen35moe`) in through `--model x.gguf`.

Each tiny checkpoint of tests/support/hybrid_models.py, its multi-token-prediction layer included, is converted by
llama.cpp's own convert_hf_to_gguf.py (tests/support/llama_converter.py: the llama-cpp-python sdist, fetched from
PyPI once into the cache), then read back by qwen_mlx.formats.gguf. A float32 GGUF gives the original's config,
tensors, tokenizer, and transformers' logits (to 1e-4) and greedy tokens; a Q8_0 one (llama.cpp's `--fuse-qkv` and
`--fuse-gate-up-exps` on one of them) gives the weights to the quantization's error and, its blocks kept, the
logits transformers computes from the same dequantized weights. The nextn block reads back as the release's
`mtp.*` tensors and stays out of the folder; a malformed file is a one-line error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from benchmarks.quality.reference import backend_logits, reference_greedy, reference_logits
from qwen_mlx.backends.base import Session, greedy_tokens
from qwen_mlx.config import ModelArgs
from qwen_mlx.errors import QwenError
from qwen_mlx.formats import gguf as gguf_convert
from qwen_mlx.formats.gguf import convert_gguf, read_mtp
from qwen_mlx.paths import cache_dir
from tests.support.cli import run_with_cache
from tests.support.hybrid_models import HF_CLASSES, HYBRID_CONFIGS, write_hybrid_model
from tests.support.llama_converter import ConverterUnavailable, convert, converter_dir
from tests.support.needs import unavailable

NAMES = list(HYBRID_CONFIGS)
# The pre-tokenizer llama.cpp would name for the release's tokenizer (the tiny one agrees with both on ASCII).
PRE = {"next-moe": "qwen2", "q35-tied": "qwen35", "q35-moe": "qwen35"}
# llama.cpp's qwen3next has no dense-MLP tensors, so its converter refuses a dense layer among the MoE ones.
OVERRIDES = {"next-moe": {"mlp_only_layers": []}}
QUANTIZED = {"next-moe": [], "q35-moe": ["--fuse-qkv", "--fuse-gate-up-exps"]}  # Q8_0, and converter options
RNG = np.random.default_rng(11)
PROMPT = RNG.integers(3, 500, size=70).tolist()  # two delta-rule chunks
STEPS = RNG.integers(3, 500, size=6).tolist()


@pytest.fixture(scope="session")
def llama_converter() -> Path:
    """llama.cpp's converter, fetched once into the cache (skipped without a registry, failed in CI)."""
    try:
        return converter_dir(cache_dir())
    except ConverterUnavailable as error:
        unavailable(str(error))


@pytest.fixture(scope="module")
def hybrid_ggufs(llama_converter, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of `<name>/` (the HF checkpoint), `<name>-f32.gguf` and, for QUANTIZED, `<name>-q8_0.gguf`:
    one converter process for all (it imports torch and transformers once)."""
    root = tmp_path_factory.mktemp("hybrid-gguf")
    folders = {n: write_hybrid_model(root / n, n, **OVERRIDES.get(n, {})) for n in NAMES}
    # --no-lazy: the same tensors, without the lazy evaluator's torch._dynamo import (seconds here).
    jobs = [(PRE[n], [str(folders[n]), "--no-lazy", "--outtype", "f32", "--outfile", str(root / f"{n}-f32.gguf")])
            for n in NAMES]
    jobs += [(PRE[n], [str(folders[n]), "--no-lazy", "--outtype", "q8_0", *flags,
                       "--outfile", str(root / f"{n}-q8_0.gguf")]) for n, flags in QUANTIZED.items()]
    convert(llama_converter, jobs)
    return root


def _reference(folder: Path):
    import torch
    import transformers

    config = json.loads((folder / "config.json").read_text())
    cls = getattr(transformers, HF_CLASSES[config["model_type"]][1])
    return cls.from_pretrained(folder, dtype=torch.float32).eval()


def _session(spec: str, gguf_blocks: bool = False) -> Session:
    """The MLX backend on a model spec, resolved as `--model` resolves it (a .gguf converted into the cache)."""
    from qwen_mlx.backends.mlx import MLXBackend
    from qwen_mlx.checkpoint import prepare_model

    return Session(MLXBackend(prepare_model(spec, gguf_blocks=gguf_blocks), "float32"))


def _original(folder: Path) -> dict[str, np.ndarray]:
    """The checkpoint's text-model tensors under the text model's names."""
    weights = load_file(str(folder / "model.safetensors"))
    return {k.replace("model.language_model.", "model."): v for k, v in weights.items() if "visual" not in k}


_SAME_ARGS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "layer_types",
              "partial_rotary_factor", "rope_theta", "linear_num_key_heads", "linear_num_value_heads",
              "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim", "num_experts",
              "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
              "moe_layers", "rms_norm_eps")


@pytest.mark.parametrize("name", NAMES)
def test_float32_gguf_equals_the_checkpoint(hybrid_ggufs, tmp_path, monkeypatch, name):
    monkeypatch.setenv("QWEN_MLX_CACHE", str(tmp_path / "cache"))
    folder, gguf = hybrid_ggufs / name, hybrid_ggufs / f"{name}-f32.gguf"
    session = _session(str(gguf))
    converted = next((tmp_path / "cache" / "gguf").glob("*-float32"))
    # The config: the text model's, as the text-only class (the GGUF holds no vision tower).
    original, ours = ModelArgs.from_folder(folder), ModelArgs.from_folder(converted)
    for field in _SAME_ARGS:
        assert getattr(ours, field) == getattr(original, field), field
    assert ours.model_type.removesuffix("_text") == original.model_type
    assert json.loads((converted / "config.json").read_text())["mtp_num_hidden_layers"] == 1
    # Every tensor back (norms stored 1 + w, A_log as -exp(A_log): float32 rounding), and no mtp.* among them.
    want, got = _original(folder), load_file(str(converted / "model.safetensors"))
    assert set(got) == set(ours.weight_shapes()) == set(want)
    for key, value in got.items():
        np.testing.assert_allclose(value, want[key], rtol=1e-6, atol=1e-6, err_msg=key)
    # The model: transformers' logits and greedy tokens on the original checkpoint.
    reference = _reference(folder)
    logits = backend_logits(session, PROMPT, STEPS)
    expected = reference_logits(reference, PROMPT, STEPS)
    assert np.abs(logits - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())
    assert greedy_tokens(_session(str(gguf)), PROMPT[:20], 16) == reference_greedy(reference, PROMPT[:20], 16)
    # The tokenizer from the GGUF's vocabulary: the same ids and chat template.
    from transformers import AutoTokenizer

    theirs, mine = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(converted)
    text = "The quick brown fox, isn't it? <|im_start|>user\nhello 123<|im_end|>"
    assert mine(text)["input_ids"] == theirs(text)["input_ids"]
    assert mine.chat_template == theirs.chat_template


@pytest.mark.parametrize("name", list(QUANTIZED))
def test_q8_0_gguf_keeps_its_blocks_and_agrees(hybrid_ggufs, tmp_path, monkeypatch, name):
    """Row reorders (Qwen3-Next's qkvz, the fused qkv and gate/up splits) keep Q8_0 blocks; Qwen3.5's out_proj,
    whose value heads (16 wide here) split blocks when untiled, is dequantized. Logits are compared with
    transformers on the same dequantized weights, not with the float checkpoint: the tiny random models are
    chaotic enough that Q8_0's error alone decorrelates some rows (in transformers too), as in the qwen2 GGUF
    tests, which compare with gguf's own dequantization."""
    import torch
    import transformers

    monkeypatch.setenv("QWEN_MLX_CACHE", str(tmp_path / "cache"))
    folder, gguf = hybrid_ggufs / name, hybrid_ggufs / f"{name}-q8_0.gguf"
    # Dequantized: every weight within Q8_0's error of the original: half a step of its block's largest / 127,
    # the step itself rounded to float16.
    dequantized = convert_gguf(gguf, tmp_path / "f32", progress=False)
    want = _original(folder)
    for key, value in load_file(str(dequantized / "model.safetensors")).items():
        row = np.abs(want[key]).max(axis=-1, keepdims=True)
        assert (np.abs(value - want[key]) <= row / 200 + 1e-6).all(), key
    # Kept: the blocks as MLX affine groups, giving transformers' logits on the same dequantized weights.
    kept = _session(str(gguf), gguf_blocks=True)
    quantization = json.loads((next((tmp_path / "cache" / "gguf").glob("*-blocks")) / "config.json").read_text())
    quantization = quantization["quantization"]
    linear = "in_proj_qkvz" if name == "next-moe" else "in_proj_qkv"
    assert quantization["bits"] == 8 and f"model.layers.0.linear_attn.{linear}" not in quantization
    assert ("model.layers.0.linear_attn.out_proj" in quantization) == (name == "q35-moe")  # False: a float matrix
    logits = backend_logits(kept, PROMPT[:40], STEPS)
    reference = transformers.AutoModelForCausalLM.from_pretrained(dequantized, dtype=torch.float32).eval()
    expected = reference_logits(reference, PROMPT[:40], STEPS)
    assert np.abs(logits - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())


@pytest.mark.parametrize("name", NAMES)
def test_nextn_block_reads_back_as_the_release_mtp_layer(hybrid_ggufs, name):
    """read_mtp names the nextn block's tensors as the checkpoint does, with their values (norms back from
    1 + w); convert_gguf leaves them out (test_float32_gguf_equals_the_checkpoint)."""
    want = load_file(str(hybrid_ggufs / name / "model-mtp.safetensors"))
    got = read_mtp(hybrid_ggufs / f"{name}-f32.gguf")
    assert set(got) == set(want)
    for key, value in got.items():
        np.testing.assert_allclose(value.reshape(want[key].shape), want[key], rtol=1e-6, atol=1e-6, err_msg=key)
    quantized = read_mtp(hybrid_ggufs / f"{name}-q8_0.gguf") if name in QUANTIZED else {}
    for key, value in quantized.items():  # fused or not, Q8_0 or not: the same tensors
        assert np.abs(value.reshape(want[key].shape) - want[key]).max() <= np.abs(want[key]).max() / 100, key


def test_cli_generates_from_a_hybrid_gguf(hybrid_ggufs, tmp_path):
    r = run_with_cache("generate", "--model", str(hybrid_ggufs / "q35-moe-q8_0.gguf"), "--prompt", "hello there",
                       "--max-tokens", "6", "--temperature", "0", cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "cache" / "gguf").glob("*-blocks"))) == 1  # converted once, its blocks kept


# Malformed files, made by patching what the reader sees: (function of qwen_mlx.formats.gguf, its replacement).
def _drop_key(key: str):
    read = gguf_convert._metadata
    return "_metadata", lambda reader: {k: v for k, v in read(reader).items() if k != key}


def _set_key(key: str, value):
    read = gguf_convert._metadata
    return "_metadata", lambda reader: {**read(reader), key: value}


def _drop_tensor(name: str):
    open_ = gguf_convert._open

    def without(path):
        reader = open_(path)
        reader.tensors = [t for t in reader.tensors if t.name != name]
        return reader
    return "_open", without


BROKEN = {
    "no-ssm-rank": ("q35-tied", _drop_key, "qwen35.ssm.time_step_rank", "lacks 'qwen35.ssm.time_step_rank'"),
    "no-gate": ("next-moe", _drop_tensor, "blk.0.attn_gate.weight", "not its attn_gate"),
    "no-a": ("q35-moe", _drop_tensor, "blk.2.ssm_a", "lacks 1 tensors .* 'model.layers.2.linear_attn.A_log'"),
    "value-heads": ("q35-moe", _set_key, ("qwen35moe.ssm.time_step_rank", 2), "the metadata implies"),
    "short-layers": ("q35-tied", _set_key, ("qwen35.attention.recurrent_layers", [True]), "names 1 layers"),
    "no-mtp-count": ("next-moe", _drop_key, "qwen3next.nextn_predict_layers", "unexpected tensor 'blk.4"),
    "pre": ("q35-tied", _set_key, ("tokenizer.ggml.pre", "llama-bpe"), "pre-tokenizer is 'llama-bpe'"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_malformed_hybrid_gguf_is_a_one_line_error(hybrid_ggufs, tmp_path, monkeypatch, case):
    """A QwenError, which cli.py prints as one `error:` line (tests/test_gguf_convert.py runs that path)."""
    name, make, arg, message = BROKEN[case]
    monkeypatch.setattr(gguf_convert, *(make(*arg) if isinstance(arg, tuple) else make(arg)))
    with pytest.raises(QwenError, match=message):
        convert_gguf(hybrid_ggufs / f"{name}-f32.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
