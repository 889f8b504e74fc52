"""OpenAI's Responses API (`POST /v1/responses`) and Prometheus `/metrics` on a real server process, driven by
the official `openai` client (raw HTTP where the client would hide the wire format).

One server for the module: the tiny Qwen3 (1,024 positions) with Qwen3.5's generation tail (the template opens
`<think>\\n` unless `enable_thinking` is false), so one model gives replies that are all reasoning and, with
`reasoning.effort: "none"`, replies that are all answer. The chat endpoint on the same server is the reference."""

from __future__ import annotations

import json

import pytest

from tests.support.server import Server
from tests.support.thinking import thinking_copy

import httpx  # noqa: E402
import jsonschema  # noqa: E402
import openai  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

MODEL = "qwen3"
QUESTION = "Tell me a story about a cat."
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
           "required": ["city"], "additionalProperties": False}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    folder = thinking_copy(tiny_model("qwen3-untied"), tmp_path_factory.mktemp("responses") / MODEL)
    s = Server(folder)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def chat(client, max_tokens, stream=False, **extra):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=max_tokens, temperature=0, stream=stream, extra_body=extra)


def raw_events(server, body):
    """The SSE stream as sent: (event line's name, data) pairs."""
    out = []
    with httpx.stream("POST", server.url + "/v1/responses", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for frame in r.read().decode().split("\n\n"):
            if frame.strip():
                name, data = frame.split("\n")
                assert name.startswith("event: ") and data.startswith("data: ")
                out.append((name[len("event: "):], json.loads(data[len("data: "):])))
    return out


def test_reply_equals_chat_streamed_or_not(server, client):
    """An answer (thinking off): the message's text is the chat endpoint's greedy content, and streamed its
    deltas are the chat endpoint's, token for token; the events are the ones the openai client parses."""
    ref = chat(client, 12, **NO_THINK)
    ref_deltas = [c.choices[0].delta.content for c in chat(client, 12, stream=True, **NO_THINK)
                  if c.choices and c.choices[0].delta.content]
    assert "".join(ref_deltas) == ref.choices[0].message.content != ""
    r = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=12, temperature=0,
                                reasoning={"effort": "none"})
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert [item.type for item in r.output] == ["message"]
    assert r.output[0].content[0].type == "output_text" and r.output[0].content[0].annotations == []
    assert r.output_text == ref.choices[0].message.content
    assert r.usage.input_tokens == ref.usage.prompt_tokens and r.usage.output_tokens == ref.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.usage.input_tokens_details.cached_tokens > 0  # the chat requests left the prompt in the prefix cache
    length = ref.choices[0].finish_reason == "length"
    assert r.status == ("incomplete" if length else "completed")
    assert (r.incomplete_details.reason if length else r.incomplete_details) == \
        ("max_output_tokens" if length else None)

    events = list(client.responses.create(model=MODEL, input=[{"role": "user", "content": QUESTION}],
                                          max_output_tokens=12, temperature=0, reasoning={"effort": "none"},
                                          stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:4]] == ["response.created", "response.in_progress", "response.output_item.added",
                                            "response.content_part.added"]
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == ref_deltas
    tail = [e.type for e in events if e.type != "response.output_text.delta"][-4:]
    assert tail == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                    "response.incomplete" if length else "response.completed"]
    final = events[-1].response
    assert final.output_text == r.output_text and final.usage.output_tokens == r.usage.output_tokens
    assert final.output[0].id == events[2].item.id

    # The wire format: `event: NAME` before each `data:`, the name equal to the data's type; no [DONE].
    wire = raw_events(server, {"input": QUESTION, "max_output_tokens": 12, "temperature": 0,
                               "reasoning": {"effort": "none"}})
    assert all(name == data["type"] for name, data in wire)
    assert [name for name, _ in wire] == [e.type for e in events]
    # The client's stream helper accumulates the same events without complaint.
    with client.responses.stream(model=MODEL, input=QUESTION, max_output_tokens=12, temperature=0,
                                 reasoning={"effort": "none"}) as stream:
        assert "".join(e.delta for e in stream if e.type == "response.output_text.delta") == r.output_text


def test_reasoning_apart_and_sent_back(client):
    """Thinking on: the reply (all inside the block the prompt opened) is a reasoning item equal to the chat
    endpoint's reasoning_content, streamed as reasoning_text deltas, its tokens counted as reasoning."""
    ref = chat(client, 8).choices[0].message
    assert ref.content == "" and ref.reasoning_content
    r = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=8, temperature=0)
    assert [item.type for item in r.output] == ["reasoning"] and r.status == "incomplete"
    item = r.output[0]
    assert item.id.startswith("rs_") and item.summary == [] and item.content[0].type == "reasoning_text"
    assert item.content[0].text == ref.reasoning_content and r.output_text == ""
    assert r.usage.output_tokens_details.reasoning_tokens == r.usage.output_tokens == 8
    events = list(client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=8, temperature=0,
                                          stream=True))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == ref.reasoning_content
    (done,) = [e for e in events if e.type == "response.reasoning_text.done"]
    assert done.text == ref.reasoning_content and events[-1].type == "response.incomplete"
    # Sent back with the conversation (the openai client's output items as they came), then answered.
    again = client.responses.create(model=MODEL, max_output_tokens=4, temperature=0, reasoning={"effort": "none"},
                                    input=[{"role": "user", "content": QUESTION}, *r.output,
                                           {"role": "user", "content": "Go on."}])
    assert again.output[-1].type == "message"


def test_conversation_items_become_messages():
    """Input items -> the chat messages the template reads: instructions first, parallel calls in one
    assistant turn, reasoning on the assistant turn after it, tool outputs as tool messages."""
    from qwen_mlx.serve.responses_protocol import ResponsesRequest
    from qwen_mlx.serve.routes.responses import conversation

    body = ResponsesRequest.model_validate({"instructions": "Be brief.", "input": [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Use tools."}]},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Two."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "21"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "18"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "21 and 18.", "annotations": []}]}]})
    messages = conversation(body)
    assert [m.role for m in messages] == ["system", "developer", "user", "assistant", "tool", "tool", "assistant"]
    assert messages[0].content == "Be brief." and messages[1].content == "Use tools."
    assert messages[3].reasoning_content == "Two." and [c.id for c in messages[3].tool_calls] == ["c1", "c2"]
    assert (messages[5].tool_call_id, messages[5].content) == ("c2", "18")
    assert messages[6].content == "21 and 18." and messages[6].reasoning_content is None


def test_reply_events_for_calls_and_failures():
    """The event sequence around function calls (parallel_tool_calls: false keeps the first) and a failure."""
    from qwen_mlx.engine import Done
    from qwen_mlx.serve.routes.responses import Reply
    from qwen_mlx.serve.tools import ToolCallFilter

    reply = Reply({"id": "resp_1", "output": []}, None, ToolCallFilter(), parallel=False)
    assert [e["type"] for e in reply.start()] == ["response.created", "response.in_progress"]
    calls = "".join(f'<tool_call>\n{{"name": "f", "arguments": {{"x": {x}}}}}\n</tool_call>\n' for x in (1, 2))
    events = reply.token("Checking. ") + reply.token(calls) + reply.finish(Done("stop", "", 10, 30, 4))
    assert [e["type"] for e in events] == [
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(2, 2 + len(events)))
    final = events[-1]["response"]
    assert [item["type"] for item in final["output"]] == ["message", "function_call"]
    assert final["output"][0]["content"][0]["text"] == "Checking. " and final["output"][1]["arguments"] == '{"x": 1}'
    assert final["usage"]["input_tokens_details"]["cached_tokens"] == 4 and final["status"] == "completed"
    failing = Reply({"id": "resp_2", "output": []}, None, None, parallel=True)
    (failed,) = failing.failed("generation failed: boom")
    assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
    assert failed["response"]["error"] == {"code": "server_error", "message": "generation failed: boom"}


def test_function_tool_round_trip(client):
    """A forced call comes back as a function_call item (streamed as argument events); its output sent back
    is rendered as the chat endpoint renders a tool message, and the model answers."""
    r = client.responses.create(model=MODEL, input=QUESTION, tools=TOOLS, temperature=0, max_output_tokens=60,
                                tool_choice={"type": "function", "name": "get_weather"})
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    assert r.status == "completed" and r.output_text == ""
    events = list(client.responses.create(model=MODEL, input=QUESTION, tools=TOOLS, temperature=0,
                                          max_output_tokens=60, tool_choice="required", stream=True))
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.arguments == call.arguments  # greedy: the same call
    assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == call.arguments
    assert events[-1].type == "response.completed" and events[-1].response.output[0].name == "get_weather"

    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'}
    r2 = client.responses.create(model=MODEL, tools=TOOLS, temperature=0, max_output_tokens=6,
                                 reasoning={"effort": "none"},
                                 input=[{"role": "user", "content": QUESTION}, call, result])
    assert r2.output[-1].type == "message" and r2.output_text
    ref = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=6, extra_body=NO_THINK,
        tools=[{"type": "function", "function": {k: v for k, v in TOOLS[0].items() if k != "type"}}],
        messages=[{"role": "user", "content": QUESTION},
                  {"role": "assistant", "content": None, "tool_calls": [{
                      "id": call.call_id, "type": "function",
                      "function": {"name": call.name, "arguments": call.arguments}}]},
                  {"role": "tool", "tool_call_id": call.call_id, "content": '{"temperature": 21}'}])
    assert r2.usage.input_tokens == ref.usage.prompt_tokens and r2.output_text == ref.choices[0].message.content


def test_json_schema_output_is_valid(client):
    schema = {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["city", "days"],
        "additionalProperties": False}
    for seed in (1, 2):  # sampled, not greedy: the grammar holds whatever the sampler picks
        r = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=60, temperature=1.0,
                                    extra_body={"seed": seed}, text={"format": {
                                        "type": "json_schema", "name": "trip", "schema": schema, "strict": True}})
        assert r.status == "completed" and r.text.format.type == "json_schema" and r.text.format.name == "trip"
        jsonschema.validate(json.loads(r.output_text), schema)
    r = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=30, temperature=0,
                                text={"format": {"type": "json_object"}})
    assert r.output_text.startswith("{")  # a random model may still be inside a long string at max_output_tokens


def test_errors_in_openai_shape(server, client):
    def refused(body: dict, param: str | None) -> str:
        r = httpx.post(server.url + "/v1/responses", json={"input": "Hi", **body})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert error["param"] == param, error
        return error["message"]

    assert "frobnicate" in refused({"frobnicate": 1}, "frobnicate")
    assert "function tools only" in refused({"tools": [{"type": "web_search"}]}, "tools")
    assert "stores no responses" in refused({"previous_response_id": "resp_1"}, "previous_response_id")
    assert "item_reference" in refused({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0")
    image = {"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}
    assert "input_image" in refused({"input": [image]}, "input.0.message.content.0")  # the item kind in the path
    assert "'required'" in refused({"tools": TOOLS, "tool_choice": {"type": "web_search_preview"}}, "tool_choice")
    assert "not among the tools" in refused({"tools": TOOLS, "tool_choice": {"type": "function", "name": "x"}},
                                            "tool_choice")
    assert "max_output_tokens" in refused({"max_output_tokens": 10 ** 6}, "max_output_tokens")
    assert "input is empty" in refused({"input": []}, "input")
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model=MODEL, input="Hi", previous_response_id="resp_1")
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-5", input="Hi")
    # store is accepted (nothing is stored)
    assert client.responses.create(model=MODEL, input="Hi", store=True, max_output_tokens=1).status == "incomplete"


def scrape(server) -> dict[tuple[str, tuple], float]:
    r = httpx.get(server.url + "/metrics")  # no key needed, as /health
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_move_with_requests(server, client):
    before = scrape(server)
    r = client.responses.create(model=MODEL, input="Count to ten.", max_output_tokens=5, temperature=0,
                                reasoning={"effort": "none"})
    again = client.responses.create(model=MODEL, input="Count to ten.", max_output_tokens=5, temperature=0,
                                    reasoning={"effort": "none"})
    httpx.post(server.url + "/v1/responses", json={"input": "Hi", "frobnicate": 1})
    httpx.get(server.url + "/no/such/path")
    too_big = httpx.post(server.url + "/v1/responses", content=b" " * (4 * 1024 * 1024 + 1))
    assert too_big.status_code == 413  # refused before routing, still counted under its route
    after = scrape(server)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    p = "qwen_mlx_"
    assert moved(p + "http_requests_total", endpoint="/v1/responses", status="200") == 2
    assert moved(p + "http_requests_total", endpoint="/v1/responses", status="400") == 1
    assert moved(p + "http_requests_total", endpoint="other", status="404") == 1
    assert moved(p + "http_requests_total", endpoint="/v1/responses", status="413") == 1
    assert moved(p + "http_requests_total", endpoint="/metrics", status="200") == 1  # the first scrape
    assert moved(p + "prompt_tokens_total") == r.usage.input_tokens + again.usage.input_tokens
    assert moved(p + "generation_tokens_total") == r.usage.output_tokens + again.usage.output_tokens
    assert moved(p + "prefix_cache_hit_tokens_total") == \
        r.usage.input_tokens_details.cached_tokens + again.usage.input_tokens_details.cached_tokens > 0
    assert moved(p + "request_finished_total", finished_reason="length") == 2
    assert moved(p + "time_to_first_token_seconds_count") == 2 == moved(p + "e2e_request_latency_seconds_count")
    assert moved(p + "inter_token_latency_seconds_count") == 2 * (5 - 1)
    assert after[(p + "num_requests_running", ())] == 0 and after[(p + "num_requests_waiting", ())] == 0
    assert after[(p + "max_batch", ())] == 16


def test_metrics_registries_are_per_app():
    """Two apps' metrics in one process: separate registries, no duplicate-name clash."""
    from qwen_mlx.serve.metrics import Metrics

    class Engine:
        def load(self):
            return {"running": 3, "waiting": 1, "max_batch": 4, "cancelled": 2}

    one, two = Metrics(Engine()), Metrics(Engine())
    one.requests.labels("/v1/responses", "200").inc()
    samples = {s.name: s.value for f in text_string_to_metric_families(two.exposition().decode()) for s in f.samples}
    assert samples["qwen_mlx_num_requests_running"] == 3 and samples["qwen_mlx_requests_cancelled_total"] == 2
    assert "qwen_mlx_http_requests_total" not in samples  # two has served nothing
