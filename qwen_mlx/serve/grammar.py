"""Structured output: JSON, a JSON schema, or a forced tool call, enforced token by token.

The grammar engine is llguidance (the Rust library behind Guidance, also a structured-output backend of
vLLM and SGLang). Chosen over xgrammar and outlines-core because it needs neither torch nor a
precompiled index: it builds each token mask on the fly from a lazy lexer and an Earley parser in well
under a millisecond per token at Qwen's 151,936-token vocabulary, starts a new schema without
ahead-of-time compilation, takes Lark grammars with embedded JSON schemas (what a forced tool call
needs), and reads the tokenizer straight from tokenizer.json. The mask is applied to the numpy logits
before the shared Sampler, so every sampling rule still holds inside the grammar.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

from ..errors import QwenError
from ..tokenizer import Tokenizer

# JSON as json.dumps writes it (and as Qwen writes its tool calls): one space after ',' and ':', no other
# whitespace. Flexible whitespace would let a model pad its output with newlines until max_tokens.
JSON_STYLE = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}

_lock = threading.Lock()
_tokenizers: dict[int, Any] = {}


def _ll_tokenizer(tokenizer: Tokenizer, n_vocab: int) -> Any:
    """llguidance's view of the tokenizer (about a second to build at a full vocabulary: cached)."""
    try:
        import llguidance
    except ImportError:
        raise QwenError("structured output needs llguidance: pip install 'qwen-mlx[serve]'") from None
    key = id(tokenizer)
    with _lock:
        if key not in _tokenizers:
            _tokenizers[key] = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=n_vocab,
                                                      eos_token=sorted(tokenizer.eos_token_ids))
        return _tokenizers[key]


class GrammarConstraint:
    """One request's grammar state: the engine's `Constraint` (qwen_mlx.engine.requests)."""

    def __init__(self, tokenizer: Tokenizer, grammar: str, n_vocab: int):
        import llguidance

        self.matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer, n_vocab), grammar, log_level=0)
        self.real = tokenizer.vocab_size  # ids past it pad the embedding matrix: never text, never allowed
        if self.matcher.is_error():
            raise QwenError(f"the grammar is not usable: {self.matcher.get_error()}")

    def mask(self, logits: np.ndarray) -> np.ndarray:
        allowed = np.frombuffer(self.matcher.compute_logit_bias(), dtype=np.uint8)
        if self.matcher.is_error():
            raise QwenError(f"structured output failed: {self.matcher.get_error()}")
        out = np.full_like(logits, -np.inf)
        n = min(len(allowed), len(logits), self.real)
        keep = np.flatnonzero(allowed[:n])
        out[keep] = logits[keep]
        return out

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise QwenError(f"structured output failed: {self.matcher.get_error()}")

    def finished(self) -> bool:
        return self.matcher.is_stopped()


def _schema_grammar(schema: dict) -> str:
    import llguidance

    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_STYLE)
    except ValueError as e:
        raise QwenError(f"response_format: the JSON schema is not usable: {e}") from None


def _tool_call_grammar(tools: list[Any], name: str | None, tokenizer: Tokenizer) -> str:
    """Lark: one `<tool_call>` block (Qwen's format) whose JSON names one of the tools and carries
    arguments valid for that tool's parameters. Qwen's vocabulary has the tags as single added tokens,
    which llguidance matches by id (`<[id]>`), not by their text."""
    choices = []
    for tool in tools:
        fn = tool.function
        if name is None or fn.name == name:
            choices.append({"type": "object", "properties": {"name": {"const": fn.name},
                                                              "arguments": fn.parameters or {"type": "object"}},
                            "required": ["name", "arguments"], "additionalProperties": False})
    if not choices:
        raise QwenError(f"tool_choice names {name!r}, which is not among the tools")
    schema = choices[0] if len(choices) == 1 else {"anyOf": choices}
    schema = {**schema, "x-guidance": JSON_STYLE}
    tags = []
    for tag in ("<tool_call>", "</tool_call>"):
        i = tokenizer.token_to_id(tag)
        tags.append(f"<[{i}]>" if i is not None else json.dumps(tag))
    return f'start: {tags[0]} "\\n" call "\\n" {tags[1]}\ncall: %json {json.dumps(schema)}\n'


def make_constraint(body: Any, tokenizer: Tokenizer, n_vocab: int | None = None) -> GrammarConstraint | None:
    """The constraint a chat request asks for (response_format, or a tool_choice that forces a call)."""
    n_vocab = n_vocab or tokenizer.vocab_size
    choice = body.tool_choice
    if choice == "required" or (choice is not None and not isinstance(choice, str)):
        if body.response_format is not None and body.response_format.type != "text":
            raise QwenError("response_format and a forced tool_choice cannot be combined")
        name = None if choice == "required" else choice.function.name
        return GrammarConstraint(tokenizer, _tool_call_grammar(body.tools or [], name, tokenizer), n_vocab)
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return GrammarConstraint(tokenizer, _schema_grammar({"type": "object"}), n_vocab)
    if fmt.json_schema is None:
        raise QwenError("response_format json_schema needs a json_schema field")
    return GrammarConstraint(tokenizer, _schema_grammar(fmt.json_schema.schema_ or {}), n_vocab)
