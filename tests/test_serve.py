"""`cli.py serve` as users meet it: a real server process on 127.0.0.1, driven by the official `openai`
client (and raw HTTP where the client would hide the detail). Bounded loops, loopback only."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.chromium import chromium
from tests.support.server import Server

import fastapi  # noqa: F401,E402  (the [serve] extra; [dev] installs it: a missing one is a failure)
import httpx  # noqa: E402
import openai  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key-1234"


@pytest.fixture(scope="module")
def folder(tiny_model):
    return tiny_model("long-context")


@pytest.fixture(scope="module")
def server(folder):
    s = Server(folder)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def library(folder):
    """The same model in this process: what the server must reproduce."""
    from qwen_mlx.backends import load

    return load("mlx", str(folder), "float32")


def chat_ids(library, messages):
    return library.tokenizer.encode_chat(messages)


def reference(library, prompt, max_tokens, **sampling):
    """What `generate` in this process answers (the same engine, a batch of one, no HTTP)."""
    from qwen_mlx.engine import Engine, generate
    from qwen_mlx.sampling import SamplingParams

    params = SamplingParams.from_generation_config(library.generation_config, **sampling)
    return generate(Engine.for_backend(library.backend, library.tokenizer), prompt, params, max_tokens)


MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Tell me a story about a cat."}]


def test_models_and_health(server, folder):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [folder.name]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 16


def test_chat_matches_the_library_streaming_or_not(server, library):
    c = server.client()
    r = c.chat.completions.create(model=_model(server), messages=MESSAGES,
                                  temperature=0, max_tokens=20)
    text, stats = reference(library, chat_ids(library, MESSAGES), 20, temperature=0)
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == ("length" if stats.generation_tokens == 20 else "stop")
    assert r.usage.prompt_tokens == len(chat_ids(library, MESSAGES))
    assert r.usage.completion_tokens == stats.generation_tokens
    chunks = list(c.chat.completions.create(model=_model(server), messages=MESSAGES, temperature=0, max_tokens=20,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == stats.generation_tokens
    # the second run found the prompt in the prefix cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1


def _model(server):
    return server.client().models.list().data[0].id


def test_completions_text_and_token_ids(server, library):
    c = server.client()
    prompt = "def fibonacci(n):"
    ids = library.tokenizer.encode(prompt)
    text, _ = reference(library, ids, 16, temperature=0)
    r = c.completions.create(model=_model(server), prompt=prompt, max_tokens=16, temperature=0)
    assert r.choices[0].text == text and r.object == "text_completion"
    r2 = c.completions.create(model=_model(server), prompt=ids, max_tokens=16, temperature=0)
    assert r2.choices[0].text == text
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=_model(server), prompt=prompt, max_tokens=16, temperature=0, stream=True))
    assert streamed == text
    # the seed's endpoint answers in the completions shape
    seed = httpx.post(server.url + "/api/v1/generate", json={"prompt": prompt, "max_tokens": 16, "temperature": 0})
    assert seed.status_code == 200 and seed.json()["choices"][0]["text"] == text


def test_stop_and_max_tokens(server, library):
    c = server.client()
    full = c.completions.create(model=_model(server), prompt="Hello", max_tokens=30, temperature=0).choices[0]
    assert len(full.text) > 12
    stop = full.text[6:10]
    cut = c.completions.create(model=_model(server), prompt="Hello", max_tokens=30, temperature=0,
                               stop=[stop, "never there"]).choices[0]
    assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"
    short = c.completions.create(model=_model(server), prompt="Hello", max_tokens=3, temperature=0)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_a_request_speculates_with_the_same_greedy_text(server, library):
    """A request's own `speculative` field (this server's extension): prompt lookup gives the plain greedy
    text; a drafter the server has not loaded, or a draft length out of range, is a 400 naming the field."""
    c = server.client()
    text, _ = reference(library, chat_ids(library, MESSAGES), 20, temperature=0)
    for options in ({"method": "prompt-lookup", "num_draft_tokens": 4}, {"method": "none"}):
        r = c.chat.completions.create(model=_model(server), messages=MESSAGES, temperature=0, max_tokens=20,
                                      extra_body={"speculative": options})
        assert r.choices[0].message.content == text
    r = c.completions.create(model=_model(server), prompt="one two one two one two", max_tokens=12, temperature=0)
    again = c.completions.create(model=_model(server), prompt="one two one two one two", max_tokens=12,
                                 temperature=0, extra_body={"speculative": {"method": "prompt-lookup"}})
    assert again.choices[0].text == r.choices[0].text
    with pytest.raises(openai.BadRequestError, match="start with --draft-model"):
        c.chat.completions.create(model=_model(server), messages=MESSAGES, max_tokens=4,
                                  extra_body={"speculative": {"method": "draft-model"}})
    with pytest.raises(openai.BadRequestError, match="speculative.num_draft_tokens"):
        c.chat.completions.create(model=_model(server), messages=MESSAGES, max_tokens=4,
                                  extra_body={"speculative": {"method": "prompt-lookup", "num_draft_tokens": 99}})


def test_seed_replays_a_sampled_reply(server):
    c = server.client()
    kw = dict(model=_model(server), messages=MESSAGES, temperature=1.0, top_p=0.95, max_tokens=24)
    a = c.chat.completions.create(seed=11, **kw).choices[0].message.content
    b = c.chat.completions.create(seed=11, **kw).choices[0].message.content
    others = {c.chat.completions.create(seed=s, **kw).choices[0].message.content for s in (1, 2, 3)}
    assert a == b and len(others | {a}) > 1


def test_logprobs(server, library):
    import numpy as np

    from qwen_mlx.backends.base import Session

    c = server.client()
    r = c.chat.completions.create(model=_model(server), messages=MESSAGES, temperature=0, max_tokens=5,
                                  logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    logits = Session(library.backend).prefill(chat_ids(library, MESSAGES)).astype(np.float64)
    expected = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    first = content[0]
    assert first.logprob == pytest.approx(expected.max(), abs=1e-4)  # greedy picks the most likely token
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(sorted(expected)[::-1][:3], abs=1e-4)
    assert first.top_logprobs[0].token == first.token and bytes(first.bytes).decode("utf-8", "replace") == first.token
    comp = c.completions.create(model=_model(server), prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) <= 2 for t in lp.top_logprobs) and all(v <= 0 for v in lp.token_logprobs)


def test_bad_requests_get_openai_errors(server):
    c = server.client()
    m = _model(server)
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        c.chat.completions.create(model=m, messages=MESSAGES, n=2)
    with pytest.raises(openai.BadRequestError, match="unsupported field 'logit_bias'"):
        c.chat.completions.create(model=m, messages=MESSAGES, logit_bias={"5": 1})
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.chat.completions.create(model=m, messages=MESSAGES, temperature=-1)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=m, prompt="hello " * 1100, max_tokens=5)
    assert e.value.code == "context_length_exceeded" and "context length is 1024" in e.value.message
    with pytest.raises(openai.BadRequestError, match="you asked for"):
        c.completions.create(model=m, prompt="hello", max_tokens=1023)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    raw = httpx.post(server.url + "/v1/chat/completions", content=b'{"messages": [', headers={"content-type":
                                                                                              "application/json"})
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    huge = httpx.post(server.url + "/v1/completions", content=b"x" * (5 * 1024 * 1024))
    assert huge.status_code == 413 and "error" in huge.json()
    missing = httpx.post(server.url + "/v1/chat/completions", json={"temperature": 0})
    assert missing.status_code == 400 and "messages" in missing.json()["error"]["message"]
    # Issue 27: JSON may spell a lone surrogate, which no tokenizer encodes: a 400 naming the field, not a 500
    headers = {"content-type": "application/json"}
    for path, body in (("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\udcff"}]}'),
                       ("/v1/completions", b'{"prompt": "a\\udcff"}')):
        bad = httpx.post(server.url + path, content=body, headers=headers)
        error = bad.json()["error"]
        assert bad.status_code == 400 and "not valid UTF-8" in error["message"], bad.text
        assert error["param"] in ("messages", "prompt")


def test_8_concurrent_clients_get_their_own_replies(server, library):
    prompts = [[{"role": "user", "content": "word " * (5 * i + 1) + f"question {i}"}] for i in range(8)]
    alone = [reference(library, chat_ids(library, p), 16 + i, temperature=0)[0] for i, p in enumerate(prompts)]

    def ask(i):
        return server.client().chat.completions.create(model=_model(server), messages=prompts[i], temperature=0,
                                                       max_tokens=16 + i).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, range(8))) == alone


def test_a_client_leaving_mid_stream_frees_its_slot(server):
    body = {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as h:
        other = ThreadPoolExecutor(1).submit(lambda: server.client().completions.create(
            model=_model(server), prompt="Hello", max_tokens=40, temperature=0))
        with h.stream("POST", server.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(4)]
            assert any(line.startswith("data: ") for line in got)
        # the connection is closed: the engine drops the sequence at its next step
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and httpx.get(server.url + "/health").json()["running"] > 0:
            time.sleep(0.02)
        assert other.result(timeout=60).usage.completion_tokens > 0
        assert httpx.get(server.url + "/health").json()["running"] == 0


def test_a_client_leaving_before_a_non_streamed_answer_cancels_it(server):
    """Nothing is written to a non-streaming client until the end: its disconnect must still be seen."""
    # A schema the reply cannot finish within max_tokens: no early EOS (a plain prompt met it at 63 tokens,
    # 0.1 s on this tiny model, and the reply could end before the disconnect was seen); 900 tokens, ~0.9 s.
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 1000}
    forced = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    body = json.dumps({"model": _model(server), "messages": [{"role": "user", "content": "numbers"}],
                       "max_tokens": 900, "temperature": 0, "response_format": forced}).encode()
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    before = httpx.get(server.url + "/health").json()["cancelled"]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and httpx.get(server.url + "/health").json()["running"] == 0:
            time.sleep(0.01)
        assert httpx.get(server.url + "/health").json()["running"] == 1
    # the socket is closed: the request stops at the next step, long before its 900 tokens
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and httpx.get(server.url + "/health").json()["running"] > 0:
        time.sleep(0.01)
    health = httpx.get(server.url + "/health").json()
    assert health["running"] == 0 and health["cancelled"] == before + 1


def test_tools_round_trip(server, library):
    c = server.client()
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                       "required": ["city"], "additionalProperties": False}}}]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = c.chat.completions.create(model=_model(server), messages=messages, tools=tools, temperature=0,
                                  tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    # streamed: the same call arrives as a tool_calls delta
    chunks = list(c.chat.completions.create(model=_model(server), messages=messages, tools=tools, temperature=0,
                                            tool_choice="required", max_tokens=60, stream=True))
    deltas = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
    assert deltas and deltas[0].function.name == "get_weather"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"
    # the result goes back in, rendered by Qwen's template as a tool response
    messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    r2 = c.chat.completions.create(model=_model(server), messages=messages, tools=tools, temperature=0, max_tokens=8)
    rendered = library.tokenizer.apply_chat_template(
        [messages[0], {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": json.loads(call.function.arguments)}}]},
         {"role": "tool", "content": '{"temperature": 21}'}],
        tools=[t for t in tools])
    assert r2.usage.prompt_tokens == len(library.tokenizer.encode(rendered))
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in rendered
    assert '"arguments": {"city": ' in rendered


def test_json_schema_output_is_valid(server):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
        "sunny": {"type": "boolean"}}, "required": ["city", "days", "sunny"], "additionalProperties": False}
    c = server.client()
    for seed in (1, 2):
        r = c.chat.completions.create(model=_model(server), messages=MESSAGES, max_tokens=80, seed=seed,
                                      temperature=1.0, response_format={"type": "json_schema", "json_schema": {
                                          "name": "trip", "schema": schema}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = c.chat.completions.create(model=_model(server), messages=MESSAGES, max_tokens=120, temperature=0,
                                  response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":  # a random model may still be inside a long string at max_tokens
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=_model(server), messages=MESSAGES, response_format={"type": "json_schema"})


def test_api_key_overload_and_ctrl_c(folder):
    s = Server(folder, "--api-key", KEY, "--max-batch", "1", "--max-queue", "0", "--grace", "0")
    try:
        assert httpx.get(s.url + "/health").status_code == 200  # /health stays open
        with pytest.raises(openai.AuthenticationError):
            s.client().models.list()
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong-key-1234").models.list()
        c = s.client(KEY)
        m = c.models.list().data[0].id
        # one request holds the only slot; the next one is told to come back later
        stream = c.completions.create(model=m, prompt="Once", max_tokens=250, temperature=0, stream=True)
        first = next(iter(stream))
        assert first.choices[0].text is not None
        busy = httpx.post(s.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                          headers={"Authorization": f"Bearer {KEY}"})
        if busy.status_code == 429:
            assert int(busy.headers["Retry-After"]) >= 1 and busy.json()["error"]["code"] == "overloaded"
        else:  # the 250 tokens were already done: then the slot was free
            assert busy.status_code == 200
        # Ctrl-C while the stream runs: it ends with a final event or a clear error, and the server exits 0
        s.proc.send_signal(signal.SIGINT)
        try:
            rest = list(stream)
            assert rest and rest[-1].choices[0].finish_reason in ("length", "stop")
        except openai.APIError as e:
            assert "shut" in str(e)
        assert s.proc.wait(timeout=60) == 0
        assert "server stopped" in "".join(s.lines)
    finally:
        s.stop()


def test_the_onnx_backend_serves_8_concurrent_clients_in_one_batch(tiny_model, tiny_onnx):
    """`--backend onnx` batches (export/backends/onnx_batch.py): every reply is the MLX library's, alone."""
    from qwen_mlx.backends import load

    mlx = load("mlx", str(tiny_model("gqa2-untied")), "float32")
    prompts = [[{"role": "user", "content": "word " * (5 * i + 1) + f"question {i}"}] for i in range(8)]
    alone = [reference(mlx, chat_ids(mlx, p), 12 + i, temperature=0)[0] for i, p in enumerate(prompts)]
    s = Server(tiny_onnx("gqa2-untied"), "--backend", "onnx", "--max-batch", "8")
    try:
        assert "(onnxruntime CPUExecutionProvider, float32, batch 8)" in "".join(s.lines)
        assert httpx.get(s.url + "/health").json()["max_batch"] == 8  # the serial fallback holds 1
        model = _model(s)

        def ask(i):
            return s.client().chat.completions.create(model=model, messages=prompts[i], temperature=0,
                                                      max_tokens=12 + i).choices[0].message.content

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(ask, range(8))) == alone
    finally:
        assert s.stop() == 0


def test_binding_elsewhere_without_a_key_warns(folder):
    from click.testing import CliRunner

    import cli

    # not started: a bad port fails before loading, after the warning logic is reachable through serve()
    r = CliRunner().invoke(cli.cli, ["serve", "--model", str(folder), "--max-batch", "0"])
    assert r.exit_code != 0 and "--max-batch" in str(r.exception or r.output)
    from qwen_mlx.serve import serve

    class Loaded:  # serve() refuses the address before it touches the model
        folder = Path("x")

    with pytest.raises(Exception, match="cannot listen on 203.0.113.1"):
        import io

        out = io.StringIO()
        try:
            serve(Loaded(), host="203.0.113.1", port=1, out=out)
        finally:
            assert "without --api-key" in out.getvalue()



def test_serve_without_its_extra_says_what_to_install():
    code = ("import sys; sys.modules['fastapi'] = None; sys.path.insert(0, sys.argv[1]); import cli; "
            "sys.exit(cli.main(['serve', '--model', 'unused']))")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "pip install 'qwen-mlx[serve]'" in r.stderr and "Traceback" not in r.stderr


def test_chat_page_streams_a_reply_in_a_real_browser(server, library, tmp_path):
    """Debian's chromium, driven by Playwright: type, see the streamed reply, go on with the chat."""
    with chromium(tmp_path / "profile", viewport={"width": 900, "height": 640}) as browser:
        page = browser.new_page()
        outside: list[str] = []
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(server.url) else None)
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('model').textContent !== 'connecting…'", timeout=30000)
        assert page.text_content("#model") == server.client().models.list().data[0].id
        page.fill("#temperature", "0")
        page.fill("#input", "Tell me a story about a cat.")
        page.keyboard.press("Enter")
        page.wait_for_selector(".assistant.done", timeout=120000)
        reply = page.text_content(".assistant.done .text")
        prompt = chat_ids(library, [{"role": "user", "content": "Tell me a story about a cat."}])
        expected, _ = reference(library, prompt, 1024 - len(prompt), temperature=0)
        assert reply == expected and reply
        # the second turn carries the first: its prompt starts with the cached conversation
        page.fill("#input", "And then?")
        page.click("#send")
        page.wait_for_function("document.querySelectorAll('.assistant.done').length === 2", timeout=120000)
        assert "prompt tokens cached" in page.text_content(".assistant.done >> nth=1")
        shot = page.screenshot()
        assert shot[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("QWEN_MLX_UPDATE_DOCS"):  # refresh the screenshot the docs show
            (ROOT / "docs" / "serve_chat_page.png").write_bytes(shot)
        assert outside == [], "the page must load nothing from outside this server"


@pytest.mark.real
def test_real_checkpoint_batched_answers_tools_and_json(real_model_dir):
    """Qwen2.5-Coder-0.5B-Instruct: replies in a batch equal replies alone; a real tool call and schema; the same
    replies through Anthropic's Messages and OpenAI's Responses APIs, and a tool round trip on the Messages API."""
    jsonschema = pytest.importorskip("jsonschema")
    s = Server(real_model_dir, "--max-batch", "4")
    try:
        c = s.client()
        m = c.models.list().data[0].id
        questions = ["What is 2 + 2?", "Name a prime number larger than ten, and explain in one sentence why."]

        def ask(q):
            return c.chat.completions.create(model=m, messages=[{"role": "user", "content": q}], temperature=0,
                                             max_tokens=12).choices[0].message.content

        alone = [ask(q) for q in questions]
        with ThreadPoolExecutor(2) as pool:
            assert list(pool.map(ask, questions)) == alone
        assert "4" in alone[0]
        tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                  "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                 "required": ["city"]}}}]
        r = c.chat.completions.create(model=m, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                      tools=tools, tool_choice="required", temperature=0, max_tokens=40)
        call = r.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather" and "Paris" in json.loads(call.function.arguments)["city"]
        schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
                  "additionalProperties": False}
        r = c.chat.completions.create(model=m, messages=[{"role": "user", "content": "2 + 2 = ? Reply in JSON."}],
                                      temperature=0, max_tokens=20, response_format={
                                          "type": "json_schema", "json_schema": {"name": "sum", "schema": schema}})
        answer = json.loads(r.choices[0].message.content)
        jsonschema.validate(answer, schema)
        assert answer["answer"] == 4
        # the agents' doors on the same model: Anthropic's Messages and OpenAI's Responses give chat's text,
        # and a real tool round trip through the Messages API
        anthropic = pytest.importorskip("anthropic")
        claude = anthropic.Anthropic(base_url=s.url, api_key="none", max_retries=0)
        greedy = {"temperature": 0}  # the anthropic 2.x client takes sampling fields in the body only
        said = claude.messages.create(model=m, max_tokens=12, extra_body=greedy,
                                      messages=[{"role": "user", "content": questions[0]}])
        assert said.content[0].text == alone[0]
        assert c.responses.create(model=m, input=questions[1], max_output_tokens=12,
                                  temperature=0).output_text == alone[1]
        tool = {"name": "get_weather", "description": "Current weather in a city",
                "input_schema": tools[0]["function"]["parameters"]}
        asked = [{"role": "user", "content": "Weather in Paris?"}]
        use = claude.messages.create(model=m, max_tokens=40, extra_body=greedy, tools=[tool], messages=asked,
                                     tool_choice={"type": "tool", "name": "get_weather"})
        block = next(b for b in use.content if b.type == "tool_use")
        assert use.stop_reason == "tool_use" and "Paris" in block.input["city"]
        answer = claude.messages.create(model=m, max_tokens=30, extra_body=greedy, tools=[tool], messages=asked + [
            {"role": "assistant", "content": use.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "21 C, sunny"}]}])
        call = c.chat.completions.create(model=m, messages=asked, tools=tools, tool_choice="required", temperature=0,
                                         max_tokens=40).choices[0].message.tool_calls[0]
        chat = c.chat.completions.create(model=m, tools=tools, temperature=0, max_tokens=30, messages=asked + [
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "21 C, sunny"}]).choices[0].message
        assert answer.content[0].text == chat.content  # the same turns rendered alike on both APIs
    finally:
        assert s.stop() == 0
