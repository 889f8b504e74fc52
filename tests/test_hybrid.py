"""The hybrid family on MLX (Qwen3-Next, Qwen3.5, Qwen3.5-MoE / Qwen3.6) against HF transformers' own classes,
on tiny random checkpoints saved as the releases are (tests/support/hybrid_models.py): logits of a prompt
that spans several delta-rule chunks and of cached decode steps, greedy tokens, prefill in chunks of any size
== token by token, a cut reply continued == the same transcript prefilled fresh, fused experts, and the
commands a user runs (generate, --kv-bits, --quantize, info) with clear refusals where the family is not
supported yet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.quality.reference import backend_logits, reference_greedy, reference_logits
from qwen_mlx.backends.base import Session, greedy_tokens
from tests.support.cli import run
from tests.support.hybrid_models import HF_CLASSES, HYBRID_CONFIGS, fuse_experts

NAMES = list(HYBRID_CONFIGS)
RNG = np.random.default_rng(7)
PROMPT = RNG.integers(3, 500, size=150).tolist()  # 150 positions: two full chunks of 64 and a padded one
STEPS = RNG.integers(3, 500, size=12).tolist()


@pytest.fixture(scope="module")
def hybrid(hybrid_model):
    """The session's tiny hybrid checkpoints (tests/conftest.py), built once for every module that reads them."""
    return hybrid_model


def _reference(folder: Path):
    import torch
    import transformers

    config = json.loads((folder / "config.json").read_text())
    cls = getattr(transformers, HF_CLASSES[config["model_type"]][1])
    return cls.from_pretrained(folder, dtype=torch.float32).eval()


def _close(got: np.ndarray, want: np.ndarray) -> None:
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max()), np.abs(got - want).max()
    assert got.argmax() == want.argmax()


def _mlx_session(folder: Path, **kw) -> Session:
    from qwen_mlx.backends.mlx import MLXBackend
    from qwen_mlx.checkpoint import prepare_model

    return Session(MLXBackend(prepare_model(str(folder)), "float32", **kw))


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_greedy_equal_transformers(hybrid, name):
    folder = hybrid(name)
    ref = _reference(folder)
    want = reference_logits(ref, PROMPT, STEPS)
    got = backend_logits(_mlx_session(folder), PROMPT, STEPS)
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())
    assert greedy_tokens(_mlx_session(folder), PROMPT[:40], 32) == reference_greedy(ref, PROMPT[:40], 32)


@pytest.mark.parametrize("chunk", [1, 7, 64, 100])
def test_prefill_in_chunks_equals_one_prefill(hybrid, monkeypatch, chunk):
    import qwen_mlx.backends.base as base

    folder = hybrid("next-moe")
    whole = _mlx_session(folder).prefill(PROMPT)
    monkeypatch.setattr(base, "PREFILL_CHUNK", chunk)
    # The same arithmetic in another order (one update per token, or chunks of the parallel form): equal to
    # float32 rounding over 150 positions of recurrence.
    _close(_mlx_session(folder).prefill(PROMPT), whole)


@pytest.mark.parametrize("name", ["next-moe", "q35-tied"])
def test_a_cut_reply_continued_equals_the_transcript_prefilled_fresh(hybrid, name):
    """A recurrent state cannot be trimmed: the session goes back to the end of the last prompt (a mark) and
    re-feeds the kept part of the reply, so the cache ends exactly where the transcript is."""
    folder = hybrid(name)
    session = _mlx_session(folder)
    session.prefill(PROMPT[:60])
    for t in STEPS:  # a reply of 12 tokens, of which the next turn keeps 5 (a stop string cut it)
        session.step(t)
    turn2 = PROMPT[:60] + STEPS[:5] + PROMPT[100:130]
    got = session.prefill(turn2)
    assert session.prefilled == len(turn2) - 60  # back to the mark after the first prompt, not to zero
    _close(got, _mlx_session(folder).prefill(turn2))
    _close(session.step(STEPS[0]), _mlx_session(folder).prefill(turn2 + STEPS[:1]))


def test_experts_stored_fused_load_the_same(hybrid, tmp_path):
    folder = hybrid("q35-moe")
    fused = fuse_experts(folder, tmp_path / "fused")
    assert np.array_equal(_mlx_session(fused).prefill(PROMPT[:30]), _mlx_session(folder).prefill(PROMPT[:30]))


def test_kv_bits_apply_to_the_attention_layers(hybrid):
    folder = hybrid("q35-tied")
    float_logits = _mlx_session(folder).prefill(PROMPT[:40])
    session = _mlx_session(folder, kv_bits=8, kv_group_size=32)
    kinds = {type(c).__name__ for c in session.backend.cache}
    assert kinds == {"RecurrentCache", "QuantizedKVCache"}
    assert np.abs(session.prefill(PROMPT[:40]) - float_logits).max() < 0.05  # 8-bit keys and values only


@pytest.mark.parametrize("name", NAMES)
def test_generate_command_runs(hybrid, name):
    r = run("generate", "--model", str(hybrid(name)), "--prompt", "hello there", "--max-tokens", "8",
            "--temperature", "0")
    assert r.returncode == 0, r.stderr
    r = run("generate", "--model", str(hybrid(name)), "--prompt", "hello", "--max-tokens", "4", "--quantize", "8")
    assert r.returncode == 0, r.stderr


def test_info_counts_linear_attention(hybrid):
    r = run("info", "--model", str(hybrid("next-moe")))
    assert r.returncode == 0, r.stderr
    assert "qwen3_next" in r.stdout and "linear_attention" in r.stdout and "active/token" in r.stdout


@pytest.mark.parametrize("command", [("attention", "--prompt", "hi", "--layers", "0,3", "--out", "{tmp}/x.npz"),
                                     ("attention", "--prompt", "hi", "--dtype", "float64", "--out", "{tmp}/x.npz")])
def test_unsupported_paths_refuse_in_one_line(hybrid, tmp_path, command):
    args = [a.format(tmp=tmp_path) for a in command[1:]]
    r = run(command[0], "--model", str(hybrid("q35-tied")), *args, stdin="a document")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert "qwen3_5" in r.stderr and not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["next-moe", "q35-tied"])
def test_attention_maps_of_the_full_attention_layers_equal_hf_eager(hybrid, name, tmp_path):
    """The full-attention layers' maps equal HF's eager attentions (which records only those layers); the CLI
    draws them by default."""
    import torch
    import transformers

    folder = hybrid(name)
    ids = [(7 * i + 3) % 500 for i in range(40)]
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    cls = getattr(transformers, HF_CLASSES[model_type][1])
    ref = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        want = np.stack([a[0].numpy() for a in ref(torch.tensor([ids]), output_attentions=True).attentions])
    r = run("attention", "--model", str(folder), "--prompt", "x", "--out", str(tmp_path / "a.npz"))
    assert r.returncode == 0, r.stderr
    from qwen_mlx.attention_maps import attention_layers, attention_maps
    from qwen_mlx.checkpoint import prepare_model
    from qwen_mlx.models.load import load_model

    ckpt = prepare_model(str(folder))
    layers = attention_layers(ckpt.args)
    assert list(np.load(tmp_path / "a.npz")["layers"]) == layers == {"next-moe": [1, 3], "q35-tied": [3]}[name]
    got = attention_maps(load_model(ckpt, "float32"), ids, layers, list(range(ckpt.args.num_attention_heads)))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)  # float32 through the delta rule: the logits' 1e-4


def test_engine_batches_rows_each_as_alone_and_reuses_prompts_whole(hybrid):
    """The server's engine on a hybrid model: rows of different lengths decode together, each row's recurrent
    state stacked in the batch, and each gets the greedy tokens it gets alone; a later request starting with
    an earlier prompt, or with a finished conversation, prefills only what follows it (a recurrent state is
    reused whole: a reply the next turn keeps in part goes back to the end of its prompt)."""
    from qwen_mlx.backends import load
    from qwen_mlx.backends.batching import batch_backend
    from qwen_mlx.backends.mlx_batch import HybridBatch
    from qwen_mlx.engine import Done, Engine, Request, Token, run_requests
    from qwen_mlx.sampling import SamplingParams
    from tests.support.engine import Recorder

    folder = hybrid("q35-moe")
    loaded = load("mlx", str(folder), dtype="float32")
    loaded.tokenizer.eos_token_ids = frozenset()
    greedy = SamplingParams(temperature=0.0)
    first = [PROMPT[:50], PROMPT[10:90], PROMPT[40:57], PROMPT[5:40]]
    alone = [greedy_tokens(_mlx_session(folder), p, 10) for p in first]
    second = PROMPT[10:90]
    later = [second + alone[1][:5] + STEPS,  # the reply kept in part: back to the prompt's end
             second + alone[1] + STEPS]      # the whole conversation (its last token was never fed)
    later_alone = [greedy_tokens(_mlx_session(folder), p, 10) for p in later]
    backend = Recorder(batch_backend(loaded.backend, 8))
    assert isinstance(backend.inner, HybridBatch)
    engine = Engine(backend, loaded.tokenizer, prefill_chunk=16).start()
    try:
        events = run_requests(engine, [Request(p, greedy, 10) for p in first])
        events += [run_requests(engine, [Request(p, greedy, 10)])[0] for p in later]
    finally:
        engine.shutdown(0)
    assert max(backend.sizes) > 1  # rows were decoded together
    for ev, want in zip(events, alone + later_alone):
        assert [e.id for e in ev if isinstance(e, Token)] == want
    cached = [ev[-1].cached_tokens for ev in events[4:]]
    assert all(isinstance(ev[-1], Done) for ev in events)
    # the first goes back to the prompt's end; the second reuses the whole conversation (the 9 reply tokens
    # fed, or all 10 when the engine queued the next step before the row finished)
    assert cached[0] == len(second) and cached[1] >= len(second) + 9


def test_prompt_cache_file_holds_the_recurrent_state(hybrid, tmp_path):
    """cache-prompt on a hybrid model writes the linear layers' states beside the attention layers' keys and
    values; a run from the file continues exactly as one that prefilled the document."""
    folder, cache = hybrid("next-moe"), tmp_path / "doc.safetensors"
    doc = "a long document about the weather in many towns " * 8
    r = run("cache-prompt", "--model", str(folder), "--file", "-", "--out", str(cache), stdin=doc)
    assert r.returncode == 0, r.stderr
    args = ("generate", "--model", str(folder), "--max-tokens", "12", "--temperature", "0", "--prompt", "and then")
    cached = run(*args, "--prompt-cache", str(cache))  # the document is the cached system message
    fresh = run(*args, "--system", doc)
    assert cached.returncode == 0 and fresh.returncode == 0, cached.stderr + fresh.stderr
    assert cached.stdout == fresh.stdout


def test_the_conv_window_holds_only_its_own_positions():
    """Regression: the window kept after a prompt chunk was a view of the chunk's whole conv input (8 MiB per
    layer for 512 positions of 4096 channels, where the window is 48 KiB), held as long as the state's marks."""
    import mlx.core as mx

    from qwen_mlx.models.qwen3_next import DepthwiseConv1d

    conv = DepthwiseConv1d(4096, 4)
    mx.eval(conv.parameters())
    base = mx.get_active_memory()
    x = mx.random.normal((1, 512, 4096))
    out, window = conv(x, None)
    mx.eval(out, window)
    del out, x
    assert window.shape == (1, 3, 4096) and mx.get_active_memory() - base < 2 * window.nbytes
