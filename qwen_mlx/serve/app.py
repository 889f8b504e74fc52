"""The HTTP layer: OpenAI's API on FastAPI, translating requests for the engine and its events back.

Nothing here schedules or samples (qwen_mlx.engine does, on its own thread): a handler validates the
body, renders the prompt, submits one `Request`, and turns the engine's events into a JSON answer or an
SSE stream. Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..engine import Done, Engine, Failed, Overloaded, Request, ShuttingDown, Token
from ..errors import QwenError
from ..engine.text import check_stop_strings
from ..sampling import SamplingParams
from ..tokenizer import check_template_kwargs
from .logprobs import TokenText
from .protocol import ChatRequest, CompletionRequest, Sampling
from .tools import ToolCallFilter, template_messages

STATIC = Path(__file__).parent / "static"


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass
class ServerConfig:
    model_id: str
    generation_config: dict
    api_key: str | None = None
    max_tokens: int = 4096           # the largest max_tokens a request may ask for
    max_body: int = 4 * 1024 * 1024  # bytes
    make_constraint: Optional[Callable[[Any, Any], Any]] = None  # (ChatRequest, tokenizer) -> Constraint


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused (413) before it is read whole."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413)
            return message

        await self.app(scope, limited, send)

    async def _refuse(self, send: Callable) -> None:
        await ApiError(413, f"the request body is larger than {self.limit} bytes")\
            .response()({"type": "http"}, None, send)


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    tokenizer = engine.tokenizer
    context = engine.context
    words = TokenText(tokenizer)
    app = FastAPI(title="qwen-mlx", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=config.max_body)

    @app.exception_handler(ApiError)
    async def _api_error(_: HTTPRequest, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        return _validation_error(e).response()

    @app.exception_handler(HTTPException)
    async def _http(_: HTTPRequest, e: HTTPException) -> JSONResponse:
        if e.status_code == 413:
            return ApiError(413, f"the request body is larger than {config.max_body} bytes").response()
        return ApiError(e.status_code, str(e.detail), "invalid_request_error").response()

    async def authorize(request: HTTPRequest) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest takes the same time wherever the strings differ: no timing oracle on the key
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           "invalid_request_error", code="invalid_api_key")

    guarded = [Depends(authorize)]

    @app.get("/health")
    async def health() -> JSONResponse:
        load = engine.load()
        if engine.closing:
            return JSONResponse({"status": "shutting down", **load}, status_code=503)
        return JSONResponse({"status": "ok", "model": config.model_id, **load})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        # The page is static (no model access); its API calls carry the key the user types in.
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict:
        return {"object": "list", "data": [{"id": config.model_id, "object": "model", "created": 0,
                                            "owned_by": "qwen-mlx", "max_model_len": context}]}

    # --- request -> engine ---------------------------------------------------------------------------

    def sampling(body: Sampling) -> SamplingParams:
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

    def budget(prompt: list[int], asked: int | None) -> int:
        if len(prompt) >= context:
            raise ApiError(400, f"this model's maximum context length is {context} tokens; the prompt has "
                                f"{len(prompt)}", param="messages", code="context_length_exceeded")
        if asked is None:
            return min(config.max_tokens, context - len(prompt))
        if asked > config.max_tokens:
            raise ApiError(400, f"max_tokens is {asked}; this server allows at most {config.max_tokens}",
                           param="max_tokens")
        if len(prompt) + asked > context:
            raise ApiError(400, f"this model's maximum context length is {context} tokens; you asked for "
                                f"{len(prompt) + asked} ({len(prompt)} in the prompt, {asked} for the reply)",
                           param="max_tokens", code="context_length_exceeded")
        return asked

    def submit(req: Request) -> tuple[Any, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        try:
            handle = engine.submit(req, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
        except Overloaded as e:
            raise ApiError(429, str(e), "rate_limit_error", code="overloaded",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except ShuttingDown as e:
            raise ApiError(503, str(e), "server_error", code="shutting_down") from None
        except QwenError as e:
            raise ApiError(400, str(e)) from None
        return handle, queue

    async def events(handle: Any, queue: asyncio.Queue, http: HTTPRequest | None = None) -> AsyncIterator[Any]:
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
            engine.cancel(handle)
            if watcher is not None:
                watcher.cancel()

    def usage(done: Done) -> dict:
        return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                "total_tokens": done.prompt_tokens + done.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}

    def failure(event: Failed) -> ApiError:
        return ApiError(event.status, event.message, "server_error")

    def sse(data: Any) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def stream(chunks: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(chunks, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # --- /v1/chat/completions ----------------------------------------------------------------------

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat(body: ChatRequest, http: HTTPRequest) -> Any:
        params = sampling(body)
        tools = None
        if body.tools and body.tool_choice != "none":
            tools = [t.model_dump(exclude_none=True) for t in body.tools]
        elif body.tool_choice not in (None, "none"):
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        constraint = None
        forced = (body.response_format is not None and body.response_format.type != "text") or \
            body.tool_choice not in (None, "none", "auto")
        if forced:
            if config.make_constraint is None:
                raise ApiError(400, "structured output is not available on this server", param="response_format")
            try:
                constraint = config.make_constraint(body, tokenizer)
            except QwenError as e:
                raise ApiError(400, str(e), param="response_format" if body.response_format else "tool_choice") \
                    from None
        try:
            check_template_kwargs(body.chat_template_kwargs or {})
        except QwenError as e:
            raise ApiError(400, str(e), param="chat_template_kwargs") from None
        try:
            prompt = tokenizer.encode_chat(template_messages(body.messages), tools=tools,
                                           **(body.chat_template_kwargs or {}))
        except QwenError as e:
            raise ApiError(400, str(e), param="messages") from None
        req = Request(prompt, params, budget(prompt, body.max_completion_tokens or body.max_tokens),
                      body.stop_strings(), body.presence_penalty, body.frequency_penalty,
                      (body.top_logprobs or 0) if body.logprobs else None, constraint)
        handle, queue = submit(req)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": config.model_id}
        filt = ToolCallFilter() if tools else None

        def chat_logprobs(event: Token) -> dict:
            entry = words.entry(event.id, event.logprob)
            entry["top_logprobs"] = [words.entry(i, lp) for i, lp in event.top or []]
            return entry

        if not body.stream:
            text, logprobs = "", []
            async for event in events(handle, queue, http):
                if isinstance(event, Token):
                    text += event.text
                    if req.logprobs is not None:
                        logprobs.append(chat_logprobs(event))
                elif isinstance(event, Failed):
                    raise failure(event)
            text += event.text
            message: dict[str, Any] = {"role": "assistant", "content": text}
            finish = event.finish_reason
            if filt is not None:
                filt.add(text)
                content, calls = filt.finish()
                if calls:
                    message = {"role": "assistant", "content": content or None, "tool_calls": calls}
                    finish = "tool_calls"
            choice = {"index": 0, "message": message, "logprobs": {"content": logprobs} if req.logprobs is not None
                      else None, "finish_reason": finish}
            return {**head, "object": "chat.completion", "choices": [choice], "usage": usage(event)}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: dict, finish: str | None = None, logprobs: list | None = None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None if logprobs is None else {"content": logprobs},
                      "finish_reason": finish}
            return sse({**head, "object": "chat.completion.chunk", "choices": [choice],
                        **({"usage": None} if include_usage else {})})

        async def chat_stream() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""})
            async for event in events(handle, queue):
                if isinstance(event, Token):
                    piece = filt.add(event.text) if filt is not None else event.text
                    lp = [chat_logprobs(event)] if req.logprobs is not None else None
                    if piece or lp:
                        yield chunk({"content": piece}, logprobs=lp)
                elif isinstance(event, Failed):
                    yield sse({"error": _error_body(event)})
                    break
                else:
                    piece = filt.add(event.text) if filt is not None else event.text
                    finish, calls = event.finish_reason, []
                    if filt is not None:
                        rest, calls = filt.finish()
                        piece += rest
                    if piece:
                        yield chunk({"content": piece})
                    if calls:
                        finish = "tool_calls"
                        yield chunk({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]})
                    yield chunk({}, finish)
                    if include_usage:
                        yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(event)})
            yield "data: [DONE]\n\n"

        return stream(chat_stream())

    # --- /v1/completions and the seed's /api/v1/generate ---------------------------------------------

    async def complete(body: CompletionRequest, http: HTTPRequest) -> Any:
        params = sampling(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request: a list of prompts is not supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            bad = [i for i in ids if not 0 <= i < engine.backend.args.vocab_size]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is outside the vocabulary", param="prompt")
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        req = Request(ids, params, budget(ids, body.max_tokens), body.stop_strings(), body.presence_penalty,
                      body.frequency_penalty, body.logprobs)
        handle, queue = submit(req)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": config.model_id}

        def completion_logprobs(evs: list[Token], offset: int) -> dict:
            out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for ev in evs:
                out["tokens"].append(words.text(ev.id))
                out["token_logprobs"].append(ev.logprob)
                out["top_logprobs"].append({words.text(i): lp for i, lp in ev.top or []})
                out["text_offset"].append(offset)
                offset += len(ev.text)
            return out

        if not body.stream:
            text, tokens = "", []
            async for event in events(handle, queue, http):
                if isinstance(event, Token):
                    text += event.text
                    tokens.append(event)
                elif isinstance(event, Failed):
                    raise failure(event)
            text += event.text
            choice = {"index": 0, "text": text, "logprobs": completion_logprobs(tokens, 0)
                      if req.logprobs is not None else None, "finish_reason": event.finish_reason}
            return {**head, "choices": [choice], "usage": usage(event)}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(text: str, finish: str | None = None, logprobs: dict | None = None) -> str:
            return sse({**head, "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
                        **({"usage": None} if include_usage else {})})

        async def completion_stream() -> AsyncIterator[str]:
            offset = 0
            async for event in events(handle, queue):
                if isinstance(event, Token):
                    if event.text or req.logprobs is not None:
                        lp = completion_logprobs([event], offset) if req.logprobs is not None else None
                        yield chunk(event.text, logprobs=lp)
                    offset += len(event.text)
                elif isinstance(event, Failed):
                    yield sse({"error": _error_body(event)})
                    break
                else:
                    yield chunk(event.text, event.finish_reason)
                    if include_usage:
                        yield sse({**head, "choices": [], "usage": usage(event)})
            yield "data: [DONE]\n\n"

        return stream(completion_stream())

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, http: HTTPRequest) -> Any:
        return await complete(body, http)

    @app.post("/api/v1/generate", dependencies=guarded)
    async def generate(body: CompletionRequest, http: HTTPRequest) -> Any:
        return await complete(body, http)

    return app


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
