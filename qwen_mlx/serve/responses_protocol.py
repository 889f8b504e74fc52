"""OpenAI's Responses API request body (`POST /v1/responses`) as pydantic models: what the server accepts.

As in protocol.py, every model forbids unknown fields: a field this server does not implement is a 400 naming
it. The server is stateless: input items are messages, function calls and their outputs, and reasoning sent
back; `item_reference`, built-in tools and `previous_response_id` would need stored responses or tools it does
not have. Output items sent back as input (the openai client's `response.output`) carry their `id`, `status`,
`annotations` and `logprobs`: those are accepted and ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BeforeValidator, Discriminator, Field, Tag, field_validator
from pydantic_core import PydanticCustomError

from .protocol import FunctionDef, SamplingExtras, Strict, Temperature, TokenCount, TopP

ItemStatus = Optional[Literal["in_progress", "completed", "incomplete"]]


class InputText(Strict):
    type: Literal["input_text"]
    text: str


class OutputText(Strict):  # an assistant message's text, sent back
    type: Literal["output_text"]
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: Optional[list[Any]] = None


Part = Annotated[Union[InputText, OutputText], Field(discriminator="type")]


def _as_parts(value: Any) -> Any:
    """Text as one part: a wrong part is then reported at its index, not once per member of a union."""
    return [{"type": "input_text", "text": value}] if isinstance(value, str) else value


class MessageItem(Strict):
    type: Literal["message"] = "message"  # optional: {"role", "content"} alone is a message
    role: Literal["user", "assistant", "system", "developer"]
    content: Annotated[list[Part], BeforeValidator(_as_parts)]  # or text
    id: Optional[str] = None
    status: ItemStatus = None

    def text(self) -> str:
        return "".join(p.text for p in self.content)


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str  # a JSON object, as text
    id: Optional[str] = None
    status: ItemStatus = None


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: Annotated[list[InputText], BeforeValidator(_as_parts)]  # or text
    id: Optional[str] = None
    status: ItemStatus = None

    def text(self) -> str:
        return "".join(p.text for p in self.output)


class SummaryText(Strict):
    type: Literal["summary_text"]
    text: str


class ReasoningText(Strict):
    type: Literal["reasoning_text"]
    text: str


class ReasoningItem(Strict):
    type: Literal["reasoning"]
    summary: list[SummaryText] = Field(default_factory=list)
    content: Optional[list[ReasoningText]] = None
    encrypted_content: Optional[str] = None  # never made here: refused when set (routes/responses.py)
    id: Optional[str] = None
    status: ItemStatus = None

    def text(self) -> str:
        """The reasoning as the template writes it back: its content, else its summary."""
        return "".join(p.text for p in self.content) if self.content else "\n\n".join(p.text for p in self.summary)


def _item_type(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("type", "message")
    return getattr(value, "type", "message")


InputItem = Annotated[
    Union[Annotated[MessageItem, Tag("message")], Annotated[FunctionCallItem, Tag("function_call")],
          Annotated[FunctionCallOutputItem, Tag("function_call_output")], Annotated[ReasoningItem, Tag("reasoning")]],
    Discriminator(_item_type, custom_error_type="unsupported_item",
                  custom_error_message="an input item is a message, function_call, function_call_output or reasoning "
                                       "here (item_reference and built-in tools' items need stored responses or tools "
                                       "this server does not have)"),
]


class FunctionTool(FunctionDef):
    """A function tool as the Responses API writes it: chat's function definition, flat, with its type."""

    type: Literal["function"]


class ToolChoiceFunction(Strict):
    type: Literal["function"]
    name: str


class TextFormatText(Strict):
    type: Literal["text"]


class TextFormatJsonObject(Strict):
    type: Literal["json_object"]


class TextFormatJsonSchema(Strict):
    type: Literal["json_schema"]
    name: str = Field(min_length=1, max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    description: Optional[str] = None
    strict: Optional[bool] = None


TextFormat = Annotated[Union[TextFormatText, TextFormatJsonObject, TextFormatJsonSchema], Field(discriminator="type")]


class TextConfig(Strict):
    format: Optional[TextFormat] = None


class ReasoningConfig(Strict):
    # Qwen has no effort levels: "none" switches a thinking model's reasoning off (Qwen3's enable_thinking),
    # any other effort switches it on; unset leaves the server's default (`serve --no-think`).
    effort: Optional[Literal["none", "minimal", "low", "medium", "high", "xhigh"]] = None
    summary: Optional[Literal["auto", "concise", "detailed"]] = None  # the reasoning comes back whole, as content


def _as_messages(value: Any) -> Any:
    return [{"type": "message", "role": "user", "content": value}] if isinstance(value, str) else value


def _tool_choice(value: Any) -> Any:
    """Anything but a function's name or a mode is said once, plainly (not once per member of the union)."""
    if (isinstance(value, dict) and value.get("type") != "function") or \
            (isinstance(value, str) and value not in ("none", "auto", "required")):
        raise PydanticCustomError("unsupported_tool_choice", "tool_choice is 'none', 'auto', 'required' or a "
                                                             "function (type 'function', with its name) here")
    return value


class ResponsesRequest(SamplingExtras):  # with the chat endpoint's sampling fields beyond OpenAI's set
    model: Optional[str] = None
    input: Annotated[list[InputItem], BeforeValidator(_as_messages)]  # or text: one user message
    instructions: Optional[str] = None
    max_output_tokens: Optional[TokenCount] = None
    temperature: Optional[Temperature] = None
    top_p: Optional[TopP] = None
    tools: Optional[list[FunctionTool]] = None
    tool_choice: Annotated[Union[Literal["none", "auto", "required"], ToolChoiceFunction, None],
                           BeforeValidator(_tool_choice)] = None
    parallel_tool_calls: Optional[bool] = None
    text: Optional[TextConfig] = None
    reasoning: Optional[ReasoningConfig] = None
    stream: Optional[bool] = False
    store: Optional[bool] = None  # accepted; nothing is stored (the server is stateless)
    previous_response_id: Optional[str] = None  # refused when set: there is nothing stored to continue from
    truncation: Optional[Literal["disabled"]] = None  # the only behaviour: a prompt too long is a 400
    metadata: Optional[dict[str, str]] = None  # echoed back
    user: Optional[str] = None  # an end-user id for the caller's logs; changes nothing

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_only(cls, tools: Any) -> Any:
        for i, tool in enumerate(tools if isinstance(tools, list) else []):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                what = repr(kind)[:40].replace("{", "(").replace("}", ")")  # the message is a format template
                raise PydanticCustomError("unsupported_tool", f"tools[{i}] is a {what} tool; this server runs "
                                                              "function tools only (type 'function', with a name)")
        return tools

    @field_validator("metadata")
    @classmethod
    def _metadata_bounds(cls, metadata: Optional[dict[str, str]]) -> Optional[dict[str, str]]:
        if metadata is not None and (len(metadata) > 16 or
                                     any(len(k) > 64 or len(v) > 512 for k, v in metadata.items())):
            raise PydanticCustomError("metadata", "at most 16 pairs, keys up to 64 characters, values up to 512")
        return metadata
