"""Token ids as OpenAI's logprobs show them: the token's text and its raw bytes."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from ..tokenizer import Tokenizer


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (what byte-level BPE vocabularies are written in) -> byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class TokenText:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def bytes(self, token_id: int) -> list[int]:
        piece = self.tokenizer.id_to_token(token_id) or ""
        table = _byte_decoder()
        if piece and all(c in table for c in piece):
            return [table[c] for c in piece]
        return list(piece.encode("utf-8"))  # an added token is stored as its own text

    def text(self, token_id: int) -> str:
        return bytes(self.bytes(token_id)).decode("utf-8", errors="replace")

    def entry(self, token_id: int, logprob: float | None) -> dict[str, Any]:
        return {"token": self.text(token_id), "logprob": logprob, "bytes": self.bytes(token_id)}
