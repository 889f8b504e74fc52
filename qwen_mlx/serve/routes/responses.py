"""`/v1/responses`: OpenAI's Responses API, stateless, over the chat endpoint's machinery.

The input items become chat messages (a `ChatRequest`), so the prompt, the tools, the JSON schema grammar
(`ServerConfig.make_constraint`) and the sampling checks are the chat endpoint's; the reply is split as there
(a thinking model's `<think>` block apart, `<tool_call>` blocks into calls) and comes back as output items: a
`reasoning` item (the reasoning whole, as `reasoning_text` content; no summary), a `message` with one
`output_text`, and `function_call` items. Streamed, the same items arrive as OpenAI's `response.*` events
(`event: NAME` and `data: JSON`, each with its `sequence_number`), ending with `response.completed`,
`response.incomplete` (max_output_tokens reached) or `response.failed`.

Nothing is stored: `store` is accepted and changes nothing, and `previous_response_id` is a 400 (send the
conversation as input items: the reasoning, message and function_call items of `response.output`, then the
`function_call_output` items).
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from ...engine import Done, Failed, Request, Token
from ...engine.reasoning import ReasoningSplitter, starts_thinking, thinks
from ...errors import QwenError
from ..core import ApiError, Serving, ServingDep, failure, guarded, sse
from ..protocol import ChatRequest, Message, ToolCall, ToolCallFunction
from ..responses_protocol import (FunctionCallItem, MessageItem, ReasoningItem, ResponsesRequest, TextFormatJsonObject,
                                  TextFormatJsonSchema)
from ..tools import ToolCallFilter, template_messages

router = APIRouter()


@router.post("/v1/responses", dependencies=guarded)
async def responses(body: ResponsesRequest, http: HTTPRequest, serving: ServingDep) -> Any:
    if body.previous_response_id is not None:
        raise ApiError(400, "previous_response_id is not supported: this server stores no responses; send the "
                            "conversation as input items instead", param="previous_response_id")
    chat = chat_request(body)
    params = serving.sampling(chat)
    tools = None
    if chat.tools and chat.tool_choice != "none":
        tools = [t.model_dump(exclude_none=True) for t in chat.tools]
    elif chat.tool_choice not in (None, "none", "auto"):
        raise ApiError(400, "tool_choice needs tools", param="tool_choice")
    constraint = _constraint(serving, chat)
    try:
        rendered = serving.tokenizer.apply_chat_template(template_messages(chat.messages), tools=tools,
                                                         **_template_kwargs(serving, body))
    except QwenError as e:
        raise ApiError(400, str(e).replace("messages:", "input:"), param="input") from None
    prompt = serving.tokenizer.encode(rendered)
    # As on the chat endpoint: a thinking model's reasoning apart; a forced (grammar-bound) reply has none.
    splitter = ReasoningSplitter(starts_thinking(rendered)) \
        if thinks(serving.tokenizer.chat_template) and constraint is None else None
    try:
        budget = serving.budget(prompt, body.max_output_tokens)
    except ApiError as e:  # said in this API's words
        e.message = e.message.replace("max_tokens", "max_output_tokens")
        e.param = {"max_tokens": "max_output_tokens", "messages": "input"}.get(e.param or "", e.param)
        raise
    req = Request(prompt, params, budget, chat.stop_strings(), chat.presence_penalty, chat.frequency_penalty,
                  None, constraint, speculation=serving.speculation(chat))  # the server's default
    handle, queue = serving.submit(req)
    reply = Reply(_skeleton(body, params, serving.config.model_id), splitter,
                  ToolCallFilter(tools) if tools else None, body.parallel_tool_calls is not False)

    if not body.stream:
        async for event in serving.events(handle, queue, http):
            if isinstance(event, Failed):
                raise failure(event)
            if isinstance(event, Token):
                reply.token(event.text)
            else:
                reply.finish(event)
        return reply.response

    async def chunks() -> AsyncIterator[str]:
        for ev in reply.start():
            yield _frame(ev)
        async for event in serving.events(handle, queue):
            if isinstance(event, Failed):
                events = reply.failed(event.message)
            else:
                events = reply.token(event.text) if isinstance(event, Token) else reply.finish(event)
            for ev in events:
                yield _frame(ev)

    return StreamingResponse(chunks(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# --- request: input items -> the chat endpoint's request ------------------------------------------------

def chat_request(body: ResponsesRequest) -> ChatRequest:
    """The chat request that asks for the same reply: messages from the instructions and input items, the
    function tools, tool_choice, text.format as response_format, the sampling fields."""
    fmt = body.text.format if body.text is not None else None
    response_format: dict[str, Any] | None = None
    if isinstance(fmt, TextFormatJsonObject):
        response_format = {"type": "json_object"}
    elif isinstance(fmt, TextFormatJsonSchema):
        response_format = {"type": "json_schema", "json_schema": fmt.model_dump(by_alias=True, exclude={"type"},
                                                                                exclude_none=True)}
    choice = body.tool_choice
    try:
        return ChatRequest.model_validate({
            "model": body.model, "messages": conversation(body), "max_completion_tokens": body.max_output_tokens,
            "stream": bool(body.stream), "user": body.user, "response_format": response_format,
            "tools": [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                      for t in body.tools] if body.tools else None,
            "tool_choice": {"type": "function", "function": {"name": choice.name}} if choice is not None
            and not isinstance(choice, str) else choice,
            **{k: getattr(body, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed",
                                             "presence_penalty", "frequency_penalty", "stop")}})
    except ValidationError as e:  # the fields were checked already; say so plainly if one slips through
        raise ApiError(400, f"invalid request: {e.errors()[0]['msg']}") from None


def conversation(body: ResponsesRequest) -> list[Message]:
    """The instructions (a system message) and the input items as chat messages: a function_call joins the
    assistant turn before it (parallel calls are one turn), a function_call_output is a tool message, and a
    reasoning item's text goes to the next assistant turn as its `reasoning_content`."""
    messages = [Message(role="system", content=body.instructions)] if body.instructions is not None else []
    if not body.input:
        raise ApiError(400, "input is empty", param="input")
    reasoning: str | None = None
    for i, item in enumerate(body.input):
        if isinstance(item, ReasoningItem):
            if item.encrypted_content is not None:
                raise ApiError(400, f"input[{i}]: encrypted reasoning is not supported here (this server never "
                                    "encrypts it): send its content", param=f"input[{i}].encrypted_content")
            reasoning = item.text()
        elif isinstance(item, MessageItem):
            messages.append(Message(role=item.role, content=item.text(),
                                    reasoning_content=reasoning if item.role == "assistant" else None))
            reasoning = None if item.role == "assistant" else reasoning
        elif isinstance(item, FunctionCallItem):
            call = ToolCall(id=item.call_id, function=ToolCallFunction(name=item.name, arguments=item.arguments))
            if messages and messages[-1].role == "assistant" and reasoning is None:
                messages[-1].tool_calls = [*(messages[-1].tool_calls or []), call]
            else:
                messages.append(Message(role="assistant", content=None, tool_calls=[call], reasoning_content=reasoning))
                reasoning = None
        else:
            messages.append(Message(role="tool", tool_call_id=item.call_id, content=item.text()))
    return messages


def _template_kwargs(serving: Serving, body: ResponsesRequest) -> dict[str, Any]:
    """reasoning.effort on a template with Qwen3's thinking switch: "none" is off, any other effort on."""
    effort = body.reasoning.effort if body.reasoning is not None else None
    if effort is None or not serving.tokenizer.has_thinking_switch:
        return {}
    return {"enable_thinking": effort != "none"}


def _constraint(serving: Serving, chat: ChatRequest) -> Any:
    """The grammar a forced reply must follow (a JSON text.format, or a named/required tool), or None."""
    forced = (chat.response_format is not None and chat.response_format.type != "text") or \
        chat.tool_choice not in (None, "none", "auto")
    if not forced:
        return None
    param = "text.format" if chat.response_format is not None else "tool_choice"
    if serving.config.make_constraint is None:
        raise ApiError(400, "structured output is not available on this server", param=param)
    try:
        return serving.config.make_constraint(chat, serving.tokenizer)
    except QwenError as e:
        raise ApiError(400, str(e).replace("response_format", "text.format"), param=param) from None


# --- reply: engine events -> output items and response.* events ------------------------------------------

def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _skeleton(body: ResponsesRequest, params: Any, model_id: str) -> dict[str, Any]:
    """The response object before any output: the request's settings echoed, as OpenAI's are."""
    choice = body.tool_choice
    fmt = body.text.format if body.text is not None and body.text.format is not None else None
    return {
        "id": _id("resp"), "object": "response", "created_at": int(time.time()), "status": "in_progress",
        "background": False, "error": None, "incomplete_details": None, "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens, "model": model_id, "output": [],
        "parallel_tool_calls": body.parallel_tool_calls is not False, "previous_response_id": None,
        "reasoning": {"effort": body.reasoning.effort if body.reasoning else None,
                      "summary": body.reasoning.summary if body.reasoning else None},
        "temperature": params.temperature, "top_p": params.top_p,
        "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
        "tool_choice": choice.model_dump() if choice is not None and not isinstance(choice, str) else choice or "auto",
        "tools": [t.model_dump() for t in body.tools or []], "truncation": "disabled", "usage": None,
        "user": body.user, "metadata": body.metadata or {},
    }


def _frame(event: dict[str, Any]) -> str:
    return sse(event, event=event["type"])


class Reply:
    """One response's output, built from the engine's events. Each step returns the `response.*` events it
    makes (a streamed reply sends them; a whole one keeps only `response`). Reasoning and answer text stream
    as they come, each in its own item, opened on its first text; function calls are whole only at the end
    (the tool-call filter holds them back), so each arrives as one arguments delta."""

    def __init__(self, response: dict[str, Any], splitter: ReasoningSplitter | None, filt: ToolCallFilter | None,
                 parallel: bool):
        self.response, self.splitter, self.filt, self.parallel = response, splitter, filt, parallel
        self.output: list[dict[str, Any]] = response["output"]
        self.open: dict[str, Any] | None = None  # the reasoning or message item being written
        self.text = ""  # its text so far
        self.reasoning_tokens = 0
        self.seq = 0

    def event(self, type_: str, **fields: Any) -> dict[str, Any]:
        ev = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return ev

    def start(self) -> list[dict[str, Any]]:
        return [self.event("response.created", response=copy.deepcopy(self.response)),
                self.event("response.in_progress", response=copy.deepcopy(self.response))]

    def token(self, text: str) -> list[dict[str, Any]]:
        if self.splitter is None:
            return self._pieces("", text)
        before = self.splitter.state
        reasoning, content = self.splitter.add(text)
        if "reasoning" in (before, self.splitter.state):  # </think> itself counts as reasoning
            self.reasoning_tokens += 1
        return self._pieces(reasoning, content)

    def finish(self, done: Done) -> list[dict[str, Any]]:
        reasoning, content = "", done.text
        if self.splitter is not None:
            reasoning, content = self.splitter.add(done.text)
            more_reasoning, more_content = self.splitter.finish()
            reasoning, content = reasoning + more_reasoning, content + more_content
        events = self._pieces(reasoning, content)
        calls: list[dict[str, Any]] = []
        if self.filt is not None:
            rest, calls = self.filt.finish()
            if rest:
                events += self._write("message", rest)
        incomplete = done.finish_reason == "length"
        status = "incomplete" if incomplete else "completed"
        if self.open is not None:
            events += self._close(status)
        if not self.output and not calls:  # an empty reply is still one (empty) message
            events += self._open("message") + self._close(status)
        for call in calls if self.parallel else calls[:1]:
            events += self._call(call["id"], call["function"]["name"], call["function"]["arguments"])
        self.response.update(
            status=status, incomplete_details={"reason": "max_output_tokens"} if incomplete else None,
            usage={"input_tokens": done.prompt_tokens, "input_tokens_details": {"cached_tokens": done.cached_tokens},
                   "output_tokens": done.completion_tokens,
                   "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                   "total_tokens": done.prompt_tokens + done.completion_tokens})
        if not incomplete:
            self.response["completed_at"] = int(time.time())
        return events + [self.event(f"response.{status}", response=copy.deepcopy(self.response))]

    def failed(self, message: str) -> list[dict[str, Any]]:
        self.response.update(status="failed", error={"code": "server_error", "message": message})
        return [self.event("response.failed", response=copy.deepcopy(self.response))]

    def _pieces(self, reasoning: str, content: str) -> list[dict[str, Any]]:
        content = self.filt.add(content) if self.filt is not None else content
        return (self._write("reasoning", reasoning) if reasoning else []) + \
            (self._write("message", content) if content else [])

    def _write(self, kind: str, text: str) -> list[dict[str, Any]]:
        events = []
        if self.open is not None and self.open["type"] != kind:
            events += self._close("completed")
        if self.open is None:
            events += self._open(kind)
        self.text += text
        where = {"item_id": self.open["id"], "output_index": len(self.output) - 1, "content_index": 0}
        if kind == "reasoning":
            return events + [self.event("response.reasoning_text.delta", **where, delta=text)]
        return events + [self.event("response.output_text.delta", **where, delta=text, logprobs=[])]

    def _open(self, kind: str) -> list[dict[str, Any]]:
        if kind == "reasoning":
            item = {"id": _id("rs"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
        else:
            item = {"id": _id("msg"), "type": "message", "role": "assistant", "content": [], "status": "in_progress"}
        self.output.append(item)
        self.open, self.text = item, ""
        where = {"item_id": item["id"], "output_index": len(self.output) - 1, "content_index": 0}
        return [self.event("response.output_item.added", output_index=where["output_index"], item=copy.deepcopy(item)),
                self.event("response.content_part.added", **where, part=self._part(kind, ""))]

    def _close(self, status: str) -> list[dict[str, Any]]:
        item, text = self.open, self.text
        assert item is not None
        where = {"item_id": item["id"], "output_index": len(self.output) - 1, "content_index": 0}
        if item["type"] == "reasoning":
            done = self.event("response.reasoning_text.done", **where, text=text)
        else:
            done = self.event("response.output_text.done", **where, text=text, logprobs=[])
        item.update(content=[self._part(item["type"], text)], status=status)
        self.open = None
        return [done, self.event("response.content_part.done", **where, part=self._part(item["type"], text)),
                self.event("response.output_item.done", output_index=where["output_index"], item=copy.deepcopy(item))]

    def _call(self, call_id: str, name: str, arguments: str) -> list[dict[str, Any]]:
        item = {"id": _id("fc"), "type": "function_call", "call_id": call_id, "name": name, "arguments": "",
                "status": "in_progress"}
        self.output.append(item)
        index = len(self.output) - 1
        where = {"item_id": item["id"], "output_index": index}
        events = [self.event("response.output_item.added", output_index=index, item=copy.deepcopy(item)),
                  self.event("response.function_call_arguments.delta", **where, delta=arguments),
                  self.event("response.function_call_arguments.done", **where, name=name, arguments=arguments)]
        item.update(arguments=arguments, status="completed")
        return events + [self.event("response.output_item.done", output_index=index, item=copy.deepcopy(item))]

    @staticmethod
    def _part(kind: str, text: str) -> dict[str, Any]:
        if kind == "reasoning":
            return {"type": "reasoning_text", "text": text}
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
