"""The serving core under every endpoint: one `Serving` over the engine, and the API's errors.

A route validates its own body and renders its own prompt; what every route does alike lives here:
sampling parameters and the token budget from the body, submitting a `Request`, reading the engine's
events back on the event loop (cancelling the request when the client leaves), collecting a whole
answer, and SSE framing. Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
except under `/v1/messages`, which answers in Anthropic's (anthropic.py); the exception handlers, module
functions that `create_app` registers, pick the shape by the request's path.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..engine import Done, Engine, Failed, Overloaded, Request, ShuttingDown, Token
from ..engine.speculative import Speculation
from ..engine.text import check_stop_strings
from ..errors import QwenError
from ..sampling import SamplingParams
from .anthropic import describe_invalid, error_body, is_anthropic_path
from .logprobs import TokenText
from .protocol import Sampling


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self, anthropic: bool = False) -> JSONResponse:
        """The error in OpenAI's shape, or with `anthropic` in Anthropic's (its type read from the status)."""
        body = error_body(self.status, self.message) if anthropic else \
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass
class ServerConfig:
    model_id: str
    generation_config: dict
    api_key: str | None = None
    max_tokens: int = 4096           # the largest max_tokens a request may ask for
    max_body: int = 4 * 1024 * 1024  # bytes
    make_constraint: Callable[[Any, Any], Any] | None = None  # (ChatRequest, tokenizer) -> Constraint
    speculation: Speculation | None = None  # requests' default speculative decoding (serve --prompt-lookup, ...)


class Serving:
    """The engine and the server's settings, with what every endpoint does the same way. One per app,
    kept on `app.state.serving`; routes get it through the `get_serving` dependency."""

    def __init__(self, engine: Engine, config: ServerConfig):
        self.engine, self.config = engine, config
        self.tokenizer = engine.tokenizer
        self.context = engine.context
        self.words = TokenText(engine.tokenizer)
        # Set by create_app to metrics.py's `Metrics.watch`: given each submitted request, it returns what sees
        # that request's events, on the engine thread as they happen.
        self.observe: Callable[[Request], Callable[[Any], None]] | None = None

    # --- request -> engine ---------------------------------------------------------------------------

    def sampling(self, body: Sampling) -> SamplingParams:
        config = self.config
        if body.n != 1:
            raise ApiError(400, "n > 1 is not supported: send one request per completion", param="n")
        if body.model is not None and body.model != config.model_id:
            raise ApiError(404, f"the model {body.model!r} is not served here (this server serves "
                                f"{config.model_id!r})", "not_found_error", param="model", code="model_not_found")
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options needs stream: true", param="stream_options")
        try:
            check_stop_strings(body.stop_strings())
        except QwenError as e:
            raise ApiError(400, str(e).replace("--", ""), param="stop") from None
        overrides = {k: getattr(body, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                                   "seed")}
        try:
            return SamplingParams.from_generation_config(config.generation_config, **overrides)
        except QwenError as e:
            raise ApiError(400, str(e).replace("--", "").replace("-", "_")) from None

    def speculation(self, body: Sampling) -> Speculation | None:
        """A request's speculative decoding: its own `speculative` field, else the server's default."""
        asked = body.speculative
        if asked is None:
            return self.config.speculation
        if asked.method == "none":
            return None
        try:
            return Speculation(asked.method, asked.num_draft_tokens)
        except QwenError as e:
            raise ApiError(400, str(e).replace("--num-draft-tokens", "num_draft_tokens"),
                           param="speculative") from None

    def budget(self, prompt: list[int], asked: int | None) -> int:
        context, most = self.context, self.config.max_tokens
        if len(prompt) >= context:
            raise ApiError(400, f"this model's maximum context length is {context} tokens; the prompt has "
                                f"{len(prompt)}", param="messages", code="context_length_exceeded")
        if asked is None:
            return min(most, context - len(prompt))
        if asked > most:
            raise ApiError(400, f"max_tokens is {asked}; this server allows at most {most}", param="max_tokens")
        if len(prompt) + asked > context:
            raise ApiError(400, f"this model's maximum context length is {context} tokens; you asked for "
                                f"{len(prompt) + asked} ({len(prompt)} in the prompt, {asked} for the reply)",
                           param="max_tokens", code="context_length_exceeded")
        return asked

    def submit(self, req: Request) -> tuple[Any, asyncio.Queue]:
        """Hand `req` to the engine; its events arrive on the returned queue (the engine calls back from its
        own thread, so each event is posted onto this event loop)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        seen = self.observe(req) if self.observe is not None else None

        def post(event: Any) -> None:  # called on the engine thread
            if seen is not None:
                seen(event)
            loop.call_soon_threadsafe(queue.put_nowait, event)

        try:
            handle = self.engine.submit(req, post)
        except Overloaded as e:
            raise ApiError(429, str(e), "rate_limit_error", code="overloaded",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except ShuttingDown as e:
            raise ApiError(503, str(e), "server_error", code="shutting_down") from None
        except QwenError as e:
            raise ApiError(400, str(e)) from None
        return handle, queue

    # --- engine -> answer ----------------------------------------------------------------------------

    async def events(self, handle: Any, queue: asyncio.Queue, http: HTTPRequest | None = None) -> AsyncIterator[Any]:
        """The engine's events for one request; leaving early (the client went away) cancels it. With
        `http` (a non-streaming answer, where nothing is written until the end), the client's disconnect
        is watched too: the request stops at the next step instead of running to max_tokens."""
        watcher = asyncio.ensure_future(_watch_disconnect(http, queue)) if http is not None else None
        try:
            while True:
                event = await queue.get()
                if event is _GONE:  # nobody to answer: the status is for the log only (nginx's 499)
                    raise ApiError(499, "the client closed the connection before the answer was ready")
                yield event
                if isinstance(event, (Done, Failed)):
                    return
        finally:
            self.engine.cancel(handle)
            if watcher is not None:
                watcher.cancel()

    async def collect(self, handle: Any, queue: asyncio.Queue, http: HTTPRequest) -> tuple[str, list[Token], Done]:
        """A non-streaming answer whole: its text (the final event's tail included), its tokens (for
        logprobs), and the `Done` event; a failure is raised as the ApiError the client gets."""
        text, tokens = "", []
        async for event in self.events(handle, queue, http):
            if isinstance(event, Token):
                text += event.text
                tokens.append(event)
            elif isinstance(event, Failed):
                raise failure(event)
        return text + event.text, tokens, event

    def stream(self, handle: Any, queue: asyncio.Queue, render: Callable[[Any], Iterable[str]],
               first: Iterable[str] = ()) -> StreamingResponse:
        """An SSE answer: the `first` chunks, then `render(event)`'s chunks for each Token and the Done,
        then `[DONE]`; a failure mid-stream becomes an error event (the status line is long sent)."""

        async def chunks() -> AsyncIterator[str]:
            for chunk in first:
                yield chunk
            async for event in self.events(handle, queue):
                if isinstance(event, Failed):
                    yield sse({"error": _error_body(event)})
                    break
                for chunk in render(event):
                    yield chunk
            yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def usage(done: Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}


def failure(event: Failed) -> ApiError:
    return ApiError(event.status, event.message, "server_error")


# JSON leaves these unescaped, but clients that split a decoded stream with str.splitlines() (httpx's
# iter_lines, many hand-written SSE readers) end a line at each; escaped, every client reads one line.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(data: Any, event: str | None = None) -> str:
    """One server-sent event: `data` as one line of JSON (UTF-8 kept), under an `event:` name if given."""
    line = json.dumps(data, ensure_ascii=False).translate(_LINE_BREAKS)
    return f"event: {event}\ndata: {line}\n\n" if event else f"data: {line}\n\n"


# --- dependencies ------------------------------------------------------------------------------------

def get_serving(request: HTTPRequest) -> Serving:
    return request.app.state.serving


ServingDep = Annotated[Serving, Depends(get_serving)]  # a route's parameter for the serving core


async def authorize(request: HTTPRequest) -> None:
    """The key as OpenAI's clients send it (`Authorization: Bearer KEY`) or Anthropic's (`x-api-key: KEY`),
    on every route; either one right is enough."""
    api_key = get_serving(request).config.api_key
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    offered = [token.strip()] if scheme.lower() == "bearer" else []
    if "x-api-key" in request.headers:
        offered.append(request.headers["x-api-key"].strip())
    # compare_digest takes the same time wherever the strings differ: no timing oracle on the key
    if not any([hmac.compare_digest(key.encode(), api_key.encode()) for key in offered]):
        raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY' or 'x-api-key: KEY')",
                       "invalid_request_error", code="invalid_api_key")


guarded = [Depends(authorize)]  # a route's `dependencies=` when it needs the API key


# --- exception handlers ------------------------------------------------------------------------------

async def on_api_error(request: HTTPRequest, e: ApiError) -> JSONResponse:
    return e.response(is_anthropic_path(request.url.path))


async def on_invalid(request: HTTPRequest, e: RequestValidationError) -> JSONResponse:
    if is_anthropic_path(request.url.path):
        return ApiError(400, describe_invalid(list(e.errors()))).response(anthropic=True)
    return _validation_error(e).response()


async def on_http_error(request: HTTPRequest, e: HTTPException) -> JSONResponse:
    anthropic = is_anthropic_path(request.url.path)
    if e.status_code == 413:  # BodyLimit's, raised while the body streams in
        return ApiError(413, f"the request body is larger than {get_serving(request).config.max_body} bytes")\
            .response(anthropic)
    return ApiError(e.status_code, str(e.detail), "invalid_request_error").response(anthropic)


_GONE = object()  # put in a request's event queue when its client disconnects


async def _watch_disconnect(http: HTTPRequest, queue: asyncio.Queue) -> None:
    """Wait for the ASGI `http.disconnect` message (the body is already read, so nothing else comes)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            queue.put_nowait(_GONE)
            return


def _error_body(event: Failed) -> dict:
    return {"message": event.message, "type": "server_error", "param": None, "code": event.status}


def _validation_error(e: RequestValidationError) -> ApiError:
    """Pydantic's first complaint, said plainly: which field, and what is wrong with it."""
    errors = e.errors()
    if not errors:
        return ApiError(400, "invalid request body")
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    where = ".".join(loc)
    if err.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({err.get('ctx', {}).get('error', err['msg'])})")
    if err.get("type") == "extra_forbidden":
        return ApiError(400, f"unsupported field {where!r}: this server does not implement it", param=where)
    if err.get("type") == "missing":
        return ApiError(400, f"missing field {where!r}", param=where)
    if not loc:
        return ApiError(400, f"invalid request body: {err['msg']}")
    return ApiError(400, f"{where}: {err['msg']}", param=where)
