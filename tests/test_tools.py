"""Tool calls in both of Qwen's formats parsed into OpenAI's shape: JSON (Qwen2.5, Qwen3) and XML (Qwen3-Coder,
Qwen3.5, Qwen3.6), with XML values typed by the tool's schema, streamed through ToolCallFilter piece by piece."""

from __future__ import annotations

import json

import pytest

from qwen_mlx.serve.tools import ToolCallFilter, parse_tool_calls

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "zip": {"type": "string"}, "units": {"type": ["string", "null"]}}}}},
         {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {}}}}]

XML = ("Let me look.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco\n</parameter>\n"
       "<parameter=days>\n3\n</parameter>\n<parameter=zip>\n94107\n</parameter>\n</function>\n</tool_call>\n"
       "<tool_call>\n<function=search>\n<parameter=query>\n{\"q\": \"rain\", \"n\": 2}\n</parameter>\n"
       "<parameter=note>\nmulti\nline text\n</parameter>\n</function>\n</tool_call>")


def _arguments(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_xml_calls_typed_by_schema():
    from qwen_mlx.serve.tools import parameter_schemas

    content, calls = parse_tool_calls(XML, parameter_schemas(TOOLS))
    assert content == "Let me look."
    assert _arguments(calls) == [
        ("get_weather", {"city": "San Francisco", "days": 3, "zip": "94107"}),  # zip stays a string
        ("search", {"query": {"q": "rain", "n": 2}, "note": "multi\nline text"}),  # no schema: JSON, else text
    ]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)


def test_json_calls_still_parse_and_broken_blocks_stay_content():
    text = 'ok\n<tool_call>\n{"name": "search", "arguments": {"q": "x"}}\n</tool_call>'
    assert _arguments(parse_tool_calls(text)[1]) == [("search", {"q": "x"})]
    for broken in ("<tool_call>\nnot json\n</tool_call>", "<tool_call>\n<function_call>x</tool_call>"):
        assert parse_tool_calls("hi " + broken) == ("hi " + broken, [])


@pytest.mark.parametrize("size", [1, 3, 17])
def test_streaming_holds_back_the_xml_call(size):
    filt = ToolCallFilter(TOOLS)
    sent = "".join(filt.add(XML[i:i + size]) for i in range(0, len(XML), size))
    rest, calls = filt.finish()
    assert sent + rest == "Let me look.\n"  # what came before the call, streamed as it came
    assert [name for name, _ in _arguments(calls)] == ["get_weather", "search"]
