"""`/v1/messages` as Anthropic's own client meets it: one real server process (the tiny Qwen3 with a thinking
template whose generation prompt opens `<think>`, and an API key), driven by the official `anthropic` client
and compared with `/v1/chat/completions` on the same server, greedy, token for token."""

from __future__ import annotations

import json

import pytest

from tests.support.server import Server
from tests.support.thinking import thinking_copy

import anthropic  # noqa: E402  ([dev] installs it: a missing one is a failure)
import httpx  # noqa: E402

KEY = "test-key-anthropic"
MODEL = "qwen3"
GREEDY = {"temperature": 0}  # the anthropic 2.x client sends sampling fields in the body, through extra_body
USER = [{"role": "user", "content": "Tell me a story about a cat."}]
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                            "required": ["city"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def folder(tiny_model, tmp_path_factory):
    return thinking_copy(tiny_model("qwen3-untied"), tmp_path_factory.mktemp("anthropic") / MODEL)


@pytest.fixture(scope="module")
def server(folder):
    s = Server(folder, "--api-key", KEY)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def chat(server, messages, max_tokens, thinking=True, **extra):
    """The chat endpoint's greedy reply to the same conversation (OpenAI's client, Bearer key)."""
    return server.client(KEY).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": thinking}}, **extra)


def blocks(message, kind):
    return [b for b in message.content if b.type == kind]


def test_replies_equal_the_chat_endpoints_streamed_or_not(server, claude):
    for thinking in (False, True):
        want = chat(server, USER, 12, thinking)
        message = claude.messages.create(model=MODEL, max_tokens=12, messages=USER, extra_body=GREEDY,
                                          thinking={"type": "enabled", "budget_tokens": 1024} if thinking
                                          else {"type": "disabled"})
        reasoning = getattr(want.choices[0].message, "reasoning_content", None) or ""
        assert message.id.startswith("msg_") and message.role == "assistant" and message.model == MODEL
        assert "".join(b.text for b in blocks(message, "text")) == want.choices[0].message.content
        assert "".join(b.thinking for b in blocks(message, "thinking")) == reasoning
        assert bool(reasoning) == thinking  # the template opened <think>: the tiny model's reply is reasoning
        assert all(b.signature == "" for b in blocks(message, "thinking"))
        assert message.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[want.choices[0].finish_reason]
        assert message.usage.output_tokens == want.usage.completion_tokens
        assert message.usage.input_tokens + message.usage.cache_read_input_tokens == want.usage.prompt_tokens
        assert message.usage.cache_read_input_tokens > 0  # the chat request left the prompt in the prefix cache
        with claude.messages.stream(model=MODEL, max_tokens=12, messages=USER, extra_body=GREEDY,
                                    thinking={"type": "adaptive"} if thinking else {"type": "disabled"}) as stream:
            events = [e.type for e in stream]
            streamed = stream.get_final_message()
        assert [b.model_dump() for b in streamed.content] == [b.model_dump() for b in message.content]
        assert streamed.stop_reason == message.stop_reason
        assert streamed.usage.output_tokens == message.usage.output_tokens
        assert events[0] == "message_start" and events[-2:] == ["message_delta", "message_stop"]
        assert ("thinking" in events) == thinking and events.count("content_block_start") == len(message.content)


def test_stop_sequences_say_which_one_stopped(claude):
    full = claude.messages.create(model=MODEL, max_tokens=30, messages=USER, thinking={"type": "disabled"},
                                  extra_body=GREEDY)
    text = full.content[0].text
    assert len(text) > 12 and full.stop_reason == "max_tokens"
    stop = text[6:10]
    for stream in (False, True):
        kwargs = dict(model=MODEL, max_tokens=30, messages=USER, thinking={"type": "disabled"}, extra_body=GREEDY,
                      stop_sequences=["never there", stop])
        if stream:
            with claude.messages.stream(**kwargs) as s:
                cut = s.get_final_message()
        else:
            cut = claude.messages.create(**kwargs)
        assert "".join(b.text for b in blocks(cut, "text")) == text[:text.index(stop)]
        assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop)


def test_a_tool_round_trip(server, claude):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    forced = dict(model=MODEL, max_tokens=60, tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"},
                  extra_body=GREEDY)
    message = claude.messages.create(messages=ask, **forced)
    assert message.stop_reason == "tool_use"
    (use,) = blocks(message, "tool_use")
    assert use.id.startswith("toolu_") and use.name == "get_weather" and isinstance(use.input["city"], str)
    with claude.messages.stream(messages=ask, **forced) as stream:
        deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
        streamed = stream.get_final_message()
    assert "input_json_delta" in deltas and streamed.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in blocks(streamed, "tool_use")] == [(use.name, use.input)]
    # the result goes back in a user turn; the answer is text, and the prompt is the chat endpoint's
    turns = ask + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in message.content]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                 "content": [{"type": "text", "text": '{"temperature": 21}'}]}]}]
    answer = claude.messages.create(model=MODEL, max_tokens=8, messages=turns, tools=[WEATHER],
                                    thinking={"type": "disabled"}, extra_body=GREEDY)
    assert answer.stop_reason in ("end_turn", "max_tokens") and not blocks(answer, "tool_use")
    openai_turns = ask + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": use.id, "type": "function", "function": {
            "name": use.name, "arguments": json.dumps(use.input)}}]},
        {"role": "tool", "tool_call_id": use.id, "content": '{"temperature": 21}'}]
    tools = [{"type": "function", "function": {"name": WEATHER["name"], "description": WEATHER["description"],
                                               "parameters": WEATHER["input_schema"]}}]
    want = chat(server, openai_turns, 8, thinking=False, tools=tools)
    assert "".join(b.text for b in blocks(answer, "text")) == want.choices[0].message.content
    counted = claude.messages.count_tokens(model=MODEL, messages=turns, tools=[WEATHER], thinking={"type": "disabled"})
    assert counted.input_tokens == want.usage.prompt_tokens


def test_an_output_format_is_followed(claude):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    reply = claude.messages.create(model=MODEL, max_tokens=20, messages=USER, extra_body=GREEDY,
                                   output_config={"format": {"type": "json_schema", "schema": schema}})
    assert reply.stop_reason == "end_turn" and not blocks(reply, "thinking")
    assert json.loads(reply.content[0].text)["answer"] in ("yes", "no")


def test_a_thinking_block_sent_back_and_a_prefill(server, folder, claude):
    from qwen_mlx.tokenizer import Tokenizer

    first = claude.messages.create(model=MODEL, max_tokens=6, messages=USER, extra_body=GREEDY)
    (thought,) = blocks(first, "thinking")
    turns = USER + [{"role": "assistant", "content": [thought.model_dump(), {"type": "text", "text": "A cat"}]},
                    {"role": "user", "content": "Go on."}]
    again = claude.messages.create(model=MODEL, max_tokens=4, messages=turns, extra_body=GREEDY)
    assert again.usage.output_tokens >= 1
    # a conversation that ends on an assistant turn is continued from its text
    prefill = USER + [{"role": "assistant", "content": "Once upon a time"}]
    tokenizer = Tokenizer.from_folder(folder)
    rendered = tokenizer.apply_chat_template(prefill, add_generation_prompt=False)
    ids = tokenizer.encode(rendered[:rendered.rindex("Once upon a time") + len("Once upon a time")])
    reply = claude.messages.create(model=MODEL, max_tokens=8, messages=prefill, extra_body=GREEDY)
    assert claude.messages.count_tokens(model=MODEL, messages=prefill).input_tokens == len(ids)
    assert reply.usage.input_tokens + reply.usage.cache_read_input_tokens == len(ids)
    raw = server.client(KEY).completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert "".join(b.text for b in blocks(reply, "text")) == raw.choices[0].text


def test_a_reply_cut_by_the_context_says_so(claude):
    long = [{"role": "user", "content": "cat " * 318}]
    room = 1024 - claude.messages.count_tokens(model=MODEL, messages=long).input_tokens
    assert 0 < room < 40
    reply = claude.messages.create(model=MODEL, max_tokens=100, messages=long, extra_body=GREEDY)
    assert (reply.stop_reason, reply.usage.output_tokens) == ("model_context_window_exceeded", room)


def test_count_tokens_is_the_prompt_the_reply_reports(claude):
    fresh = [{"role": "user", "content": [{"type": "text", "text": "Count"}, {"type": "text", "text": "me."}]}]
    kwargs = dict(model=MODEL, messages=fresh, system=[{"type": "text", "text": "Be brief."}],
                  tools=[WEATHER], thinking={"type": "disabled"})
    counted = claude.messages.count_tokens(**kwargs).input_tokens
    reply = claude.messages.create(max_tokens=2, extra_body=GREEDY, **kwargs)
    assert reply.usage.input_tokens + reply.usage.cache_read_input_tokens == counted
    assert reply.usage.input_tokens > reply.usage.cache_read_input_tokens  # a new system prompt: little was cached


def test_the_key_is_taken_as_x_api_key_and_errors_come_in_anthropics_shape(server, claude):
    with pytest.raises(anthropic.AuthenticationError) as e:
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=4, messages=USER)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "authentication_error"
    # the OpenAI routes take x-api-key too, and keep their own error shape
    ok = httpx.get(server.url + "/v1/models", headers={"x-api-key": KEY})
    assert ok.status_code == 200
    wrong = httpx.get(server.url + "/v1/models", headers={"x-api-key": "wrong"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"

    def refused(error, match, **kwargs):
        with pytest.raises(error, match=match) as e:
            claude.messages.create(**{"model": MODEL, "max_tokens": 4, "messages": USER, **kwargs})
        assert e.value.body["type"] == "error" and set(e.value.body["error"]) == {"type", "message"}
        return e.value.body["error"]["type"]

    assert refused(anthropic.BadRequestError, "unsupported field 'logit_bias'",
                   extra_body={"logit_bias": {}}) == "invalid_request_error"
    assert refused(anthropic.BadRequestError, "messages.0.role",
                   messages=[{"role": "tool", "content": "hi"}]) == "invalid_request_error"
    refused(anthropic.BadRequestError, "type 'image' is not supported", messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}]}])
    refused(anthropic.BadRequestError, "server tool 'web_search_20250305'",
            tools=[{"type": "web_search_20250305", "name": "web_search"}])
    refused(anthropic.BadRequestError, "temperature", extra_body={"temperature": 1.5})
    refused(anthropic.BadRequestError, "prompt is too long", messages=[{"role": "user", "content": "cat " * 400}])
    refused(anthropic.BadRequestError, "max_tokens: 5000 > 4096", max_tokens=5000)
    refused(anthropic.BadRequestError, "thinking cannot be on", tools=[WEATHER], tool_choice={"type": "any"},
            thinking={"type": "enabled", "budget_tokens": 1024})
    assert refused(anthropic.NotFoundError, "not served here", model="claude-sonnet-4-5") == "not_found_error"
    headers = {"x-api-key": KEY}
    missing = httpx.post(server.url + "/v1/messages", headers=headers, json={"model": MODEL, "messages": USER})
    assert missing.status_code == 400 and missing.json() == {
        "type": "error", "error": {"type": "invalid_request_error", "message": "missing field 'max_tokens'"}}
    bad_json = httpx.post(server.url + "/v1/messages", headers={**headers, "content-type": "application/json"},
                          content=b'{"model": ')
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    nowhere = httpx.post(server.url + "/v1/messages/nowhere", headers=headers, json={})
    assert nowhere.status_code == 404 and nowhere.json()["error"]["type"] == "not_found_error"


def test_a_failure_mid_stream_is_an_error_event():
    """After message_start the status line is sent: an engine failure is Anthropic's `error` event (in process:
    a real server fails only by accident)."""
    import asyncio
    from types import SimpleNamespace

    from qwen_mlx.engine import Failed, Token
    from qwen_mlx.serve.anthropic import MessagesRequest
    from qwen_mlx.serve.routes.messages import _Prompt, _Reply

    class Serving:  # what a streamed reply reads of the serving core
        config = SimpleNamespace(model_id=MODEL)

        async def events(self, handle, queue):
            yield Token(5, "Hi")
            yield Failed("the server is shutting down", 503)

    body = MessagesRequest(model=MODEL, max_tokens=4, messages=USER, stream=True)
    reply = _Reply(Serving(), body, _Prompt("", [1, 2], None, None, None), (), False)

    async def run():
        return [chunk async for chunk in reply.events(Serving(), None, None)]

    events = [(c.split("\n")[0], json.loads(c.split("\ndata: ")[1])) for c in asyncio.run(run())]
    assert [name for name, _ in events] == ["event: message_start", "event: content_block_start",
                                            "event: content_block_delta", "event: error"]
    assert events[-1][1] == {"type": "error", "error": {"type": "overloaded_error",
                                                        "message": "the server is shutting down"}}
