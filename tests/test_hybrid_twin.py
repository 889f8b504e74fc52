"""The hybrid family's PyTorch twin (export/models/qwen3_next.py) against HF transformers' own classes, on the tiny
checkpoints saved as the releases are (tests/support/hybrid_models.py): logits of a prompt spanning several
delta-rule chunks and of cached decode steps, greedy tokens, a prompt then decode steps through the returned
state == one pass, left padding == the row alone, a cut reply continued, fused experts, an mlx-lm quantized folder,
`generate --backend torch` (MLX's text) and the engine batching rows on the twin."""

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


def _reference(folder: Path):
    import torch
    import transformers

    config = json.loads((folder / "config.json").read_text())
    cls = getattr(transformers, HF_CLASSES[config["model_type"]][1])
    return cls.from_pretrained(folder, dtype=torch.float32).eval()


def _backend(folder: Path):
    from export.backends.torch import TorchBackend
    from qwen_mlx.checkpoint import prepare_model

    return TorchBackend(prepare_model(str(folder)), "float32")


def _tolerance(want: np.ndarray) -> float:
    return 1e-4 * max(1.0, float(np.abs(want).max()))  # float32 through 150 positions of recurrence


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_greedy_equal_transformers(hybrid_model, name):
    folder = hybrid_model(name)
    ref = _reference(folder)
    want = reference_logits(ref, PROMPT, STEPS)
    got = backend_logits(Session(_backend(folder)), PROMPT, STEPS)
    assert np.abs(got - want).max() < _tolerance(want)
    assert greedy_tokens(Session(_backend(folder)), PROMPT[:40], 32) == reference_greedy(ref, PROMPT[:40], 32)


@pytest.mark.parametrize("name", ["next-moe", "q35-tied"])
def test_prompt_then_decode_through_the_state_equals_one_pass(hybrid_model, name):
    """The twin's own forward: the prompt (chunked form), then one token at a time through the returned windows,
    states and keys (recurrent form), gives the logits of the whole sequence in one pass."""
    import torch

    model = _backend(hybrid_model(name)).model
    model.last_only = False
    ids = torch.tensor([PROMPT + STEPS])
    T, P = ids.shape[1], len(PROMPT)
    with torch.no_grad():
        whole, _ = model(ids, torch.ones_like(ids), torch.arange(T)[None], model.empty_cache())
        logits, past = model(ids[:, :P], torch.ones(1, P, dtype=torch.int64), torch.arange(P)[None],
                             model.empty_cache())
        rows = [logits[0, -1]]
        for t in range(P, T - 1):
            logits, past = model(ids[:, t:t + 1], torch.ones(1, t + 1, dtype=torch.int64), torch.tensor([[t]]), past)
            rows.append(logits[0, -1])
    want = whole[0, P - 1:T - 1].numpy()
    np.testing.assert_allclose(torch.stack(rows).numpy(), want, atol=_tolerance(want), rtol=0)


def test_left_padding_equals_the_row_alone(hybrid_model):
    """A shorter row padded on the left (attention_mask 0) gets its logits alone: padded positions reach neither a
    linear layer's state nor an attention layer's keys."""
    import torch

    model = _backend(hybrid_model("q35-moe")).model
    model.last_only = False
    long, short = PROMPT[:70], PROMPT[100:130]
    pad = len(long) - len(short)
    ids = torch.tensor([long, [0] * pad + short])
    mask = torch.tensor([[1] * len(long), [0] * pad + [1] * len(short)])
    pos = torch.tensor([list(range(len(long))), [0] * pad + list(range(len(short)))])
    with torch.no_grad():
        both, _ = model(ids, mask, pos, model.empty_cache(2))
        alone, _ = model(torch.tensor([short]), torch.ones(1, len(short), dtype=torch.int64),
                         torch.arange(len(short))[None], model.empty_cache())
    # the same arithmetic in other chunks (the padded row's chunks start 40 positions earlier)
    np.testing.assert_allclose(both[1, pad:].numpy(), alone[0].numpy(), atol=_tolerance(alone.numpy()), rtol=0)


def test_a_cut_reply_continued_equals_the_transcript_prefilled_fresh(hybrid_model):
    """The session goes back to the mark at the end of the last prompt and re-feeds the kept part of the reply."""
    folder = hybrid_model("next-moe")
    session = Session(_backend(folder))
    session.prefill(PROMPT[:60])
    for t in STEPS:
        session.step(t)
    turn2 = PROMPT[:60] + STEPS[:5] + PROMPT[100:130]
    got = session.prefill(turn2)
    assert session.prefilled == len(turn2) - 60
    want = Session(_backend(folder)).prefill(turn2)
    assert np.abs(got - want).max() < _tolerance(want) and got.argmax() == want.argmax()


def test_experts_stored_fused_load_the_same(hybrid_model, tmp_path):
    folder = hybrid_model("q35-moe")
    fused = fuse_experts(folder, tmp_path / "fused")
    assert np.array_equal(Session(_backend(fused)).prefill(PROMPT[:30]), Session(_backend(folder)).prefill(PROMPT[:30]))


@pytest.mark.parametrize("name", NAMES)
def test_generate_command_on_the_torch_backend_prints_the_mlx_text(hybrid_model, name):
    args = ("generate", "--model", str(hybrid_model(name)), "--prompt", "hello there", "--max-tokens", "8",
            "--temperature", "0")
    torch_run, mlx_run = run(*args, "--backend", "torch"), run(*args, "--backend", "mlx")
    assert torch_run.returncode == 0 and mlx_run.returncode == 0, torch_run.stderr + mlx_run.stderr
    assert torch_run.stdout == mlx_run.stdout


@pytest.mark.parametrize("name", ["next-moe", "q35-moe"])
def test_an_mlx_lm_quantized_folder_runs_as_on_mlx(hybrid_model, tmp_path, name):
    """`convert --quantize 4` writes mlx-lm's layout (C K 1 conv, norms stored as 1 + w, packed weights, stacked
    `switch_mlp` experts); the twin dequantizes it exactly and undoes the layout: MLX's logits on the same folder."""
    from qwen_mlx.backends.mlx import MLXBackend
    from qwen_mlx.checkpoint import prepare_model

    out = tmp_path / "q4"
    r = run("convert", "--model", str(hybrid_model(name)), "--out", str(out), "--quantize", "4")
    assert r.returncode == 0, r.stderr
    want = Session(MLXBackend(prepare_model(str(out)), "float32")).prefill(PROMPT[:80])
    got = Session(_backend(out)).prefill(PROMPT[:80])
    assert np.abs(got - want).max() < _tolerance(want) and got.argmax() == want.argmax()


def test_engine_batches_torch_rows_each_as_alone_and_reuses_prompts_whole(hybrid_model):
    """The server's engine on the twin: rows of different lengths decode together (windows and states stacked, keys
    and values left-padded), each with its greedy tokens alone; a later request starting with an earlier prompt
    prefills only what follows it (a recurrent state is reused whole)."""
    from export.backends.torch_hybrid_batch import TorchHybridBatch
    from qwen_mlx.backends import load
    from tests.support.engine import assert_hybrid_rows_batch_as_alone

    folder = hybrid_model("next-moe")
    loaded = load("torch", str(folder), dtype="float32")
    assert_hybrid_rows_batch_as_alone(loaded, lambda: Session(_backend(folder)), TorchHybridBatch, PROMPT, STEPS)
