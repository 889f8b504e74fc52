"""The HTTP layer: OpenAI's API on FastAPI, translating requests for the engine and its events back.

Nothing here schedules or samples (qwen_mlx.engine does, on its own thread, and knows no web framework).
`create_app` only assembles: the body-size middleware, the error handlers and the routers of routes/,
over one serving core (core.py's `Serving`, on `app.state.serving`) that submits requests and reads
their events back, and the app's Prometheus registry (metrics.py's `Metrics`, on `app.state.metrics`). Errors use
OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException

from ..engine import Engine
from .anthropic import is_anthropic_path
from .core import ApiError, ServerConfig, Serving, on_api_error, on_http_error, on_invalid
from .metrics import CountRequests, Metrics
from .routes import ROUTERS

__all__ = ["ApiError", "BodyLimit", "ServerConfig", "create_app"]


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused (413) before it is read whole."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send, is_anthropic_path(scope.get("path", "")))
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413)  # the handler (core.on_http_error) says it in the API's shape
            return message

        await self.app(scope, limited, send)

    async def _refuse(self, send: Callable, anthropic: bool) -> None:
        await ApiError(413, f"the request body is larger than {self.limit} bytes")\
            .response(anthropic)({"type": "http"}, None, send)


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="qwen-mlx", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.serving = Serving(engine, config)
    app.state.metrics = Metrics(engine)  # this app's own registry: several apps in one process do not clash
    app.state.serving.observe = app.state.metrics.watch
    app.add_middleware(BodyLimit, limit=config.max_body)
    # The outermost middleware: it counts BodyLimit's 413s too.
    app.add_middleware(CountRequests, metrics=app.state.metrics,
                       paths=[route.path for router in ROUTERS for route in router.routes])
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(HTTPException, on_http_error)
    for router in ROUTERS:
        app.include_router(router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


# --- the OpenAPI schema (/openapi.json) ---------------------------------------------------------------

_OPENAI_ERROR = {"type": "object", "required": ["error"], "additionalProperties": False, "properties": {
    "error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "integer", "null"]}}}}}
_ANTHROPIC_ERROR = {"type": "object", "required": ["type", "error"], "additionalProperties": False, "properties": {
    "type": {"const": "error"},
    "error": {"type": "object", "required": ["type", "message"], "properties": {
        "type": {"type": "string"}, "message": {"type": "string"}}}}}
# What a request can be answered besides its 200: a body or value the server refuses, a missing key, a model it
# does not serve, a body over --max-body, a full queue, a server shutting down.
_ERRORS = {"400": "invalid request", "401": "missing or wrong API key", "404": "the model is not served here",
           "413": "the request body is too large", "429": "the queue is full", "503": "the server is shutting down"}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema from the routes, told what the server answers: a body it refuses is a 400 in the API's
    error shape (not FastAPI's 422), and `/metrics` (left out of the routes' schema) is Prometheus' text."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    components["Error"], components["AnthropicError"] = _OPENAI_ERROR, _ANTHROPIC_ERROR
    for path, operations in schema["paths"].items():
        shape = "AnthropicError" if is_anthropic_path(path) else "Error"
        content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{shape}"}}}
        for operation in operations.values():
            responses = operation["responses"]
            responses.pop("422", None)
            codes = ["503"] if path == "/health" else ["401"] if "requestBody" not in operation else list(_ERRORS)
            for code in codes:
                responses[code] = {"description": _ERRORS[code], "content": content}
    schema["paths"]["/metrics"] = {"get": {
        "summary": "Metrics", "operationId": "metrics",
        "responses": {"200": {"description": "the Prometheus text exposition format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}}}}
    app.openapi_schema = schema
    return schema
