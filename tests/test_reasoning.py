"""A thinking model's reasoning apart from its answer (qwen_mlx/engine/reasoning.py): the split of whole
replies as vLLM's qwen3 parser gives it, and the same split whatever pieces a stream cuts the reply into."""

from __future__ import annotations

import pytest

from qwen_mlx.engine.reasoning import ReasoningSplitter, starts_thinking, thinks

# (reply starts inside the block?, reply, reasoning, content)
CASES = [
    (False, "<think>\nThe sky scatters blue light.\n</think>\n\nRayleigh scattering.", "The sky scatters blue light.",
     "Rayleigh scattering."),
    (True, "Blue light scatters more.\n\n</think>\n\nRayleigh.", "Blue light scatters more.", "Rayleigh."),
    (True, "Cut off mid-thought\n", "Cut off mid-thought", ""),           # max_tokens inside the block
    (False, "An answer with no block.", "", "An answer with no block."),  # --no-think: the prompt closed it
    (False, "<think>\n\n</think>\n\nJust the answer.", "", "Just the answer."),
    (True, "a < b and </thin is not a tag</think>ok", "a < b and </thin is not a tag", "ok"),
    (True, "x\n\n\n</think>\n\n<tool_call>\n{}\n</tool_call>", "x", "<tool_call>\n{}\n</tool_call>"),
    (False, "<thinking aloud> is text", "", "<thinking aloud> is text"),
    (False, "\n", "", "\n"),
]


@pytest.mark.parametrize("thinking, reply, reasoning, content", CASES)
def test_whole_reply(thinking, reply, reasoning, content):
    assert ReasoningSplitter(thinking).split(reply) == (reasoning, content)


@pytest.mark.parametrize("thinking, reply, reasoning, content", CASES)
def test_streamed_in_any_pieces_equals_whole(thinking, reply, reasoning, content):
    """Every cut into two pieces and the cut into single characters give the whole reply's split."""
    cuts = [[reply[:i], reply[i:]] for i in range(len(reply) + 1)] + [list(reply)]
    for pieces in cuts:
        splitter = ReasoningSplitter(thinking)
        out = [splitter.add(p) for p in pieces] + [splitter.finish()]
        assert ("".join(r for r, _ in out), "".join(c for _, c in out)) == (reasoning, content), pieces


def test_where_a_reply_starts():
    qwen3 = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert not starts_thinking(qwen3)                                   # Qwen3: the model opens the block
    assert starts_thinking(qwen3 + "<think>\n")                          # Qwen3.5: the prompt opened it
    assert not starts_thinking(qwen3 + "<think>\n\n</think>\n\n")        # thinking switched off
    earlier = "<|im_start|>assistant\n<think>\nold\n</think>\n\nHi<|im_end|>\n"
    assert not starts_thinking(earlier + qwen3)                           # an earlier turn's block is closed
    assert thinks("{{- '<think>\\n' }}") and not thinks("{{- '<|im_start|>assistant\\n' }}")
