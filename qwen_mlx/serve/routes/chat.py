"""`/v1/chat/completions`: messages through the chat template, with tools, structured output and logprobs.

The body's checks and the prompt are this module's; submitting, collecting and streaming are the
serving core's. A thinking model's reasoning is returned apart as `reasoning_content` (engine/reasoning.py);
with tools, a `ToolCallFilter` holds back `<tool_call>` blocks from the answer and turns them into OpenAI's
`tool_calls` (finish_reason "tool_calls").
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request as HTTPRequest

from ...engine import Done, Request, Token
from ...engine.reasoning import ReasoningSplitter, starts_thinking, thinks
from ...errors import QwenError
from ...tokenizer import check_template_kwargs
from ..core import ApiError, Serving, ServingDep, guarded, sse, usage
from ..protocol import ChatRequest
from ..tools import ToolCallFilter, parse_tool_calls, template_messages

router = APIRouter()


@router.post("/v1/chat/completions", dependencies=guarded)
async def chat(body: ChatRequest, http: HTTPRequest, serving: ServingDep) -> Any:
    params = serving.sampling(body)
    tools = None
    if body.tools and body.tool_choice != "none":
        tools = [t.model_dump(exclude_none=True) for t in body.tools]
    elif body.tool_choice not in (None, "none"):
        raise ApiError(400, "tool_choice needs tools", param="tool_choice")
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    constraint = _constraint(serving, body)
    try:
        check_template_kwargs(body.chat_template_kwargs or {})
    except QwenError as e:
        raise ApiError(400, str(e), param="chat_template_kwargs") from None
    try:
        rendered = serving.tokenizer.apply_chat_template(template_messages(body.messages), tools=tools,
                                                         **(body.chat_template_kwargs or {}))
        prompt = serving.tokenizer.encode(rendered)
    except QwenError as e:
        raise ApiError(400, str(e), param="messages") from None
    # A thinking model's reasoning goes apart from the answer; a forced (grammar-bound) reply has none.
    splitter = ReasoningSplitter(starts_thinking(rendered)) \
        if thinks(serving.tokenizer.chat_template) and constraint is None else None
    req = Request(prompt, params, serving.budget(prompt, body.max_completion_tokens or body.max_tokens),
                  body.stop_strings(), body.presence_penalty, body.frequency_penalty,
                  (body.top_logprobs or 0) if body.logprobs else None, constraint, serving.speculation(body))
    handle, queue = serving.submit(req)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": serving.config.model_id}
    filt = ToolCallFilter(tools) if tools else None
    want_logprobs = req.logprobs is not None

    def logprobs(event: Token) -> dict:
        entry = serving.words.entry(event.id, event.logprob)
        entry["top_logprobs"] = [serving.words.entry(i, lp) for i, lp in event.top or []]
        return entry

    if not body.stream:
        text, tokens, done = await serving.collect(handle, queue, http)
        reasoning, text = splitter.split(text) if splitter is not None else ("", text)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish = done.finish_reason
        if filt is not None:
            content, calls = parse_tool_calls(text, filt.schemas)  # the whole reply: text before a call kept
            if calls:
                message = {"role": "assistant", "content": content or None, "tool_calls": calls}
                finish = "tool_calls"
        if reasoning and body.include_reasoning:
            message["reasoning_content"] = reasoning
        choice = {"index": 0, "message": message,
                  "logprobs": {"content": [logprobs(t) for t in tokens]} if want_logprobs else None,
                  "finish_reason": finish}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": usage(done)}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(delta: dict, finish: str | None = None, lp: list | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None if lp is None else {"content": lp},
                  "finish_reason": finish}
        return sse({**head, "object": "chat.completion.chunk", "choices": [choice],
                    **({"usage": None} if include_usage else {})})

    def split(text: str, last: bool) -> tuple[str, str]:
        """(reasoning, content) of a piece; the content has been through the tool-call filter."""
        reasoning, content = splitter.add(text) if splitter is not None else ("", text)
        if last and splitter is not None:
            more_reasoning, more_content = splitter.finish()
            reasoning, content = reasoning + more_reasoning, content + more_content
        content = filt.add(content) if filt is not None else content
        return (reasoning if body.include_reasoning else ""), content

    def delta(reasoning: str, content: str) -> dict:
        return {**({"reasoning_content": reasoning} if reasoning else {}), **({"content": content} if content else {})}

    def render(event: Token | Done) -> Iterator[str]:
        reasoning, piece = split(event.text, isinstance(event, Done))
        if isinstance(event, Token):
            lp = [logprobs(event)] if want_logprobs else None
            if reasoning or piece or lp:
                yield chunk(delta(reasoning, piece) or {"content": ""}, lp=lp)
            return
        finish, calls = event.finish_reason, []
        if filt is not None:
            rest, calls = filt.finish()
            piece += rest
        if reasoning or piece:
            yield chunk(delta(reasoning, piece))
        if calls:
            finish = "tool_calls"
            yield chunk({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]})
        yield chunk({}, finish)
        if include_usage:
            yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(event)})

    return serving.stream(handle, queue, render, first=[chunk({"role": "assistant", "content": ""})])


def _constraint(serving: Serving, body: ChatRequest) -> Any:
    """The grammar a forced reply must follow (a JSON response_format, or a named/required tool), or None."""
    forced = (body.response_format is not None and body.response_format.type != "text") or \
        body.tool_choice not in (None, "none", "auto")
    if not forced:
        return None
    if serving.config.make_constraint is None:
        raise ApiError(400, "structured output is not available on this server", param="response_format")
    try:
        return serving.config.make_constraint(body, serving.tokenizer)
    except QwenError as e:
        raise ApiError(400, str(e), param="response_format" if body.response_format else "tool_choice") from None
