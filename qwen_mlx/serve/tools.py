"""Tool calls between OpenAI's shape and Qwen's chat template.

Qwen's template shows the tools inside `<tools></tools>` and asks for each call as
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (Qwen2.5, Qwen3), or in XML as Qwen3-Coder and
Qwen3.5/3.6 do: `<tool_call>\\n<function=NAME>\\n<parameter=P>\\nvalue\\n</parameter>\\n</function>\\n</tool_call>`.
The model's reply is parsed back into OpenAI `tool_calls` (arguments as JSON text); an XML parameter's value
is text, typed by the tool's JSON schema where it says (a string stays a string) and read as JSON otherwise
when it is JSON, as vLLM's qwen3_coder parser does. The other direction, an assistant turn that made calls,
goes to the template with `arguments` as an object, as HF's chat-template convention wants.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from ..errors import QwenError
from .protocol import Message

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)
_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.DOTALL)
Schemas = dict[str, dict[str, Any]]  # tool name -> its parameters' JSON schemas by name


def template_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """OpenAI messages -> the dicts the chat template reads."""
    out = []
    for m in messages:
        content = m.content if not isinstance(m.content, list) else "".join(p.text for p in m.content)
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.tool_calls:
            calls = []
            for call in m.tool_calls:
                try:
                    arguments = json.loads(call.function.arguments or "{}")
                except json.JSONDecodeError as e:
                    raise QwenError(f"messages: tool call {call.function.name!r} has arguments that are not "
                                    f"JSON ({e})") from None
                calls.append({"type": "function", "function": {"name": call.function.name, "arguments": arguments}})
            msg["tool_calls"] = calls
        if m.role == "tool" and m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        if m.name:
            msg["name"] = m.name
        if m.reasoning_content is not None:  # Qwen3's template writes it back inside <think> on the last turn
            msg["reasoning_content"] = m.reasoning_content
        out.append(msg)
    return out


def parameter_schemas(tools: list[dict[str, Any]] | None) -> Schemas:
    """The request's tools as {name: {parameter: schema}}, for typing XML parameter values."""
    out: Schemas = {}
    for tool in tools or []:
        function = tool.get("function") or {}
        out[function.get("name", "")] = ((function.get("parameters") or {}).get("properties") or {})
    return out


def parse_tool_calls(text: str, schemas: Schemas | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Split a reply into its content (the text before the first call) and OpenAI tool_calls. A block
    that is neither a JSON object with a "name" nor an XML `<function=...>` stays in the content: the caller
    sees what the model said."""
    start = text.find(OPEN)
    if start < 0:
        return text, []
    calls = []
    for body in _CALL.findall(text[start:]):
        call = _xml_call(body, schemas or {}) if body.startswith("<function=") else _json_call(body)
        if call is None:
            return text, []
        arguments = call.get("arguments", call.get("parameters", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}})
    return text[:start].rstrip("\n") if calls else text, calls


def _json_call(body: str) -> dict[str, Any] | None:
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    return call if isinstance(call, dict) and isinstance(call.get("name"), str) else None


def _xml_call(body: str, schemas: Schemas) -> dict[str, Any] | None:
    m = _FUNCTION.match(body)
    if m is None:
        return None
    name = m[1].strip()
    properties = schemas.get(name, {})
    arguments = {p[1].strip(): _typed(p[2], properties.get(p[1].strip())) for p in _PARAMETER.finditer(m[2])}
    return {"name": name, "arguments": arguments}


def _typed(raw: str, schema: dict[str, Any] | None) -> Any:
    """An XML parameter's text (one newline either side is the format's) as its schema's type."""
    value = raw[1:] if raw.startswith("\n") else raw
    value = value[:-1] if value.endswith("\n") else value
    kind = (schema or {}).get("type")
    if kind == "string" or (isinstance(kind, list) and "string" in kind):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


class ToolCallFilter:
    """Streams content until a `<tool_call>` opens; from there the text is held for `parse_tool_calls`.
    A piece that ends with what may be the start of `<tool_call>` is held back until it is not."""

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        self.text = ""
        self.sent = 0
        self.calling = False
        self.schemas = parameter_schemas(tools)

    def add(self, piece: str) -> str:
        self.text += piece
        if self.calling:
            return ""
        at = self.text.find(OPEN, self.sent)
        if at >= 0:
            self.calling = True
            out, self.sent = self.text[self.sent:at], at
            return out
        end = len(self.text)
        for k in range(min(len(OPEN) - 1, end - self.sent), 0, -1):  # a partial "<tool_call" at the end
            if OPEN.startswith(self.text[end - k:]):
                end -= k
                break
        out, self.sent = self.text[self.sent:end], end
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(content not yet sent, tool calls)."""
        content, calls = parse_tool_calls(self.text, self.schemas)
        if calls:
            return content[self.sent:], calls
        return self.text[self.sent:], []
