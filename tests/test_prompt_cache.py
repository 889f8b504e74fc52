"""Saved prompt caches: a reloaded cache gives the logits of prefilling the text; foreign caches are refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.support.cli import run


def _loaded(folder, dtype="float32", quantize=None):
    from qwen_mlx.backends import load
    return load("mlx", str(folder), dtype, quantize)


@pytest.mark.parametrize("name", ["gqa2-untied", "qwen3-untied", "qwen3moe-norm"])
def test_reloaded_cache_gives_the_logits_of_prefilling(tiny_model, tmp_path, name):
    from qwen_mlx.backends.base import Session
    from qwen_mlx.prompt_cache import load_prompt_cache, save_prompt_cache

    folder = tiny_model(name)
    doc = [(11 * i + 5) % 500 for i in range(200)]  # the reloaded buffers are exactly full, so they regrow
    rest = [7, 8, 9, 10]
    path = tmp_path / "doc.safetensors"
    save_prompt_cache(path, _loaded(folder), doc)

    fresh = _loaded(folder)  # a new process's view: nothing cached yet
    cached = load_prompt_cache(path, fresh)
    assert cached.tokens == doc and cached.system is None
    session = Session(fresh.backend, tokens=list(cached.tokens))
    got = session.prefill(doc + rest)
    assert session.prefilled == len(rest)  # only what follows the cached prompt ran
    got_next = session.step(3)

    ref_session = Session(_loaded(folder).backend)
    ref = ref_session.prefill(doc + rest)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_next, ref_session.step(3), atol=1e-5, rtol=0)


def test_foreign_caches_are_refused(tiny_model, tmp_path):
    from qwen_mlx.errors import QwenError
    from qwen_mlx.prompt_cache import check_prefix, load_prompt_cache, save_prompt_cache

    folder = tiny_model("gqa2-untied")
    path = tmp_path / "doc.safetensors"
    save_prompt_cache(path, _loaded(folder), list(range(20)))

    with pytest.raises(QwenError, match="another model"):
        load_prompt_cache(path, _loaded(tiny_model("mha-tied")))
    with pytest.raises(QwenError, match=r"another dtype \(float32, this run: bfloat16\)"):
        load_prompt_cache(path, _loaded(folder, "bfloat16"))
    q_folder = tiny_model("gqa4-tied")  # every width a multiple of 64: 8-bit quantization applies
    q_path = tmp_path / "q.safetensors"
    save_prompt_cache(q_path, _loaded(q_folder), list(range(20)))
    with pytest.raises(QwenError, match=r"another --quantize \(None, this run: 8\)"):
        load_prompt_cache(q_path, _loaded(q_folder, quantize="8"))

    # the same weights beside another tokenizer.json
    other = tmp_path / "other-tokenizer"
    shutil.copytree(folder, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    (other / "tokenizer.json").write_text(json.dumps(tok, indent=1))
    with pytest.raises(QwenError, match="another tokenizer"):
        load_prompt_cache(path, _loaded(other))

    (tmp_path / "junk.safetensors").write_bytes(b"not a cache")
    with pytest.raises(QwenError, match="cannot read the prompt cache"):
        load_prompt_cache(tmp_path / "junk.safetensors", _loaded(folder))

    check_prefix([1, 2], [1, 2, 3])
    with pytest.raises(QwenError, match="does not start with the cached prompt's 2 tokens"):
        check_prefix([1, 2], [1, 5, 3])


def test_cli_cache_prompt_then_generate_and_chat(tiny_model, tmp_path):
    folder = str(tiny_model("gqa2-untied"))
    doc = tmp_path / "doc.txt"
    doc.write_text("The quick brown fox jumps over the lazy dog. " * 3)
    cache = tmp_path / "doc.safetensors"
    r = run("cache-prompt", "--model", folder, "--file", str(doc), "--out", str(cache))
    assert r.returncode == 0, r.stderr
    gen = ["generate", "--model", folder, "--prompt", "Who jumps?", "--temperature", "0", "--max-tokens", "8"]
    # the cache holds the document as the system message; the same transcript without the cache
    plain = run(*gen, "--system", doc.read_text())
    cached = run(*gen, "--prompt-cache", str(cache))
    assert plain.returncode == 0 and cached.returncode == 0, cached.stderr
    assert cached.stdout == plain.stdout
    full = json.loads(plain.stderr.strip().splitlines()[-1])["prompt_tokens"]
    assert json.loads(cached.stderr.strip().splitlines()[-1])["prompt_tokens"] == full

    chat = run("chat", "--model", folder, "--prompt-cache", str(cache), "--temperature", "0", "--max-tokens", "8",
               stdin="Who jumps?\n")
    assert chat.returncode == 0, chat.stderr
    assert plain.stdout.strip() in chat.stdout

    # raw caches: the prompt must start with the cached text's tokens
    raw = tmp_path / "raw.safetensors"
    assert run("cache-prompt", "--model", folder, "--file", str(doc), "--raw", "--out", str(raw)).returncode == 0
    ok = run("generate", "--model", folder, "--raw", "--prompt", doc.read_text() + "Who", "--prompt-cache",
             str(raw), "--max-tokens", "2")
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("args, message", [
    (["generate", "--prompt", "Hi", "--raw"], "does not start with the cached prompt's"),
    (["generate", "--prompt", "Hi", "--backend", "torch"], "--prompt-cache works with the mlx backend only"),
    (["generate", "--prompt", "Hi", "--dtype", "bfloat16"], "was made with another dtype"),
    (["chat", "--system", "something else"], "does not start with the cached prompt's"),
])
def test_cli_refusals(tiny_model, tmp_path, args, message):
    folder = str(tiny_model("gqa2-untied"))
    doc = tmp_path / "doc.txt"
    doc.write_text("A document to cache.")
    cache = tmp_path / "doc.safetensors"
    assert run("cache-prompt", "--model", folder, "--file", str(doc), "--out", str(cache)).returncode == 0
    r = run(*args, "--model", folder, "--prompt-cache", str(cache), stdin="")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and message in lines[-1], r.stderr
    assert not any("Traceback" in line for line in lines)


def test_cli_cache_prompt_refuses_other_backends(tiny_model, tmp_path):
    r = run("cache-prompt", "--model", str(tiny_model("gqa2-untied")), "--backend", "onnx", "--file", "x",
            "--out", str(tmp_path / "c"))
    assert r.returncode == 2 and r.stderr.strip() == "error: --prompt-cache works with the mlx backend only, not onnx"
