"""Helpers for the continuous-batching engine's tests: prompts of different lengths, the tokens of a
request's events, BatchBackend wrappers that record decode batch sizes and prefill forwards, and the
batch-of-8 check that tests/test_engine.py runs as it is and tests/test_attention.py through the numpy softmax."""

from __future__ import annotations

from qwen_mlx.backends.base import Session, greedy_tokens
from qwen_mlx.backends.batching import batch_backend
from qwen_mlx.backends.mlx_batch import MLXBatch
from qwen_mlx.engine import Done, Engine, Request, Token, run_requests
from qwen_mlx.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)


def prompts(tok, n=8):
    return [tok.encode("hello world " * (3 * i + 1) + f"tell story number {i}") for i in range(n)]


def tokens(events):
    return [e.id for e in events if isinstance(e, Token)]


class Recorder:
    """Wraps a BatchBackend to record the batch size of every decode step (observes, changes nothing)."""

    def __init__(self, inner):
        self.inner, self.sizes = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, seqs, toks):
        self.sizes.append(len(seqs))
        return self.inner.decode(seqs, toks)

    def decode_sampled(self, seqs, toks, draws):  # greedy rows on MLX: sampled on the device, pipelined
        self.sizes.append(len(seqs))
        return self.inner.decode_sampled(seqs, toks, draws)


class PrefillRecorder(Recorder):
    def __init__(self, inner):
        super().__init__(inner)
        self.prefills = []  # rows per prefill forward

    def prefill(self, seq, tokens):
        self.prefills.append(1)
        return self.inner.prefill(seq, tokens)

    def prefill_batch(self, seqs, chunks):
        self.prefills.append(len(seqs))
        return self.inner.prefill_batch(seqs, chunks)


def assert_batch_of_8_gives_each_request_its_tokens_alone(loaded) -> None:
    """Eight prompts of different lengths batched with different max_tokens (rows leave at different steps)
    and prefilled in chunks of 16: each gets the greedy tokens it gets alone."""
    ps = prompts(loaded.tokenizer)
    assert len({len(p) for p in ps}) == 8
    alone = [greedy_tokens(Session(loaded.backend), p, 24) for p in ps]
    backend = Recorder(batch_backend(loaded.backend, 8))
    assert isinstance(backend.inner, MLXBatch)
    engine = Engine(backend, loaded.tokenizer, prefill_chunk=16).start()
    try:
        # different max_tokens: rows leave the batch at different steps while the others go on
        events = run_requests(engine, [Request(p, GREEDY, 24 - i) for i, p in enumerate(ps)])
    finally:
        engine.shutdown(0)
    assert max(backend.sizes) == 8
    for i, ev in enumerate(events):
        assert tokens(ev) == alone[i][:24 - i]
        assert isinstance(ev[-1], Done) and ev[-1].finish_reason == "length"


def assert_hybrid_rows_batch_as_alone(loaded, alone_session, batch_class, prompt, steps) -> None:
    """A hybrid model's batch on the server's engine: three rows of different lengths decode together (linear
    layers' windows and states stacked, keys and values left-padded), each with its greedy tokens alone
    (`alone_session()`: a fresh Session of the same model); a later request starting with an earlier prompt
    prefills only what follows it (a recurrent state is reused whole)."""
    loaded.tokenizer.eos_token_ids = frozenset()
    first = [prompt[:50], prompt[10:90], prompt[40:57]]
    later = prompt[10:90] + steps
    alone = [greedy_tokens(alone_session(), p, 8) for p in [*first, later]]
    backend = Recorder(batch_backend(loaded.backend, 8))
    assert isinstance(backend.inner, batch_class)
    engine = Engine(backend, loaded.tokenizer, prefill_chunk=16).start()
    try:
        events = run_requests(engine, [Request(p, GREEDY, 8) for p in first])
        events += run_requests(engine, [Request(later, GREEDY, 8)])
    finally:
        engine.shutdown(0)
    assert max(backend.sizes) > 1  # rows were decoded together
    for ev, want in zip(events, alone):
        assert isinstance(ev[-1], Done)
        assert tokens(ev) == want
    assert events[-1][-1].cached_tokens == 80  # the second prompt, whole
