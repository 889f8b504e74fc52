"""A thinking model's reasoning apart from its answer: the `<think>...</think>` block of Qwen3 and Qwen3.5.

Qwen3's template leaves the model to open the block itself; Qwen3.5's (and Qwen3's thinking-only releases)
opens it in the generation prompt, so the reply starts inside it; with thinking switched off both write an
empty block into the prompt. Whether a reply starts inside the block is therefore read from the prompt
(`starts_thinking`), not guessed from the reply. The split follows vLLM's and mlx-lm's servers: `reasoning`
and `content`. The newlines the template puts around the block are the format's and are dropped, as the
template drops them when it writes the reasoning back on the next turn (`reasoning_content.strip('\\n')`).
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"
_TURN = "<|im_start|>"


def thinks(chat_template: str) -> bool:
    """Whether replies rendered by this chat template may carry a reasoning block."""
    return OPEN in chat_template


def starts_thinking(prompt: str) -> bool:
    """Whether a reply to the rendered `prompt` starts inside a `<think>` block the prompt's last turn opened."""
    tail = prompt[prompt.rfind(_TURN):]
    return tail.rfind(OPEN) > tail.rfind(CLOSE)


def _held(text: str, tag: str) -> int:
    """How many characters at the end of `text` must wait: a partial `tag` and the newlines before it."""
    end = len(text)
    for k in range(min(len(tag) - 1, end), 0, -1):
        if tag.startswith(text[end - k:]):
            end -= k
            break
    while end and text[end - 1] == "\n":
        end -= 1
    return len(text) - end


class ReasoningSplitter:
    """Splits a reply streamed in pieces into (reasoning, content) pieces. A piece that may end in part of a
    tag, or in newlines that may precede `</think>`, is held back until the next piece tells."""

    def __init__(self, thinking: bool) -> None:
        self.state = "reasoning" if thinking else "start"
        self.fresh = True  # at the start of a section, whose leading newlines are the format's
        self.buf = ""

    def add(self, piece: str) -> tuple[str, str]:
        self.buf += piece
        reasoning = content = ""
        while self.buf:
            if self.state == "start":  # may the reply open a block? wait until it does or cannot
                text = self.buf.lstrip()
                if text.startswith(OPEN):
                    self.buf, self.state, self.fresh = text[len(OPEN):], "reasoning", True
                    continue
                if OPEN.startswith(text):
                    break
                self.state, self.fresh = "content", False
            elif self.fresh:
                if not self.buf.strip("\n"):
                    break
                self.buf, self.fresh = self.buf.lstrip("\n"), False
            elif self.state == "reasoning":
                at = self.buf.find(CLOSE)
                if at >= 0:
                    reasoning += self.buf[:at].rstrip("\n")
                    self.buf, self.state, self.fresh = self.buf[at + len(CLOSE):], "content", True
                    continue
                keep = _held(self.buf, CLOSE)
                reasoning, self.buf = reasoning + self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                break
            else:
                content, self.buf = content + self.buf, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is still held: reasoning cut off before `</think>`, or content."""
        rest, self.buf = self.buf, ""
        if self.state == "reasoning":
            return rest.strip("\n") if self.fresh else rest.rstrip("\n"), ""
        return "", rest.lstrip("\n") if self.fresh and self.state == "content" else rest

    def split(self, text: str) -> tuple[str, str]:
        """A whole reply at once: (reasoning, content)."""
        reasoning, content = self.add(text)
        more_reasoning, more_content = self.finish()
        return reasoning + more_reasoning, content + more_content
