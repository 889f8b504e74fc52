"""Anthropic's Messages API: its request bodies as pydantic models, their translation for the chat template,
and its error shape.

The bodies forbid unknown fields as protocol.py's do (a field this server does not implement is a 400
naming it). A conversation goes to the chat template in the OpenAI-style dicts tools.py writes for
`/v1/chat/completions`: `system` becomes a system message, an assistant's `tool_use` blocks its `tool_calls`
(arguments as an object), a user's `tool_result` blocks `tool` messages, and `thinking` blocks the turn's
`reasoning_content`. Errors are `{"type": "error", "error": {"type", "message"}}`, the type read from the
HTTP status as Anthropic pairs them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import QwenError
from .protocol import ChatRequest, FunctionDef, JsonSchema, MinP, NamedToolChoice, Penalty, RepetitionPenalty, \
    ResponseFormat, Sampling, Seed, TokenCount, Tool, TopK, TopP, temperature

PATH = "/v1/messages"  # every route under it answers errors in Anthropic's shape

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                503: "overloaded_error", 529: "overloaded_error"}


def is_anthropic_path(path: str) -> bool:
    return path == PATH or path.startswith(PATH + "/")


def error_body(status: int, message: str) -> dict:
    kind = _ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


_BRANCH = re.compile(r"^(str|int|float|bool|none|dict\[.*|list\[.*|tagged-union\[.*|function-.*)$")


def describe_invalid(errors: list[dict]) -> str:
    """Pydantic's complaint about a Messages body in one line. A union's branches each complain (a block list
    that is not text also "should be a valid string"): the first complaint past the string branch is the one
    that says what is wrong. Pydantic's branch labels are left out of the field's path."""
    if not errors:
        return "invalid request body"
    err = next((e for e in errors if "str" not in e.get("loc", ())), errors[0])
    loc = [str(p) for p in err.get("loc", ()) if p != "body" and not (isinstance(p, str) and _BRANCH.match(p))]
    where, kind, ctx = ".".join(loc), err.get("type"), err.get("ctx") or {}
    if kind == "json_invalid":
        return f"the request body is not valid JSON ({ctx.get('error', err['msg'])})"
    if kind == "extra_forbidden":
        return f"unsupported field {where!r}: this server does not implement it"
    if kind == "missing":
        return f"missing field {where!r}"
    if kind == "union_tag_invalid":
        return f"{where}: type {ctx.get('tag')!r} is not supported here (expected one of {ctx.get('expected_tags')})"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else f"invalid request body: {msg}"


# --- request bodies ----------------------------------------------------------------------------------

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CacheControl(Strict):
    """Accepted and ignored: the server's prefix cache reuses any shared prefix without being asked."""
    type: Literal["ephemeral"]
    ttl: Optional[str] = None


class TextBlock(Strict):
    type: Literal["text"]
    text: str
    cache_control: Optional[CacheControl] = None
    citations: Optional[list[Any]] = None  # a previous reply's citations: accepted, not rendered


class ThinkingBlock(Strict):
    type: Literal["thinking"]
    thinking: str
    signature: Optional[str] = None  # accepted and ignored: this server signs nothing


class RedactedThinkingBlock(Strict):
    type: Literal["redacted_thinking"]
    data: str  # another model's encrypted reasoning: dropped


class ToolUseBlock(Strict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: Optional[CacheControl] = None


class ToolResultBlock(Strict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: Union[str, list[TextBlock], None] = None
    is_error: bool = False
    cache_control: Optional[CacheControl] = None


Block = Annotated[Union[TextBlock, ThinkingBlock, RedactedThinkingBlock, ToolUseBlock, ToolResultBlock],
                  Field(discriminator="type")]


class Message(Strict):
    role: Literal["user", "assistant", "system"]
    content: Union[str, list[Block]]


class ToolDef(Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Optional[str] = None
    input_schema: dict[str, Any]
    type: Optional[Literal["custom"]] = None  # server tools (web search, code execution, ...) are refused
    cache_control: Optional[CacheControl] = None
    strict: Optional[bool] = None

    @model_validator(mode="before")
    @classmethod
    def _client_tools_only(cls, value: Any) -> Any:
        kind = value.get("type") if isinstance(value, dict) else None
        if kind not in (None, "custom"):
            raise ValueError(f"the server tool {kind!r} is not available here: only client tools (name, "
                             f"description, input_schema) are")
        return value


class ToolChoiceAuto(Strict):
    type: Literal["auto"]
    disable_parallel_tool_use: bool = False


class ToolChoiceAny(Strict):
    type: Literal["any"]
    disable_parallel_tool_use: bool = False


class ToolChoiceTool(Strict):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool = False


class ToolChoiceNone(Strict):
    type: Literal["none"]


ToolChoice = Annotated[Union[ToolChoiceAuto, ToolChoiceAny, ToolChoiceTool, ToolChoiceNone],
                       Field(discriminator="type")]


class ThinkingEnabled(Strict):
    type: Literal["enabled"]
    budget_tokens: TokenCount  # accepted, not enforced: max_tokens bounds reasoning and answer together
    display: Optional[Literal["summarized", "omitted"]] = None


class ThinkingAdaptive(Strict):
    type: Literal["adaptive"]
    display: Optional[Literal["summarized", "omitted"]] = None


class ThinkingDisabled(Strict):
    type: Literal["disabled"]


Thinking = Annotated[Union[ThinkingEnabled, ThinkingAdaptive, ThinkingDisabled], Field(discriminator="type")]


class OutputFormat(Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Strict):
    format: Optional[OutputFormat] = None
    effort: Optional[Literal["low", "medium", "high", "xhigh", "max"]] = None  # accepted and ignored


class Metadata(Strict):
    user_id: Optional[str] = None


class PromptBody(Strict):
    """What decides the prompt: the body of `/v1/messages/count_tokens`, and the core of `/v1/messages`."""
    model: str
    messages: list[Message] = Field(min_length=1)
    system: Union[str, list[TextBlock], None] = None
    tools: Optional[list[ToolDef]] = None
    tool_choice: Optional[ToolChoice] = None
    thinking: Optional[Thinking] = None
    output_config: Optional[OutputConfig] = None
    cache_control: Optional[CacheControl] = None

    def forced(self) -> bool:
        """Whether the reply is bound by a grammar: a forced tool call or a JSON output format."""
        choice = self.tool_choice
        return (choice is not None and choice.type in ("any", "tool")) or \
            (self.output_config is not None and self.output_config.format is not None)


Temperature = temperature(1)  # Anthropic's range, [0, 1]


class MessagesRequest(PromptBody):
    max_tokens: TokenCount
    stop_sequences: Optional[list[Annotated[str, Field(min_length=1)]]] = None
    stream: bool = False
    temperature: Optional[Temperature] = None
    top_p: Optional[TopP] = None
    top_k: Optional[TopK] = None
    metadata: Optional[Metadata] = None
    service_tier: Optional[Literal["auto", "standard_only"]] = None  # one tier here: accepted and ignored
    # Beyond Anthropic's set, as /v1/chat/completions takes them (the anthropic client sends them in extra_body).
    min_p: Optional[MinP] = None
    repetition_penalty: Optional[RepetitionPenalty] = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    seed: Optional[Seed] = None

    def sampling(self) -> Sampling:
        """The body's sampling fields as the serving core reads them."""
        fields = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "seed", "stream")
        return Sampling(model=self.model, stop=self.stop_sequences or None, **{k: getattr(self, k) for k in fields})


CountTokensRequest = PromptBody


# --- translation -------------------------------------------------------------------------------------

def _text(blocks: Union[str, list[TextBlock], None]) -> str:
    """Text blocks as one string: separate blocks are separate paragraphs, joined by a newline."""
    if blocks is None or isinstance(blocks, str):
        return blocks or ""
    return "\n".join(b.text for b in blocks)


def template_messages(body: PromptBody) -> list[dict[str, Any]]:
    """The conversation as the chat template reads it (tools.py's shape for OpenAI messages)."""
    out: list[dict[str, Any]] = []
    if body.system:
        out.append({"role": "system", "content": _text(body.system)})
    for i, m in enumerate(body.messages):
        blocks = [TextBlock(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        allowed = {"user": ("text", "tool_result"), "assistant": ("text", "thinking", "redacted_thinking", "tool_use"),
                   "system": ("text",)}[m.role]
        for j, b in enumerate(blocks):
            if b.type not in allowed:
                raise QwenError(f"messages.{i}.content.{j}: a {m.role} message cannot hold a {b.type} block")
        out.extend(_assistant(blocks) if m.role == "assistant" else _user(blocks, m.role))
    return out


def _user(blocks: list[Any], role: str) -> list[dict[str, Any]]:
    """A user turn in order: runs of text as user messages, each tool_result as a `tool` message."""
    out: list[dict[str, Any]] = []
    text: list[str] = []
    for b in blocks:
        if b.type == "text":
            text.append(b.text)
            continue
        if text:
            out.append({"role": role, "content": "\n".join(text)})
            text = []
        content = _text(b.content)
        out.append({"role": "tool", "tool_call_id": b.tool_use_id,
                    "content": f"Error: {content}" if b.is_error else content})
    if text or not out:
        out.append({"role": role, "content": "\n".join(text)})
    return out


def _assistant(blocks: list[Any]) -> list[dict[str, Any]]:
    text = "\n".join(b.text for b in blocks if b.type == "text")
    msg: dict[str, Any] = {"role": "assistant", "content": text}
    calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}}
             for b in blocks if b.type == "tool_use"]
    if calls:
        msg["tool_calls"] = calls
    thinking = [b.thinking for b in blocks if b.type == "thinking"]
    if thinking:  # Qwen3's template writes it back inside <think> where the turn needs it
        msg["reasoning_content"] = "\n".join(thinking)
    return [msg]


def function_tools(body: PromptBody) -> list[dict[str, Any]] | None:
    """The tools as OpenAI function tools (what Qwen's template shows), or None when there are none to offer
    (tool_choice none: as on /v1/chat/completions, the template shows no tools)."""
    choice = body.tool_choice
    if choice is not None and choice.type in ("any", "tool") and not body.tools:
        raise QwenError(f"tool_choice {choice.type!r} needs tools")
    if choice is not None and choice.type == "tool" and choice.name not in {t.name for t in body.tools or []}:
        raise QwenError(f"tool_choice names {choice.name!r}, which is not among the tools")
    if not body.tools or (choice is not None and choice.type == "none"):
        return None
    return [{"type": "function", "function": {"name": t.name, **({"description": t.description} if t.description
                                                                  is not None else {}),
                                               "parameters": t.input_schema}} for t in body.tools]


def constraint_body(body: PromptBody) -> ChatRequest:
    """The chat request whose grammar (serving.config.make_constraint, grammar.py) binds this reply: the tools
    as function tools with `tool_choice` "required" (any) or named (tool), or the output format as a
    `json_schema` response_format."""
    choice = body.tool_choice
    tools = [Tool(type="function", function=FunctionDef(name=t.name, parameters=t.input_schema))
             for t in body.tools or []]
    tool_choice: Any = None
    if choice is not None and choice.type == "any":
        tool_choice = "required"
    elif choice is not None and choice.type == "tool":
        tool_choice = NamedToolChoice(type="function", function={"name": choice.name})
    fmt = body.output_config.format if body.output_config is not None else None
    response_format = None if fmt is None else \
        ResponseFormat(type="json_schema", json_schema=JsonSchema(name="output", schema=fmt.schema_))
    return ChatRequest.model_construct(tools=tools, tool_choice=tool_choice, response_format=response_format)
