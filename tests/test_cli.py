"""The command line as a user runs it: real subprocesses on a tiny checkpoint, and every bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cli import ROOT, run


def test_generate_prints_text_then_a_stats_line(tiny_model):
    folder = str(tiny_model("gqa2-untied"))
    r = run("generate", "--model", folder, "--prompt", "Hello there", "--temperature", "0", "--max-tokens", "12")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stderr.strip().splitlines()[-1])
    assert set(stats) == {"prompt_tokens", "prompt_tps", "generation_tokens", "generation_tps", "peak_memory_gb"}
    assert 0 < stats["generation_tokens"] <= 12
    # the same text from the library, and from stdin with --prompt -
    from qwen_mlx.backends import load
    from qwen_mlx.backends.base import Session, greedy_tokens

    loaded = load("mlx", folder, "float32")
    ids = loaded.tokenizer.encode_chat([{"role": "user", "content": "Hello there"}])
    reply = greedy_tokens(Session(loaded.backend), ids, 12)  # the plain greedy loop, no engine
    ends = [i for i, t in enumerate(reply) if t in loaded.tokenizer.eos_token_ids]
    text = loaded.tokenizer.decode(reply[:ends[0]] if ends else reply)
    assert r.stdout == text + "\n"
    r2 = run("generate", "--model", folder, "--prompt", "-", "--temperature", "0", "--max-tokens", "12",
             stdin="Hello there")
    assert r2.stdout == r.stdout


def test_raw_prompt_skips_the_chat_template(tiny_model):
    folder = str(tiny_model("gqa2-untied"))
    r = run("generate", "--model", folder, "--raw", "--prompt", "def add(a, b):", "--temperature", "0",
            "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stderr.strip().splitlines()[-1])["prompt_tokens"] < 10


def test_info(tiny_model):
    r = run("info", "--model", str(tiny_model("gqa4-tied")))
    assert r.returncode == 0, r.stderr
    assert "tied" in r.stdout and "attention" in r.stdout and "4-bit" in r.stdout


def test_chat_session_through_stdin(tiny_model):
    r = run("chat", "--model", str(tiny_model("gqa2-untied")), "--max-tokens", "6", "--temperature", "0",
            stdin="Hi!\nHow are you?\n/reset\nHello again\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "(conversation forgotten)" in r.stderr and r.stderr.count("prompt tokens") == 3


def test_chat_transcript_is_what_transformers_renders(tiny_model, monkeypatch):
    """The KV cache holds exactly HF's rendering of the conversation, each turn prefilling only new text."""
    import io

    from transformers import AutoTokenizer

    from qwen_mlx.backends import load
    from qwen_mlx.chat import run_chat
    from qwen_mlx.backends.mlx_batch import MLXBatch
    from qwen_mlx.sampling import SamplingParams

    folder = tiny_model("gqa2-untied")
    lines = iter(["My name is Ada.", "What is my name?", "/exit"])
    loaded = load("mlx", str(folder), "float32")
    starts = []  # (prompt tokens, cached tokens) of each turn
    real_start = MLXBatch.start

    def start(self, prompt):
        seq, cached = real_start(self, prompt)
        starts.append((len(prompt), cached))
        return seq, cached

    monkeypatch.setattr(MLXBatch, "start", start)
    messages, engine = run_chat(loaded, SamplingParams(temperature=0), 8, system="Be brief.",
                                read=lambda _: next(lines), out=io.StringIO(), err=io.StringIO())
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    hf = AutoTokenizer.from_pretrained(folder)
    want = hf.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    want_ids = hf(want, add_special_tokens=False)["input_ids"]
    held, _ = engine.backend.prefixes.entries[-1]  # what the cache held when the last reply ended
    assert held[:len(want_ids)].tolist() == want_ids and len(held) > len(want_ids)
    assert starts[0][1] == 0 and starts[1][1] >= starts[0][0]  # the second turn reused the whole first prompt


BAD_CONFIG = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "intermediate_size": 8,
              "num_attention_heads": 2, "vocab_size": 10}


def _copy(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


def _bad_models(tiny: Path, tmp: Path):
    """name -> (folder maker, expected words in the error line)."""
    def no_config():
        d = _copy(tiny, tmp); (d / "config.json").unlink(); return d

    def no_weights():
        d = _copy(tiny, tmp); (d / "model.safetensors").unlink(); return d

    def no_tokenizer():
        d = _copy(tiny, tmp); (d / "tokenizer.json").unlink(); return d

    def corrupt_json():
        d = _copy(tiny, tmp); (d / "config.json").write_text("{oops"); return d

    def other_model_type():
        d = _copy(tiny, tmp); (d / "config.json").write_text(json.dumps(BAD_CONFIG)); return d

    def truncated_weights():
        d = _copy(tiny, tmp); w = d / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2]); return d

    def corrupt_weights():
        d = _copy(tiny, tmp); (d / "model.safetensors").write_bytes(b"\xff" * 64); return d

    def pickle_only():
        d = _copy(tiny, tmp); (d / "model.safetensors").unlink(); (d / "pytorch_model.bin").write_bytes(b"x")
        return d

    def wrong_shapes():
        d = _copy(tiny, tmp); cfg = json.loads((d / "config.json").read_text())
        cfg["intermediate_size"] += 8; (d / "config.json").write_text(json.dumps(cfg)); return d

    return {
        "missing path": (lambda: tmp / "nope", "no such file or folder"),
        "no config.json": (no_config, "no config.json"),
        "no weights": (no_weights, "no weights"),
        "no tokenizer": (no_tokenizer, "tokenizer.json"),
        "corrupt JSON": (corrupt_json, "corrupt JSON"),
        "unsupported model_type": (other_model_type, "unsupported model_type 'llama'"),
        "truncated safetensors": (truncated_weights, "truncated"),
        "corrupt safetensors": (corrupt_weights, "corrupt"),
        "pickle-only": (pickle_only, "pickle"),
        "wrong shapes": (wrong_shapes, "do not match config.json"),
    }


@pytest.mark.parametrize("case", list(_bad_models(Path("."), Path("."))))
def test_bad_model_gets_one_clear_line(tiny_model, tmp_path, case):
    make, words = _bad_models(tiny_model("gqa2-untied"), tmp_path)[case]
    r = run("generate", "--model", str(make()), "--prompt", "hi", "--max-tokens", "2")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: ") and words in r.stderr, r.stderr


@pytest.mark.parametrize("flags,words", [
    (["--max-tokens", "-1"], "--max-tokens"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--backend", "tpu"], "'tpu' is not one of 'auto', 'mlx', 'torch', 'onnx'"),
    (["--dtype", "int3"], "--dtype"),
])
def test_bad_flags_get_one_clear_line(tiny_model, flags, words):
    r = run("generate", "--model", str(tiny_model("gqa2-untied")), "--prompt", "hi", *flags)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert words in r.stderr


def test_hub_unreachable_is_one_line():
    r = run("info", "--model", "nobody/no-such-model")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "Hugging Face Hub" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_empty_stop_string_is_refused(tiny_model):
    """Regression (issue 7): `--stop ""` made the print hold-back negative and truncated the reply."""
    r = run("generate", "--model", str(tiny_model("gqa2-untied")), "--prompt", "hi", "--stop", "")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: --stop") and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_failed_chat_turn_keeps_the_conversation(tiny_model, monkeypatch):
    """Regression (issue 7): any exception in a turn ended chat with a traceback and lost the conversation."""
    import io

    from qwen_mlx.backends import load
    from qwen_mlx.chat import run_chat
    from qwen_mlx.backends.mlx_batch import MLXBatch
    from qwen_mlx.sampling import SamplingParams

    loaded = load("mlx", str(tiny_model("gqa2-untied")), "float32")
    real_prefill, calls = MLXBatch.prefill, []

    def flaky(self, seq, tokens):
        calls.append(len(tokens))
        if len(calls) == 2:  # the second turn's prefill
            raise RuntimeError("device lost\nsecond line")
        return real_prefill(self, seq, tokens)

    monkeypatch.setattr(MLXBatch, "prefill", flaky)
    lines = iter(["My name is Ada.", "What is my name?", "Still there?", "/exit"])
    err = io.StringIO()
    messages, engine = run_chat(loaded, SamplingParams(temperature=0), 2, read=lambda _: next(lines),
                                out=io.StringIO(), err=err)
    errors = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
    assert errors == ["error: RuntimeError: device lost second line (the conversation is kept)"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["My name is Ada.", "Still there?"]
    assert err.getvalue().count("prompt tokens") == 2  # the stats line of each turn that worked
    held, _ = engine.backend.prefixes.entries[-1]
    prompt = loaded.tokenizer.encode_chat(messages[:-1])
    assert held[:len(prompt)].tolist() == prompt


def test_dual_chunk_attention_runs_says_so_and_is_not_exported(tiny_model, tmp_path):
    """A config with dual_chunk_attention_config (chunks of 12 tokens): `info` says DCA is active and the
    whole context it reaches; `generate` runs a prompt across several chunks; the ONNX export refuses."""
    folder = str(tiny_model("dca"))
    r = run("info", "--model", folder)
    assert r.returncode == 0 and "context 1024" in r.stdout, r.stdout
    assert "Dual Chunk Attention: chunks of 12 tokens" in r.stdout and "active" in r.stdout, r.stdout
    r = run("generate", "--model", folder, "--raw", "--prompt", "word " * 40, "--max-tokens", "4",
            "--temperature", "0")
    assert r.returncode == 0, r.stderr
    r = run("export-onnx", "--model", folder, "--out", str(tmp_path / "onnx"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Dual Chunk Attention" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "onnx").exists()


def test_an_unexpected_exception_is_one_line_and_a_saved_traceback(tiny_model, monkeypatch, tmp_path, capsys):
    """A bug anywhere in a command: one `error: internal error: ...` line naming the file that holds the
    traceback (under the cache folder), and a non-zero exit; never a traceback on the terminal."""
    import qwen_mlx.report
    from cli import main

    def broken(ckpt):
        raise RuntimeError("something the code did not expect")

    folder = tiny_model("gqa2-untied")
    monkeypatch.setattr(qwen_mlx.report, "model_report", broken)
    monkeypatch.setenv("QWEN_MLX_CACHE", str(tmp_path))
    capsys.readouterr()  # what building the tiny model printed
    assert main(["info", "--model", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: internal error: RuntimeError: something the code did not expect (a bug")
    (saved,) = (tmp_path / "errors").iterdir()
    assert str(saved) in err and "Traceback" in saved.read_text() and "model_report" not in err


def _run_bytes(*args: bytes, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """cli.py with arguments and standard input as raw bytes (not valid UTF-8, as a user's file may be)."""
    env = dict(os.environ, QWEN_MLX_QUIET="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], input=stdin, capture_output=True,
                          env=env, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("command, stdin, names", [
    ([b"generate", b"--prompt", b"-"], b"caf\xe9", "--prompt -: standard input"),
    ([b"generate", b"--prompt", b"caf\xe9"], b"", "--prompt"),
    ([b"generate", b"--prompt", b"hi", b"--system", b"\xff"], b"", "--system"),
    ([b"generate", b"--prompt", b"hi", b"--stop", b"\xff"], b"", "--stop"),
    ([b"attention", b"--prompt", b"-", b"--out", b"{tmp}/a.npz"], b"\xff", "--prompt -: standard input"),
    ([b"cache-prompt", b"--file", b"-", b"--out", b"{tmp}/c.safetensors"], b"\xffdoc", "--file -: standard input"),
    ([b"cache-prompt", b"--file", b"{tmp}/doc.txt", b"--out", b"{tmp}/c.safetensors"], b"", "--file"),
])
def test_text_that_is_not_utf8_is_one_line_naming_the_input(tiny_model, tmp_path, command, stdin, names):
    """Issue 27: bytes that are not UTF-8, wherever a user's text comes in, end in one line naming that input
    (not a traceback, not an 'internal error'), and nothing is written."""
    (tmp_path / "doc.txt").write_bytes(b"a document \xff\xfe")
    args = [a.replace(b"{tmp}", str(tmp_path).encode()) for a in command]
    r = _run_bytes(*args[:1], b"--model", str(tiny_model("gqa2-untied")).encode(), *args[1:], stdin=stdin)
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {names}") and "not valid UTF-8" in err and "internal" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.txt"]


def test_a_chat_line_that_is_not_utf8_keeps_the_conversation(tiny_model):
    r = _run_bytes(b"chat", b"--model", str(tiny_model("gqa2-untied")).encode(), b"--max-tokens", b"2",
                   stdin=b"hi\n\xff\xfe\nagain\n/exit\n")
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "error: that message is not valid UTF-8 text (byte 0xff at character 0)" in err
    assert err.count("prompt tokens") == 2  # the turns before and after it both ran


@pytest.mark.parametrize("command", [
    ("convert", "--quantize", "4", "--out", "{out}"),
    ("export-onnx", "--dtypes", "fp32", "--out", "{out}"),
    ("cache-prompt", "--file", "README.md", "--out", "{out}.safetensors"),
    ("attention", "--prompt", "hi", "--out", "{out}.npz"),
])
@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_an_output_that_cannot_be_written_is_refused_first(tiny_model, tmp_path, command, where):
    """Issue 27: an output path whose folder cannot be made or written: one line naming it and why, before
    the model is even loaded; nothing is left behind."""
    if where == "proc" and not Path("/proc/self").exists():
        pytest.skip("no /proc here")
    (tmp_path / "file").write_text("a file, not a folder")
    out = str(tmp_path / "file" / "sub") if where == "under-a-file" else "/proc/qwen-mlx-test"
    args = [a.format(out=out) for a in command]
    r = run(args[0], "--model", str(tiny_model("gqa2-untied")), *args[1:])
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: cannot write {out}"), r.stderr
    assert ("is not a folder" if where == "under-a-file" else "is not writable") in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_cache_folder_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    env = dict(os.environ, QWEN_MLX_QUIET="1", QWEN_MLX_CACHE=str(tmp_path / "file" / "cache"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "generate", "--model", str(tmp_path / "m.gguf"),
                        "--prompt", "hi"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: ") and "QWEN_MLX_CACHE" in r.stderr, r.stderr


def test_a_reader_that_stops_early_ends_the_command_quietly(tiny_model):
    """`cli.py generate ... | head -c 1`: the pipe closes mid-reply; no traceback, no "Exception ignored"."""
    env = dict(os.environ, QWEN_MLX_QUIET="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "generate", "--backend", "mlx", "--model",
                             str(tiny_model("gqa2-untied")), "--prompt", "Hello", "--max-tokens", "900", "--seed", "0",
                             "--temperature", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    assert proc.stdout.read(1)
    proc.stdout.close()  # as `head -c 1` does after its byte
    err = proc.stderr.read().decode()
    # quiet, non-zero (click's handling, as Python's documentation advises), so `set -o pipefail` sees it
    assert proc.wait(timeout=120) == 1 and err == "", err
