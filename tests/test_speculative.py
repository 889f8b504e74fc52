"""Speculative decoding (qwen_mlx/engine/speculative.py) is exact: greedy tokens are the same with and without
each drafter on every architecture (dense, MoE, Qwen3, the hybrid family, the one-cache path of --kv-bits and
dynamic RoPE), whether drafts are all kept (a model drafting for itself), mostly rejected (another model, the
prompt lookup on a random model) or cut by the end of the reply; the cache it leaves is the one a plain run
leaves; sampled tokens keep their distribution (a binomial bound); and the policy pauses a drafter that does
not pay."""

from __future__ import annotations

import collections
import io
from contextlib import redirect_stderr

import numpy as np
import pytest

from qwen_mlx.engine import Done, Request, Token, local_engine
from qwen_mlx.engine.speculative import DraftModel, Speculation, Speculator
from qwen_mlx.sampling import Sampler, SamplingParams

GREEDY = SamplingParams(temperature=0)
RNG = np.random.default_rng(3)
BASE = RNG.integers(3, 400, size=20).tolist()
PROMPT = BASE * 3  # repeats: the prompt lookup finds n-grams to copy

ARCHS = [("tiny", "gqa2-untied", {}), ("tiny", "qwen3moe-norm", {}), ("tiny", "qwen3-untied", {}),
         ("tiny", "dca", {}), ("tiny", "kv-head64", {"kv_bits": 8}), ("hybrid", "q35-tied", {}),
         ("hybrid", "next-moe", {}), ("hybrid", "q35-tied", {"kv_bits": 8, "kv_group_size": 32})]


def _load(folder, **kw):
    from qwen_mlx.backends import load

    loaded = load("mlx", str(folder), "float32", **kw)
    loaded.tokenizer.eos_token_ids = frozenset()  # fixed-length greedy runs on a random model
    return loaded


def _draft(folder, **kw) -> DraftModel:
    from qwen_mlx.backends.base import Session

    return DraftModel(Session(_load(folder, **kw).backend))


def _run(engine, prompt, speculation=None, max_tokens=24, params=GREEDY, stop=()) -> tuple[list[int], Done]:
    tokens, done = [], None
    for event in engine.stream(Request(list(prompt), params, max_tokens, tuple(stop), speculation=speculation)):
        if isinstance(event, Token):
            tokens.append(event.id)
        else:
            done = event
    return tokens, done


@pytest.fixture(scope="module")
def folders(tiny_model, hybrid_model):
    return lambda kind, name: (tiny_model if kind == "tiny" else hybrid_model)(name)


@pytest.mark.parametrize("kind, name, kw", ARCHS, ids=[f"{n}{'-kv8' if kw else ''}" for _, n, kw in ARCHS])
def test_greedy_tokens_are_the_same_with_every_drafter(folders, tiny_model, kind, name, kw):
    loaded = _load(folders(kind, name), **kw)
    engine = local_engine(loaded.backend, loaded.tokenizer)
    engine.drafters["self"] = _draft(folders(kind, name), **kw)  # drafts every token right
    engine.drafters["other"] = _draft(tiny_model("gqa4-tied"))  # another model: drafts mostly wrong
    plain, _ = _run(engine, PROMPT)
    for method in ("prompt-lookup", "self", "other"):
        for k in (1, 3, 8):
            speculation = Speculation("draft-model" if method != "prompt-lookup" else method, k)
            engine.drafters["draft-model"] = engine.drafters.get(method)
            got, done = _run(engine, PROMPT, speculation)
            assert got == plain, (method, k)
            assert done.draft_tokens > 0 or method == "prompt-lookup"  # a random reply may repeat nothing
            if method == "self":
                assert done.accepted_tokens == done.draft_tokens, (k, done)
            if method == "other":
                assert done.accepted_tokens < done.draft_tokens / 2, (k, done)


@pytest.mark.parametrize("kind, name", [("tiny", "gqa2-untied"), ("hybrid", "q35-tied"), ("hybrid", "next-moe")])
def test_a_reply_that_ends_inside_the_drafts_leaves_the_cache_a_plain_run_leaves(folders, kind, name, monkeypatch):
    """Drafts of 8 from the first step, every one kept, and replies that end after 5 tokens (max_tokens), at a
    stop string, or at an end-of-text token in the middle of a step: the next turn, which reuses the cached
    conversation, gives the tokens a fresh engine gives."""
    monkeypatch.setattr(Speculator, "first_plain_steps", 0)
    folder = folders(kind, name)
    loaded = _load(folder)
    plain, _ = _run(local_engine(loaded.backend, loaded.tokenizer), PROMPT, max_tokens=12)
    text = loaded.tokenizer.decode(plain[:7])
    for end in ("max_tokens", "stop", "eos"):
        loaded = _load(folder)
        engine = local_engine(loaded.backend, loaded.tokenizer)
        engine.drafters["draft-model"] = _draft(folder)
        kw = {"max_tokens": 5} if end == "max_tokens" else {"stop": (text[-3:],)} if end == "stop" else {}
        if end == "eos":
            loaded.tokenizer.eos_token_ids = frozenset({plain[6]})
        reply, done = _run(engine, PROMPT, Speculation("draft-model", 8), **kw)
        assert done.accepted_tokens >= 3 and reply == plain[:len(reply)] and len(reply) < 9, (end, done)
        loaded.tokenizer.eos_token_ids = frozenset()
        turn = PROMPT + reply + BASE[:5]
        again, done = _run(engine, turn, max_tokens=8)
        assert done.cached_tokens > len(PROMPT) - 2, end  # the conversation was reused
        fresh = _load(folder)
        assert again == _run(local_engine(fresh.backend, fresh.tokenizer), turn, max_tokens=8)[0], end


def _sharpened(folder, tmp_path):
    """A copy of an untied model with its output layer scaled by 4: a draft model that ranks tokens as the
    target does, with much sharper distributions (what a wrong verification rule would let through)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    out = tmp_path / "sharpened"
    shutil.copytree(folder, out)
    for path in out.glob("*.safetensors"):
        weights = load_file(path)
        weights = {k: v * 4 if k == "lm_head.weight" else v for k, v in weights.items()}
        save_file(weights, path, metadata={"format": "pt"})
    return out


def test_sampled_tokens_keep_their_distribution(tiny_model, monkeypatch, tmp_path):
    """Seeded sampling (temperature 2, top-k 2) of 3 tokens, 200 times with a draft model whose distributions
    are much sharper than the target's and 200 times without: the second token (a kept or redrawn draft) and the third (one after a kept draft, or
    a plain step's) have each value as often within a binomial bound. This checks the engine's plumbing (each
position's history, the drafts' distributions); the rule itself is checked with far more draws below."""
    monkeypatch.setattr(Speculator, "first_plain_steps", 0)
    loaded = _load(tiny_model("gqa2-untied"))
    engine = local_engine(loaded.backend, loaded.tokenizer)
    engine.drafters["draft-model"] = _draft(_sharpened(tiny_model("gqa2-untied"), tmp_path))
    n, counts = 200, {False: collections.Counter(), True: collections.Counter()}
    drafted = accepted = 0
    for spec in (False, True):
        for seed in range(n):
            params = SamplingParams(temperature=2.0, top_k=2, seed=seed)
            tokens, done = _run(engine, BASE, Speculation("draft-model", 2) if spec else None, 3, params)
            counts[spec].update([(1, tokens[1]), (2, tokens[2])])
            if spec:
                drafted, accepted = drafted + done.draft_tokens, accepted + done.accepted_tokens
    assert 0 < accepted < drafted  # some drafts kept, some redrawn: both branches of the rule ran
    for token in set(counts[False]) | set(counts[True]):
        p = (counts[False][token] + counts[True][token]) / (2 * n)
        bound = 4.5 * np.sqrt(p * (1 - p) * 2 / n) + 1 / n
        assert abs(counts[False][token] - counts[True][token]) / n <= bound, (token, counts)


@pytest.mark.parametrize("greedy", [False, True])
def test_the_verification_rule_keeps_the_target_distribution(greedy):
    """Sampler.verify alone: drafts drawn from q, each kept or redrawn; the tokens that come out follow p
    (the sampler's own distribution) within 4.5 standard deviations, for a random q and a one-hot q."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=12).astype(np.float32) * 2
    params = SamplingParams(temperature=0 if greedy else 0.8, top_p=0.95, seed=1)
    sampler = Sampler(params)
    if greedy:
        assert all(sampler.verify(logits, (), d) == int(np.argmax(logits)) for d in range(12))
        return
    ids, w = sampler.distribution(logits)
    p = np.zeros(12)
    p[ids if ids is not None else slice(None)] = w / w.sum()
    q = rng.dirichlet(np.ones(12))
    n = 20000
    for probs in (q, None):
        seen = np.zeros(12)
        for _ in range(n):
            d = int(rng.choice(12, p=q)) if probs is not None else 3
            seen[sampler.verify(logits, (), d, probs)] += 1
        assert np.all(np.abs(seen / n - p) <= 4.5 * np.sqrt(p * (1 - p) / n) + 1e-9), (seen / n, p)


def test_the_policy_pauses_a_drafter_that_does_not_pay():
    spec = Speculator(drafter=None, k=8)
    assert [spec.active() for _ in range(3)] == [False, False, True]  # two plain steps measured first
    spec.observe_plain(0.010)
    spec.observe_plain(0.010)
    for _ in range(2):  # nothing kept, three times a plain step's time per token
        spec.observe(drafted=spec.k, accepted=0, produced=1, seconds=0.030)
    assert spec.k == 6 and spec.pause == 8 and spec.backoff == 32
    assert not any(spec.active() for _ in range(8)) and spec.active()
    for _ in range(2):  # nothing kept again: a 4x longer pause
        spec.observe(drafted=spec.k, accepted=0, produced=1, seconds=0.030)
    assert spec.pause == 32 and spec.backoff == 128
    assert not any(spec.active() for _ in range(32)) and spec.active()
    for _ in range(2):  # drafts kept: faster than plain, the back-off resets and the length grows
        spec.observe(drafted=spec.k, accepted=spec.k, produced=spec.k + 1, seconds=0.012)
    assert spec.pause == 0 and spec.backoff == 8 and spec.k == 8


@pytest.mark.parametrize("flags, words", [
    (["--prompt-lookup", "--draft-model", "x"], "choose one"),
    (["--num-draft-tokens", "4"], "--num-draft-tokens needs --prompt-lookup, --draft-model or --mtp"),
    (["--prompt-lookup", "--num-draft-tokens", "0"], "--num-draft-tokens must be in 1..32"),
    (["--prompt-lookup", "--backend", "torch"], "speculative decoding needs the mlx backend"),
    (["--draft-model", "{other}"], "another vocabulary"),
])
def test_cli_refuses_what_cannot_speculate_in_one_line(tiny_model, tmp_path, capsys, flags, words):
    from benchmarks.checkpoints.tiny_tokenizer import write_tiny_tokenizer
    from cli import main

    other = tmp_path / "other"
    if "{other}" in flags:
        import shutil

        shutil.copytree(tiny_model("mha-tied"), other)
        write_tiny_tokenizer(other, vocab_size=400)  # another vocabulary
    capsys.readouterr()
    args = ["generate", "--model", str(tiny_model("gqa2-untied")), "--prompt", "hi", "--max-tokens", "2"]
    with redirect_stderr(io.StringIO()) as err:
        assert main(args + [f.format(other=other) for f in flags]) == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines


def test_cli_generate_speculates_and_reports_the_drafts(tiny_model, capsys):
    import json

    from cli import main

    args = ["generate", "--model", str(tiny_model("gqa2-untied")), "--raw", "--prompt", "one two one two one two",
            "--max-tokens", "12", "--temperature", "0"]
    capsys.readouterr()
    assert main(args) == 0
    plain = capsys.readouterr()
    assert main(args + ["--draft-model", str(tiny_model("gqa2-untied")), "--num-draft-tokens", "3"]) == 0
    spec = capsys.readouterr()
    stats = json.loads(spec.err.strip().splitlines()[-1])
    assert spec.out == plain.out and stats["accepted_tokens"] == stats["draft_tokens"] > 0
