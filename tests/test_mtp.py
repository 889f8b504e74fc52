"""`--mtp`: the checkpoint's multi-token-prediction layer as the drafter (qwen_mlx/models/mtp.py,
qwen_mlx/engine/speculative.py MTPDrafter), on tiny hybrid checkpoints carrying an `mtp.*` layer as released
(tests/support/hybrid_models.py: Qwen3.5 dense, Qwen3-Next MoE, Qwen3.5-MoE).

- Its forward is the formula vLLM's qwen3_next_mtp.py runs, checked against torch, with HF transformers' own
  decoder layer for the layer (an implementation independent of this project's).
- Exact: greedy tokens are the plain ones with random MTP weights (drafts mostly rejected) for several draft
  lengths, over a second turn that reuses the cached prompt, on the batched engine, the one-sequence path
  (--kv-bits) and --quantize 4, and for a request that shared the batch; sampled tokens keep their distribution.
- Aligned: two honest constructions, each of which drafts right only if the layer gets the right inputs. A target
  whose layers add nothing (its next token a function of the current one) with an MTP layer that passes the
  embedding of t_{p+1} through: every draft is kept, so each pair takes the token that followed its position,
  chained drafts included. An MTP layer that passes the hidden state through: its first draft is the token the
  model itself chose after the last kept position, so the hidden state is that position's, after every rollback.
- The CLI, the server and a GGUF (its "nextn" block): --mtp gives the plain text with its draft stats; one error
  line where it cannot run.
"""

from __future__ import annotations

import collections
import io
import json
import shutil
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import pytest

from qwen_mlx.engine import Done, Request, Token, local_engine
from qwen_mlx.engine.speculative import Speculation, Speculator, load_mtp_drafter
from qwen_mlx.sampling import Sampler, SamplingParams

GREEDY = SamplingParams(temperature=0)
BASE = np.random.default_rng(5).integers(3, 400, size=20).tolist()
PROMPT = BASE * 3
HYBRIDS = ["q35-tied", "next-moe", "q35-moe"]


def _load(folder: Path, **kw):
    from qwen_mlx.backends import load

    loaded = load("mlx", str(folder), "float32", **kw)
    loaded.tokenizer.eos_token_ids = frozenset()  # fixed-length greedy runs on a random model
    return loaded


def _engine(folder: Path, spec: str | None = None, **kw):
    """An engine over `folder` (or the --model `spec` it came from) with the MTP drafter loaded."""
    loaded = _load(spec or folder, **kw)
    drafter = load_mtp_drafter(loaded, spec)  # attaches the layer before the engine's batch is built
    engine = local_engine(loaded.backend, loaded.tokenizer)
    engine.drafters["mtp"] = drafter
    return loaded, engine


def _run(engine, prompt, speculation=None, max_tokens=24, params=GREEDY) -> tuple[list[int], Done]:
    tokens, done = [], None
    for event in engine.stream(Request(list(prompt), params, max_tokens, speculation=speculation)):
        if isinstance(event, Token):
            tokens.append(event.id)
        else:
            done = event
    return tokens, done


@pytest.fixture
def always_speculate(monkeypatch):
    """The policy never pauses (random drafts would pause it after two steps): every step drafts."""
    monkeypatch.setattr(Speculator, "first_plain_steps", 0)
    monkeypatch.setattr(Speculator, "probe_steps", 10 ** 9)


def _rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of a checkpoint folder with `change(key, array, all_weights) -> array` applied to every tensor."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    weights = {}
    for path in dst.glob("*.safetensors"):
        weights.update(load_file(path))
    for path in dst.glob("*.safetensors"):
        stored = load_file(path)
        save_file({k: change(k, v, weights).astype(v.dtype) for k, v in stored.items()}, path,
                  metadata={"format": "pt"})
    return dst


def _final_norm(weights: dict) -> np.ndarray:
    return next(v for k, v in weights.items() if k in ("model.norm.weight", "model.language_model.norm.weight"))


def _silent_block(key: str) -> bool:
    """What writes into the residual stream: zeroed, a layer adds nothing."""
    return key.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight", "down_proj"))


def _bigram_with_embedding_mtp(src: Path, dst: Path, sharpen: float = 1.0) -> Path:
    """The target's layers zeroed (h_p = final_norm(embed(t_p)): the next token depends on the current one
    alone), and an MTP layer computing norm(fc([norm_e(e), .])) with fc = [I, 0], its layer silent and its final
    norm the target's (times `sharpen`): it scores t_{p+2} from embed(t_{p+1}) as the target scores it."""
    def change(key, v, weights):
        if _silent_block(key):
            return np.zeros_like(v)
        if key == "mtp.fc.weight":
            e = v.shape[0]
            return np.concatenate([np.eye(e), np.zeros((e, e))], axis=1)
        if key == "mtp.pre_fc_norm_embedding.weight":
            return np.zeros_like(v)
        if key == "mtp.norm.weight":
            return sharpen * (1 + _final_norm(weights)) - 1
        return v
    return _rewrite(src, dst, change)


def _hidden_passthrough_mtp(src: Path, dst: Path) -> Path:
    """An MTP layer computing norm(fc([., norm_h(h)])) with fc = [0, I], its layer silent and unit norms: g is
    h_p / rms(h_p), so the LM head ranks tokens as it does at p (the target's choice after p)."""
    def change(key, v, weights):
        if key.startswith("mtp.") and _silent_block(key):
            return np.zeros_like(v)
        if key == "mtp.fc.weight":
            e = v.shape[0]
            return np.concatenate([np.zeros((e, e)), np.eye(e)], axis=1)
        if key in ("mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight"):
            return np.zeros_like(v)
        return v
    return _rewrite(src, dst, change)


# --- the forward, against an independent one ------------------------------------------------------------------


def _hf(folder: Path):
    """HF transformers' model of the folder, by the class the release uses (multimodal for Qwen3.5)."""
    import torch
    import transformers

    from tests.support.hybrid_models import HF_CLASSES

    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    return getattr(transformers, HF_CLASSES[model_type][1]).from_pretrained(folder, dtype=torch.float32).eval()


def _torch_reference(folder: Path):
    """vLLM's MTP forward in torch over HF transformers' model: its embedding, LM head, rotary embedding and a
    full-attention decoder layer of its own class (with the experts' layout it uses) loaded with mtp.layers.0."""
    import copy

    import torch
    from safetensors.torch import load_file

    hf = _hf(folder)
    text = hf.model.language_model if hasattr(hf.model, "language_model") else hf.model
    mtp = load_file(str(folder / "model-mtp.safetensors"))
    layer_types = text.config.layer_types
    full = [i for i, t in enumerate(layer_types) if t == "full_attention"]
    moe = any(".experts." in k for k in mtp)
    index = next(i for i in full if (type(text.layers[i].mlp).__name__.endswith("SparseMoeBlock")) == moe)
    layer = copy.deepcopy(text.layers[index])
    state = {k.removeprefix("mtp.layers.0."): v for k, v in mtp.items() if k.startswith("mtp.layers.0.")}
    if moe:  # per expert as stored -> the fused parameters transformers 5 holds
        n = text.config.num_experts
        pop = lambda j, p: state.pop(f"mlp.experts.{j}.{p}_proj.weight")  # noqa: E731
        gate_up = [torch.cat([pop(j, "gate"), pop(j, "up")]) for j in range(n)]
        state["mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        state["mlp.experts.down_proj"] = torch.stack([pop(j, "down") for j in range(n)])
    layer.load_state_dict(state, strict=True)
    eps = text.config.rms_norm_eps

    def norm(x, w):  # zero-centred RMSNorm, as the family's
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + w)

    def forward(ids: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            e = text.embed_tokens(torch.tensor(ids))
            h = torch.tensor(hidden)
            e, h = norm(e, mtp["mtp.pre_fc_norm_embedding.weight"]), norm(h, mtp["mtp.pre_fc_norm_hidden.weight"])
            x = torch.cat([e, h], dim=-1) @ mtp["mtp.fc.weight"].T  # embedding first, as vLLM concatenates
            L = x.shape[1]
            positions = torch.arange(L)[None]
            mask = torch.full((L, L), float("-inf")).triu(1)[None, None]
            x = layer(x, position_embeddings=text.rotary_emb(x, positions), attention_mask=mask, position_ids=positions)
            x = x[0] if isinstance(x, tuple) else x
            g = norm(x, mtp["mtp.norm.weight"])
            return g.numpy(), hf.lm_head(g).numpy()

    return forward


@pytest.mark.parametrize("name", HYBRIDS)
def test_the_mtp_forward_is_vllms_formula(hybrid_model, name):
    """Six pairs in one forward, then the same pairs one at a time through the layer's KV cache (as chained
    drafts run): both equal the torch reference, hidden states and logits."""
    import mlx.core as mx

    from qwen_mlx.models.cache import KVCache
    from qwen_mlx.models.mtp import lm_head

    folder = hybrid_model(name)
    loaded = _load(folder)
    load_mtp_drafter(loaded, None)
    model = loaded.backend.model
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 512, size=(1, 6))
    hidden = rng.normal(size=(1, 6, 64)).astype(np.float32)
    want_g, want_logits = _torch_reference(folder)(ids, hidden)
    embed = model.model.embed_tokens(mx.array(ids, dtype=mx.int32))
    g = model.mtp(embed, mx.array(hidden), KVCache())
    cache = KVCache()
    steps = mx.concatenate([model.mtp(embed[:, i:i + 1], mx.array(hidden[:, i:i + 1]), cache) for i in range(6)],
                           axis=1)
    for got in (g, steps):
        np.testing.assert_allclose(np.array(got), want_g, atol=2e-4, rtol=2e-4)
        np.testing.assert_allclose(np.array(lm_head(model, got)), want_logits, atol=5e-4, rtol=5e-4)


def test_the_hidden_states_are_the_models_after_its_final_norm(hybrid_model):
    """What the backend keeps for the layer is the model's last hidden state after its final norm (vLLM hands
    the MTP layer those: the LM head's input), as HF transformers computes it."""
    import mlx.core as mx
    import torch

    from qwen_mlx.models.mtp import forward_hidden

    folder = hybrid_model("next-moe")
    model = _load(folder).backend.model
    logits, h = forward_hidden(model, mx.array([PROMPT[:12]], dtype=mx.int32), model.make_cache(), last_only=False)
    hf = _hf(folder)
    with torch.no_grad():
        out = hf(torch.tensor([PROMPT[:12]]), output_hidden_states=True)
    np.testing.assert_allclose(np.array(h), out.hidden_states[-1].numpy(), atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(np.array(logits), out.logits.numpy(), atol=5e-4, rtol=5e-4)


# --- exactness ------------------------------------------------------------------------------------------------


KV8 = {"kv_bits": 8, "kv_group_size": 32}


@pytest.mark.parametrize("name, kw", [(n, {}) for n in HYBRIDS] + [("q35-tied", KV8), ("next-moe", {"quantize": "4"})],
                         ids=HYBRIDS + ["q35-tied-kv8", "next-moe-q4"])
def test_greedy_tokens_are_the_same_with_mtp(hybrid_model, always_speculate, name, kw):
    """Random MTP weights (drafts mostly rejected) at draft lengths 1, 2, 4 and 8: the plain greedy tokens; a
    second turn reusing the cached conversation too (the layer then sees only what follows the cached prefix).
    With --kv-bits the engine runs the one-sequence path (batching.SerialBatch on MLXBackend's own cache); with
    --quantize 4 the MTP layer is quantized as the model is."""
    folder = hybrid_model(name)
    loaded, engine = _engine(folder, **kw)
    if "quantize" in kw:
        assert type(loaded.backend.model.mtp.fc).__name__ == "QuantizedLinear"
    plain, _ = _run(engine, PROMPT)
    for k in (1, 2, 4, 8):
        got, done = _run(engine, PROMPT, Speculation("mtp", k))
        assert got == plain, k
        assert done.draft_tokens >= 10 and done.accepted_tokens < done.draft_tokens, (k, done)
    turn = PROMPT + plain + BASE[:5]
    again, done = _run(engine, turn, Speculation("mtp", 3), max_tokens=12)
    assert done.cached_tokens > len(PROMPT)
    fresh = _load(folder, **kw)
    assert again == _run(local_engine(fresh.backend, fresh.tokenizer), turn, max_tokens=12)[0]


def test_a_request_that_shared_the_batch_drafts_from_its_batched_steps(hybrid_model, tmp_path, always_speculate):
    """The engine's own thread with two requests at once: the MTP one decodes in the batch beside a plain one
    (its hidden states kept row by row), then alone, where its drafts start from the batched steps' hidden states.
    With the agreeing layer every draft is kept; both replies are the plain ones."""
    import threading

    from qwen_mlx.engine import Engine

    folder = _bigram_with_embedding_mtp(hybrid_model("next-moe"), tmp_path / "bigram")
    loaded = _load(folder)
    drafter = load_mtp_drafter(loaded, None)
    plain = {n: _run(local_engine(loaded.backend, loaded.tokenizer), BASE[:n], max_tokens=m)[0]
             for n, m in ((7, 30), (9, 8))}
    engine = Engine.for_backend(loaded.backend, loaded.tokenizer, max_batch=2)
    engine.drafters["mtp"] = drafter
    events: dict[int, list] = {7: [], 9: []}
    finished = threading.Semaphore(0)

    def emit(n):
        def put(event):
            events[n].append(event)
            if not isinstance(event, Token):
                finished.release()
        return put
    engine.start()
    try:
        engine.submit(Request(BASE[:7], GREEDY, 30, speculation=Speculation("mtp", 3)), emit(7))
        engine.submit(Request(BASE[:9], GREEDY, 8), emit(9))
        assert finished.acquire(timeout=120) and finished.acquire(timeout=120)
    finally:
        engine.shutdown()
    for n in (7, 9):
        assert [e.id for e in events[n] if isinstance(e, Token)] == plain[n], n
    done = events[7][-1]
    assert isinstance(done, Done) and done.accepted_tokens == done.draft_tokens > 0, done


@pytest.mark.parametrize("name", ["q35-tied", "next-moe"])
def test_an_mtp_layer_that_agrees_with_the_model_has_every_draft_kept(hybrid_model, tmp_path, always_speculate,
                                                                     name):
    """The bigram target with the embedding-passing MTP layer: every draft, chained ones included, is the
    model's next token, at every draft length; the tokens are the plain ones."""
    folder = _bigram_with_embedding_mtp(hybrid_model(name), tmp_path / "bigram")
    _, engine = _engine(folder)
    prompt = BASE[:7]
    plain, _ = _run(engine, prompt, max_tokens=30)
    for k in (1, 3, 6):
        got, done = _run(engine, prompt, Speculation("mtp", k), max_tokens=30)
        assert got == plain, k
        assert done.accepted_tokens == done.draft_tokens >= 12, (k, done)


@pytest.mark.parametrize("name, kw", [("q35-moe", {}), ("next-moe", {}), ("q35-tied", KV8)],
                         ids=["q35-moe", "next-moe", "q35-tied-kv8"])
def test_the_first_draft_reads_the_last_kept_positions_hidden_state(hybrid_model, tmp_path, name, kw):
    """The hidden-passing MTP layer drafts, first, the token the model chose after the last kept position: after
    the prompt, and after each verified step whatever it kept (the backend's rollback cuts the hidden states), on
    the batched engine and on the one-sequence path (--kv-bits)."""
    from qwen_mlx.backends.batching import batch_backend

    folder = _hidden_passthrough_mtp(hybrid_model(name), tmp_path / "passthrough")
    loaded = _load(folder, **kw)
    drafter = load_mtp_drafter(loaded, None)
    batch = batch_backend(loaded.backend, 1)
    assert batch.keeps_hidden and type(batch).__name__ == ("SerialBatch" if kw else "HybridBatch")
    seq, _ = batch.start(PROMPT)
    context = PROMPT + [int(np.argmax(batch.prefill(seq, PROMPT)))]
    sampler = Sampler(GREEDY)
    for _ in range(8):
        drafts, _ = drafter.propose(context, 3, sampler, set(context), seq)
        assert drafts[0] == context[-1], drafts
        logits = batch.verify(seq, [context[-1], *drafts])
        out = [int(np.argmax(row)) for row in logits]
        kept = next((i for i, (t, d) in enumerate(zip(out, drafts)) if t != d), len(drafts))
        batch.rollback(seq, 1 + kept)
        context += drafts[:kept] + [out[kept]]
    # a plain run from scratch decodes the same tokens
    fresh = _load(folder, **kw)
    plain, _ = _run(local_engine(fresh.backend, fresh.tokenizer), PROMPT, max_tokens=len(context) - len(PROMPT))
    assert PROMPT + plain == context


def test_sampled_tokens_keep_their_distribution(hybrid_model, tmp_path, monkeypatch):
    """Seeded sampling (temperature 2, top-k 3) of 3 tokens, 150 times with a sharpened agreeing MTP layer (its
    distributions 4x sharper than the model's: drafts often kept, sometimes redrawn) and 150 times without: each
    token value at positions 2 and 3 comes as often within a binomial bound."""
    monkeypatch.setattr(Speculator, "first_plain_steps", 0)
    folder = _bigram_with_embedding_mtp(hybrid_model("q35-tied"), tmp_path / "sharp", sharpen=4.0)
    _, engine = _engine(folder)
    n, counts = 150, {False: collections.Counter(), True: collections.Counter()}
    drafted = accepted = 0
    for spec in (False, True):
        for seed in range(n):
            params = SamplingParams(temperature=2.0, top_k=3, seed=seed)
            tokens, done = _run(engine, BASE, Speculation("mtp", 2) if spec else None, 3, params)
            counts[spec].update([(1, tokens[1]), (2, tokens[2])])
            if spec:
                drafted, accepted = drafted + done.draft_tokens, accepted + done.accepted_tokens
    assert 0 < accepted < drafted  # both branches of the rule ran
    for token in set(counts[False]) | set(counts[True]):
        p = (counts[False][token] + counts[True][token]) / (2 * n)
        bound = 4.5 * np.sqrt(p * (1 - p) * 2 / n) + 1 / n
        assert abs(counts[False][token] - counts[True][token]) / n <= bound, (token, counts)


# --- the CLI and the server -------------------------------------------------------------------------------------


def test_cli_generate_with_mtp_gives_the_plain_text(hybrid_model, capsys):
    from cli import main

    args = ["generate", "--backend", "mlx", "--model", str(hybrid_model("q35-tied")), "--raw",
            "--prompt", "one two one two one two", "--max-tokens", "12", "--temperature", "0"]
    capsys.readouterr()
    assert main(args) == 0
    plain = capsys.readouterr()
    assert main(args + ["--mtp", "--num-draft-tokens", "3"]) == 0
    spec = capsys.readouterr()
    stats = json.loads(spec.err.strip().splitlines()[-1])
    assert spec.out == plain.out and stats["draft_tokens"] > 0 and "accepted_tokens" in stats


def _without_mtp(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "model-mtp.safetensors").unlink()
    return dst


@pytest.mark.parametrize("flags, words", [
    (["--mtp", "--prompt-lookup"], "choose one"),
    (["--mtp", "{dense}"], "needs a Qwen3-Next / Qwen3.5 / Qwen3.6 checkpoint"),
    (["--mtp", "{no-mtp}"], "carries no multi-token-prediction layer"),
])
def test_cli_refuses_what_cannot_use_mtp_in_one_line(hybrid_model, tiny_model, tmp_path, flags, words):
    from cli import main

    model = str(hybrid_model("q35-tied"))
    if "{dense}" in flags:
        model = str(tiny_model("gqa2-untied"))
    if "{no-mtp}" in flags:
        model = str(_without_mtp(hybrid_model("q35-tied"), tmp_path / "no-mtp"))
    args = ["generate", "--backend", "mlx", "--model", model, "--prompt", "hi", "--max-tokens", "2"]
    with redirect_stderr(io.StringIO()) as err:
        assert main(args + [f for f in flags if not f.startswith("{")]) == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines


def test_a_server_request_drafts_with_mtp(hybrid_model):
    """serve --mtp: a request's `speculative: {"method": "mtp"}` and the server's default give the plain greedy
    text; a server started without --mtp answers such a request with a 400 naming the flag."""
    import openai

    from tests.support.server import Server

    folder = hybrid_model("q35-tied")
    kw = dict(model="m", prompt="one two one two one two", max_tokens=12, temperature=0)
    server = Server(folder, "--backend", "mlx", "--mtp")
    try:
        c = server.client()
        kw["model"] = c.models.list().data[0].id
        plain = c.completions.create(**kw, extra_body={"speculative": {"method": "none"}}).choices[0].text
        for options in ({"method": "mtp", "num_draft_tokens": 3}, None):
            extra = {"speculative": options} if options else {}
            assert c.completions.create(**kw, extra_body=extra).choices[0].text == plain
    finally:
        assert server.stop() == 0
    server = Server(folder, "--backend", "mlx")
    try:
        with pytest.raises(openai.BadRequestError, match="start with --mtp"):
            server.client().completions.create(**kw, extra_body={"speculative": {"method": "mtp"}})
    finally:
        server.stop()


def test_a_gguf_drafts_with_its_nextn_block(hybrid_model, tmp_path, always_speculate):
    """llama.cpp's converter keeps the MTP layer as its "nextn" block: `--mtp` on the .gguf reads it (read_mtp)
    and drafts what the checkpoint's own mtp.* layer drafts, with the plain greedy tokens."""
    from qwen_mlx.paths import cache_dir
    from tests.support.llama_converter import ConverterUnavailable, convert, converter_dir
    from tests.support.needs import unavailable

    try:
        llama = converter_dir(cache_dir())
    except ConverterUnavailable as error:
        unavailable(str(error))
    folder = hybrid_model("q35-tied")
    gguf = tmp_path / "q35-tied-f32.gguf"
    convert(llama, [("qwen35", [str(folder), "--no-lazy", "--outtype", "f32", "--outfile", str(gguf)])])
    runs = []
    for spec in (None, str(gguf)):
        _, engine = _engine(folder, spec)
        runs.append([_run(engine, PROMPT, Speculation("mtp", k)) for k in (1, 3)])
    plain, _ = _run(engine, PROMPT)
    for (tokens, done), (gguf_tokens, gguf_done) in zip(*runs):
        assert tokens == gguf_tokens == plain
        assert (done.draft_tokens, done.accepted_tokens) == (gguf_done.draft_tokens, gguf_done.accepted_tokens)
