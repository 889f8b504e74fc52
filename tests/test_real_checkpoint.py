"""The MLX backend on the real Qwen2.5-Coder-0.5B-Instruct checkpoint against HF transformers, float32."""

from __future__ import annotations

import json

import pytest

from benchmarks.quality.reference import load_reference, reference_greedy

pytestmark = pytest.mark.real

N_TOKENS = 16
CHATS = {
    "english": "Write a Python function that checks whether a number is prime.",
    "chinese": "用一句话解释什么是递归。",
    "emoji": "Describe a sunny day at the beach using three emoji 🌞🏖️ and one sentence.",
}
RAW_CODE = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


@pytest.fixture(scope="module")
def reference(real_model_dir):
    return load_reference(real_model_dir)


@pytest.fixture(scope="module")
def mlx_loaded(real_model_dir):
    from qwen_mlx.backends import load

    return load("mlx", str(real_model_dir), "float32")


def prompts(tokenizer):
    out = {name: tokenizer.encode_chat([{"role": "user", "content": text}]) for name, text in CHATS.items()}
    out["raw code"] = tokenizer.encode(RAW_CODE)
    return out


def test_mlx_float32_greedy_matches_transformers(mlx_loaded, reference):
    from qwen_mlx.backends.base import Session, greedy_tokens

    for name, ids in prompts(mlx_loaded.tokenizer).items():
        want = reference_greedy(reference, ids, N_TOKENS)
        got = greedy_tokens(Session(mlx_loaded.backend), ids, N_TOKENS)
        assert got == want, f"{name}: {mlx_loaded.tokenizer.decode(got)!r} != {mlx_loaded.tokenizer.decode(want)!r}"


def test_cli_generate_reproduces_transformers(real_model_dir, mlx_loaded, reference):
    """The README's one-shot command, end to end, on the Chinese prompt (multi-byte streaming)."""
    from tests.support.cli import run

    ids = prompts(mlx_loaded.tokenizer)["chinese"]
    want = reference_greedy(reference, ids, N_TOKENS)
    tok = mlx_loaded.tokenizer
    eos = [i for i, t in enumerate(want) if t in tok.eos_token_ids]
    want = want[:eos[0]] if eos else want
    want_text = tok.decode(want)
    r = run("generate", "--backend", "mlx", "--model", str(real_model_dir), "--dtype", "float32",
            "--temperature", "0", "--repetition-penalty", "1.0", "--max-tokens", str(N_TOKENS),
            "--prompt", CHATS["chinese"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == want_text + "\n"
    assert json.loads(r.stderr.strip().splitlines()[-1])["generation_tokens"] == len(want)


def test_generate_straight_from_the_gguf(real_model_dir, mlx_loaded, reference):
    """`--model the.gguf` converts once (cached by content) and reproduces transformers' greedy tokens."""
    from qwen_mlx.formats.real_checkpoint import real_gguf
    from tests.support.cli import run

    tok = mlx_loaded.tokenizer
    ids = tok.encode(RAW_CODE)
    want = reference_greedy(reference, ids, N_TOKENS)
    eos = [i for i, t in enumerate(want) if t in tok.eos_token_ids]
    want = want[:eos[0]] if eos else want
    r = run("generate", "--model", str(real_gguf(progress=False)), "--dtype", "float32", "--raw",
            "--temperature", "0", "--repetition-penalty", "1.0", "--max-tokens", str(N_TOKENS), "--prompt", RAW_CODE)
    assert r.returncode == 0, r.stderr
    assert r.stdout == tok.decode(want) + "\n"
