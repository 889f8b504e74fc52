"""Speculative decoding: drafters that guess the next few tokens, and the policy that decides when to guess.

A step of speculative decoding feeds the token the last step chose and k drafted tokens after it in one
forward (`BatchBackend.verify`), which reads the weights once for all k + 1 positions; the engine
(scheduler.py) then keeps the drafts the model agrees with and one token of its own after them, and the
backend rolls every cache back past what was not kept (`BatchBackend.rollback`: a KV cache is cut, a
recurrent state is restored and the kept tokens fed again). Each position is decided by
`Sampler.verify` (qwen_mlx/sampling/host.py), so greedy output is the same token for token and sampled
output has the same distribution as without speculation.

Drafters (`Drafter`):
- `PromptLookup`: the tokens that followed the latest earlier occurrence of the context's last n-gram (in the
  prompt or the reply so far): no second model; large wins where the reply quotes its input (edits, code
  refactoring, summaries, RAG answers).
- `DraftModel`: a smaller checkpoint with the same tokenizer, decoding k tokens on its own cache.
- `MTPDrafter` (`--mtp`): the multi-token-prediction layer that Qwen3-Next/3.5/3.6 checkpoints carry
  (qwen_mlx/models/mtp.py), drafting from the model's own hidden states: one layer's cost per draft.

`Speculator` is the per-request policy: the draft length follows the acceptance (+2 after a step that kept
every draft, -1 otherwise, as HF's heuristic schedule), and speculation pauses, with a back-off growing 4x per
failed try, while its measured time per generated token is worse than plain decoding's, so a poor drafter
costs little.
Speculation runs for a request decoding alone; in a batch of several the batch already shares each read of
the weights, so those steps decode plainly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import QwenError
from ..sampling import Sampler

if TYPE_CHECKING:
    import mlx.nn as nn

    from ..backends import LoadedModel
    from ..backends.base import Session
    from ..tokenizer import Tokenizer

METHODS = ("prompt-lookup", "draft-model", "mtp")
# docs/BENCHMARKS.md, "Speculative decoding". MTP: vLLM's recipe for Qwen3-Next (num_speculative_tokens 2); no
# real MTP checkpoint was at hand here to measure (the length still adapts to the acceptance).
DEFAULT_DRAFT_TOKENS = {"prompt-lookup": 16, "draft-model": 4, "mtp": 2}
MAX_DRAFT_TOKENS = 32


@dataclass(frozen=True)
class Speculation:
    """A request's speculative decoding: which drafter, and at most how many tokens it drafts per step."""

    method: str
    num_draft_tokens: int | None = None  # None: the method's default

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QwenError(f"unknown speculative method {self.method!r}: use {' or '.join(METHODS)}")
        n = self.num_draft_tokens
        if n is not None and not 1 <= n <= MAX_DRAFT_TOKENS:
            raise QwenError(f"--num-draft-tokens must be in 1..{MAX_DRAFT_TOKENS}, got {n}")

    @property
    def k(self) -> int:
        return self.num_draft_tokens or DEFAULT_DRAFT_TOKENS[self.method]


class Drafter(Protocol):
    def propose(self, context: Sequence[int], k: int, sampler: Sampler, history: set[int],
                seq: Any = None) -> tuple[list[int], np.ndarray | None]:
        """Up to k tokens guessed to follow `context`, and the distribution each was drawn from ([n, vocab],
        what `Sampler.verify` needs for sampled drafts), or None when they were chosen without chance. `seq` is
        the backend's sequence (what the model computed for it: the MTP drafter reads its hidden states)."""


def _draw(sampler: Sampler, logits: np.ndarray, seen: set[int]) -> tuple[int, np.ndarray | None]:
    """A draft from `logits` by the request's own rules: greedy, or drawn from its distribution (returned)."""
    if sampler.params.greedy:
        return sampler(logits, seen), None
    q = sampler.probabilities(logits, seen)
    return int(sampler.rng.choice(q.size, p=q)), q


class PromptLookup:
    """Drafts from the context itself: the continuation of the latest earlier occurrence of its last n tokens,
    trying n = max_ngram down to min_ngram (longer matches predict better)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, context: Sequence[int], k: int, sampler: Sampler, history: set[int],
                seq: Any = None) -> tuple[list[int], np.ndarray | None]:
        ids = np.asarray(context, dtype=np.int64)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(ids) <= n:
                continue
            # every n-gram that ends before the last token, against the last n tokens
            windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
            found = np.flatnonzero((windows == ids[-n:]).all(axis=1))
            if found.size:
                start = int(found[-1]) + n
                return ids[start:start + k].tolist(), None
        return [], None


class DraftModel:
    """A smaller model with the same tokenizer drafting k tokens on its own cache (a `Session`, which keeps the
    prefix shared with the last call, so each step feeds it only what was accepted since). Sampled requests
    draw the drafts with the request's own sampling rules and report their distributions."""

    def __init__(self, session: Session):
        self.session = session

    def propose(self, context: Sequence[int], k: int, sampler: Sampler, history: set[int],
                seq: Any = None) -> tuple[list[int], np.ndarray | None]:
        logits = self.session.prefill(list(context))
        seen = set(history)
        drafts: list[int] = []
        probs: list[np.ndarray] = []
        for i in range(k):
            token, q = _draw(sampler, logits, seen)
            if q is not None:
                probs.append(q)
            drafts.append(token)
            seen.add(token)
            if i + 1 < k:
                logits = self.session.step(token)
        return drafts, (np.stack(probs) if probs else None)


class MTPDrafter:
    """The checkpoint's multi-token-prediction layer (qwen_mlx/models/mtp.py) as a drafter. The backend keeps each
    sequence's hidden states (`seq.mtp`, an MTPState) from every forward: prompt chunks, plain steps, verified
    drafts (cut back with the rejected ones). A proposal first feeds the layer the pairs (h_p, t_{p+1}) it has not
    seen, the last one pairing the newest hidden state with the token the last step chose, which gives the first
    draft; each further draft chains the layer on its own output. The chained pairs stand in the layer's cache
    only until the next proposal, which replaces them with the model's hidden states of what was kept."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.head = model.mtp

    def propose(self, context: Sequence[int], k: int, sampler: Sampler, history: set[int],
                seq: Any = None) -> tuple[list[int], np.ndarray | None]:
        import mlx.core as mx

        from ..models.mtp import CATCH_UP_CHUNK, lm_head

        state = getattr(seq, "mtp", None)
        taken = state.take() if state is not None else None
        if taken is None:  # no hidden state since the last proposal: nothing to draft from
            return [], None
        start, hidden = taken
        n = hidden.shape[1]                                                           # pairs p = start .. start+n-1
        state.cache.trim(state.true)  # the previous proposal's chained pairs
        embed = self.model.model.embed_tokens
        ids = mx.array([list(context[start + 1:start + 1 + n])], dtype=mx.int32)     # t_{p+1}
        for c in range(0, n, CATCH_UP_CHUNK):
            g = self.head(embed(ids[:, c:c + CATCH_UP_CHUNK]), hidden[:, c:c + CATCH_UP_CHUNK], state.cache)
            mx.eval(g, state.cache.state)
        state.true, state.fed = state.cache.offset, start + n
        g = g[:, -1:]
        seen = set(history)
        drafts: list[int] = []
        probs: list[np.ndarray] = []
        for i in range(k):
            token, q = _draw(sampler, np.array(lm_head(self.model, g)[0, -1].astype(mx.float32)), seen)
            if q is not None:
                probs.append(q)
            drafts.append(token)
            seen.add(token)
            if i + 1 < k:
                g = self.head(embed(mx.array([[token]], dtype=mx.int32)), g, state.cache)
        return drafts, (np.stack(probs) if probs else None)


def load_mtp_drafter(loaded: LoadedModel, model: str | None) -> MTPDrafter:
    """The MTP layer of the checkpoint `loaded` came from (`model` as --model gave it: a .gguf holds it as its
    "nextn" block), attached to its MLX model, so the backend and engines built afterwards keep hidden states.
    One error line where the model is no hybrid or carries no such layer."""
    import mlx.core as mx

    from ..models.mtp import MTPState, load_mtp, mtp_weights_from_folder

    if loaded.backend.name != "mlx":
        raise QwenError("speculative decoding needs the mlx backend")
    where = model or str(loaded.folder)
    if model and Path(model).suffix.lower() == ".gguf":
        from ..formats.gguf import read_mtp

        weights = {k: mx.array(v) for k, v in read_mtp(model).items()}
    else:
        weights = mtp_weights_from_folder(loaded.folder)
    load_mtp(loaded.backend.model, weights, where, getattr(loaded.backend, "quantize", None))
    # The one-sequence path (--kv-bits, a saved prompt cache) keeps its hidden states here; batched engines
    # built from now on keep each sequence's (qwen_mlx/backends/mlx_batch.py).
    loaded.backend.mtp = MTPState(loaded.backend.cache_length)
    return MTPDrafter(loaded.backend.model)


def check_same_tokenizer(target: Tokenizer, draft: Tokenizer, where: str) -> None:
    """A draft model must spell every token as the target does: otherwise its guesses are other words."""
    a, b = target.vocab(), draft.vocab()
    if a != b:
        differing = sorted(set(a.items()) ^ set(b.items()), key=lambda item: item[1])[:1]
        example = f" (e.g. {differing[0][0]!r} -> {differing[0][1]})" if differing else ""
        raise QwenError(f"the draft model {where} has another vocabulary than the model it drafts for "
                        f"({len(b)} tokens against {len(a)}{example}): use a checkpoint of the same family")


class Speculator:
    """One request's speculative decoding state: its drafter, the draft length, and whether it pays."""

    first_plain_steps = 2  # the measure speculation has to beat
    probe_steps = 2        # speculative steps judged together
    first_backoff = 8      # plain steps before trying again; x4 after each try that did not pay
    max_backoff = 1024

    def __init__(self, drafter: Drafter, k: int):
        self.drafter, self.k_max, self.k = drafter, k, k
        self.drafted = self.accepted = 0
        self.pause = self.first_plain_steps
        self.backoff = self.first_backoff
        self.plain: list[float] = []  # seconds per token of recent plain steps
        self.spec: list[tuple[float, int]] = []  # (seconds, tokens produced) of recent speculative steps

    def active(self) -> bool:
        """Whether this step should speculate (else it is a plain step, measured)."""
        if self.pause:
            self.pause -= 1
            return False
        return True

    def observe_plain(self, seconds: float) -> None:
        self.plain = [*self.plain, seconds][-8:]

    def observe(self, drafted: int, accepted: int, produced: int, seconds: float) -> None:
        """A speculative step: `drafted` guesses, `accepted` kept, `produced` tokens out, in `seconds`."""
        self.drafted += drafted
        self.accepted += accepted
        self.k = min(self.k_max, self.k + 2) if accepted == drafted else max(1, self.k - 1)
        self.spec = [*self.spec, (seconds, produced)][-6:]
        if len(self.spec) < self.probe_steps or not self.plain:
            return
        # time per token over the recent steps together: one unlucky step does not outweigh a good run
        if sum(t for t, _ in self.spec) / sum(n for _, n in self.spec) > np.median(self.plain):
            self.pause, self.backoff = self.backoff, min(self.backoff * 4, self.max_backoff)
            self.spec = []  # the next try is judged on its own steps
        else:
            self.backoff = self.first_backoff


def speculation_from_flags(prompt_lookup: bool, draft_model: str | None, num_draft_tokens: int | None,
                           mtp: bool = False) -> Speculation | None:
    """The command line's choice (--prompt-lookup, --draft-model PATH, --mtp, --num-draft-tokens N), checked."""
    chosen = [flag for flag, on in (("--prompt-lookup", prompt_lookup), ("--draft-model", draft_model),
                                    ("--mtp", mtp)) if on]
    if len(chosen) > 1:
        raise QwenError(f"{' and '.join(chosen)} are {len(chosen)} drafters: choose one")
    if not chosen:
        if num_draft_tokens is not None:
            raise QwenError("--num-draft-tokens needs --prompt-lookup, --draft-model or --mtp")
        return None
    method = {"--prompt-lookup": "prompt-lookup", "--draft-model": "draft-model", "--mtp": "mtp"}[chosen[0]]
    return Speculation(method, num_draft_tokens)


def load_draft_model(path: str, target: Tokenizer, dtype: str | None = None) -> DraftModel:
    """A draft model on MLX for a target whose tokenizer is `target`: refused when the vocabularies differ."""
    from ..backends import load
    from ..backends.base import Session

    loaded = load("mlx", path, dtype)
    check_same_tokenizer(target, loaded.tokenizer, path)
    return DraftModel(Session(loaded.backend))
