"""Tool calls between OpenAI's shape and Qwen's chat template.

Qwen's template shows the tools inside `<tools></tools>` and asks for each call as
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`; the model's reply is parsed back into
OpenAI `tool_calls` (arguments as JSON text). The other direction, an assistant turn that made calls,
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
        out.append(msg)
    return out


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Split a reply into its content (the text before the first call) and OpenAI tool_calls. A block
    that is not a JSON object with a "name" stays in the content: the caller sees what the model said."""
    start = text.find(OPEN)
    if start < 0:
        return text, []
    calls = []
    for body in _CALL.findall(text[start:]):
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            return text, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, []
        arguments = call.get("arguments", call.get("parameters", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}})
    return text[:start].rstrip("\n") if calls else text, calls


class ToolCallFilter:
    """Streams content until a `<tool_call>` opens; from there the text is held for `parse_tool_calls`.
    A piece that ends with what may be the start of `<tool_call>` is held back until it is not."""

    def __init__(self) -> None:
        self.text = ""
        self.sent = 0
        self.calling = False

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
        content, calls = parse_tool_calls(self.text)
        if calls:
            return content[self.sent:], calls
        return self.text[self.sent:], []
