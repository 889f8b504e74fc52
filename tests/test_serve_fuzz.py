"""Property-based fuzzing of the server's HTTP API from its own OpenAPI schema (schemathesis, in process).

Every operation `/openapi.json` describes is called with bodies generated from the schema, valid ones
(positive) and ones that break it (negative), against the ASGI app over the tiny model and a running engine.
Checks: no 5xx and no crash (schemathesis' `not_a_server_error`), every answer a status the schema lists
(`status_code_conformance`), every 4xx in the API's error shape (OpenAI's `{"error": {...}}`, Anthropic's
`{"type": "error", "error": {...}}` under /v1/messages), no hang (bounded examples; the server's max_tokens
is small, so each generation is a few tokens). `response_schema_conformance` is not used: a streamed reply
is SSE, which the schema's 200 (JSON) does not describe.
"""

from __future__ import annotations

import json

import pytest
import schemathesis  # the [dev] extra: a missing one is a failure
from hypothesis import HealthCheck, given, settings, strategies as st
from schemathesis import GenerationMode
from schemathesis import checks as st_checks
from schemathesis.specs.openapi import checks as openapi_checks

MAX_TOKENS = 8  # the server's cap: any generation the fuzzer asks for is a few tokens
EXAMPLES = 25  # per operation and mode


@pytest.fixture(scope="module")
def app(tiny_model):
    from qwen_mlx.backends import load
    from qwen_mlx.backends.batching import batch_backend
    from qwen_mlx.engine import Engine
    from qwen_mlx.serve.app import ServerConfig, create_app
    from qwen_mlx.serve.grammar import make_constraint

    folder = tiny_model("gqa2-untied")
    loaded = load("mlx", str(folder), "float32")
    engine = Engine(batch_backend(loaded.backend, 4), loaded.tokenizer).start()
    n_vocab = loaded.backend.args.vocab_size
    config = ServerConfig(folder.name, loaded.generation_config, None, MAX_TOKENS,
                          make_constraint=lambda body, tok: make_constraint(body, tok, n_vocab))
    yield create_app(engine, config)
    engine.shutdown(0)


@pytest.fixture(scope="module")
def api(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def error_shape(ctx, response, case) -> None:
    """A 4xx is in the API's error shape, with a message that says something."""
    if not 400 <= response.status_code < 500:
        return None
    body = json.loads(response.content)
    if case.path.startswith("/v1/messages"):
        assert body.get("type") == "error" and set(body) == {"type", "error"}, body
        assert set(body["error"]) == {"type", "message"}, body
    else:
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return None


CHECKS = [st_checks.not_a_server_error, openapi_checks.status_code_conformance, error_shape]


OPERATIONS = [("GET", "/health"), ("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/chat/completions"),
              ("POST", "/v1/completions"), ("POST", "/api/v1/generate"), ("POST", "/v1/messages"),
              ("POST", "/v1/messages/count_tokens"), ("POST", "/v1/responses")]
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]


BODIES = {"/v1/chat/completions": "ChatRequest", "/v1/completions": "CompletionRequest",
          "/api/v1/generate": "CompletionRequest", "/v1/messages": "MessagesRequest",
          "/v1/messages/count_tokens": "PromptBody", "/v1/responses": "ResponsesRequest"}


def test_the_schema_is_valid_and_describes_every_operation(app, api):
    api.validate()  # against the OpenAPI 3.1 meta-schema
    served = {(op.method.upper(), op.path) for op in (r.ok() for r in api.get_all_operations())}
    assert served == set(OPERATIONS)
    raw = api.raw_schema
    for path, model in BODIES.items():
        body = raw["paths"][path]["post"]["requestBody"]
        assert body["required"] and \
            body["content"]["application/json"]["schema"]["$ref"] == f"#/components/schemas/{model}"
        assert "422" not in raw["paths"][path]["post"]["responses"]  # the server answers a bad body with a 400
    # every number a request sends has a finite range
    for model in set(BODIES.values()) - {"PromptBody"}:
        props = raw["components"]["schemas"][model]["properties"]
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty", "seed"):
            number = next(s for s in props[name].get("anyOf", [props[name]]) if s.get("type") != "null")
            assert "minimum" in number or "exclusiveMinimum" in number, (model, name)
            assert "maximum" in number or "exclusiveMaximum" in number, (model, name)


# The GETs take nothing to break: they are called as they are (positive) only.
CASES = [(m, p, mode) for m, p in OPERATIONS for mode in MODES if m == "POST" or mode is GenerationMode.POSITIVE]


@pytest.mark.parametrize("method,path,mode", CASES, ids=[f"{m} {p} {mode.value}" for m, p, mode in CASES])
def test_fuzz(app, api, method, path, mode):
    operation = api[path][method]
    model_id = app.state.serving.config.model_id

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def fuzz(case):
        # A valid body names the served model (or none): a random name stops every request at its 404,
        # before the sampling fields are read.
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model_id
        case.call_and_validate(checks=CHECKS)

    fuzz()


# --- the sampling fields at their ranges' ends ----------------------------------------------------------
# The schema-wide fuzzing above rarely sends a valid body to a generation endpoint with several sampling
# fields at once; here every body is valid but for the sampling fields, drawn from their whole ranges (hypothesis
# favours the ends). Each reply is a 200: a value inside a field's range never ends in a 500.

def bodies(model_id: str) -> dict:
    hi = [{"role": "user", "content": "hi"}]
    return {"/v1/chat/completions": {"messages": hi, "max_tokens": 4},
            "/v1/completions": {"prompt": "hi", "max_tokens": 4},
            "/api/v1/generate": {"prompt": [1, 2, 3], "max_tokens": 4},
            "/v1/messages": {"model": model_id, "messages": hi, "max_tokens": 4},
            "/v1/responses": {"input": "hi", "max_output_tokens": 4}}


def sampling(path: str) -> st.SearchStrategy:
    from qwen_mlx.serve import protocol as p

    most = 1 if path == "/v1/messages" else 2  # Anthropic's temperature is in [0, 1]
    return st.fixed_dictionaries({}, optional={
        "temperature": st.just(0) | st.floats(p.MIN_TEMPERATURE, most),
        "top_p": st.floats(p.MIN_TOP_P, 1),
        "top_k": st.integers(0, p.MAX_TOP_K),
        "min_p": st.floats(0, 1, exclude_max=True),
        "repetition_penalty": st.floats(p.MIN_REPETITION_PENALTY, p.MAX_REPETITION_PENALTY),
        "presence_penalty": st.floats(-2, 2),
        "frequency_penalty": st.floats(-2, 2),
        "seed": st.integers(0, p.MAX_SEED)})


GENERATING = ["/v1/chat/completions", "/v1/completions", "/api/v1/generate", "/v1/messages", "/v1/responses"]


@pytest.fixture(scope="module")
def client(app):
    from starlette.testclient import TestClient

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize("path", GENERATING)
def test_sampling_values_inside_their_ranges_generate(app, client, path):
    body = bodies(app.state.serving.config.model_id)[path]

    @given(fields=sampling(path))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def fuzz(fields):
        r = client.post(path, json={**body, **fields})
        assert r.status_code == 200, (fields, r.status_code, r.text)

    fuzz()


# (field, a value just outside its range): what the 500s were (1e-300, 5e-324, -1), and each range's ends
OUTSIDE = [("temperature", 1e-300), ("temperature", 5e-7), ("temperature", -0.5), ("temperature", 2.5),
           ("top_p", 0), ("top_p", 5e-324), ("top_p", 1.5), ("top_k", -1), ("top_k", 2**31),
           ("min_p", 1), ("min_p", -0.1), ("repetition_penalty", 0), ("repetition_penalty", 5e-324),
           ("repetition_penalty", 1e4), ("presence_penalty", 2.5), ("frequency_penalty", -2.5),
           ("seed", -1), ("seed", 2**64), ("max_tokens", 0), ("max_tokens", 2**31)]


@pytest.mark.parametrize("path", GENERATING)
@pytest.mark.parametrize("field,value", OUTSIDE, ids=[f"{f}={v}" for f, v in OUTSIDE])
def test_a_value_outside_its_range_is_a_400_naming_the_field(app, client, path, field, value):
    if path == "/v1/messages" and field == "temperature" and value == 2.5:
        value = 1.5  # Anthropic's range ends at 1
    name = "max_output_tokens" if path == "/v1/responses" and field == "max_tokens" else field
    r = client.post(path, json={**bodies(app.state.serving.config.model_id)[path], name: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"].startswith(f"{name}:"), error
    if path != "/v1/messages":
        assert error["param"] == name, error
