"""`/v1/messages` and `/v1/messages/count_tokens`: Anthropic's Messages API over the same engine.

The body (anthropic.py) becomes the OpenAI-style conversation the chat template reads, so the prompt is the
one `/v1/chat/completions` renders for the same turns; submitting and collecting are the serving core's.
The reply goes back as Anthropic's content blocks: a thinking model's reasoning as a `thinking` block (its
`signature` is an empty string: nothing here is signed, and a signature sent back is ignored), the answer
as a `text` block, and each `<tool_call>` as a `tool_use` block (id `toolu_...`, input an object). Streamed,
the blocks arrive as Anthropic's SSE events (message_start, content_block_start/delta/stop, message_delta,
message_stop; a failure after the start is an `error` event); a tool call is sent whole when it is complete,
as one `input_json_delta`. `usage.input_tokens` counts the prompt tokens the prefix cache did not hold and
`cache_read_input_tokens` those it did, as Anthropic splits them: their sum is what count_tokens answers.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import StreamingResponse

from ...engine import Done, Failed, Request
from ...engine.reasoning import ReasoningSplitter, starts_thinking, thinks
from ...errors import QwenError
from ..anthropic import CountTokensRequest, MessagesRequest, PromptBody, constraint_body, error_body, \
    function_tools, template_messages
from ..core import ApiError, Serving, ServingDep, guarded, sse
from ..protocol import Sampling
from ..tools import ToolCallFilter, parameter_schemas, parse_tool_calls

router = APIRouter()


@router.post("/v1/messages", dependencies=guarded)
async def messages(body: MessagesRequest, http: HTTPRequest, serving: ServingDep) -> Any:
    params = serving.sampling(body.sampling())
    prompt = _prompt(serving, body, with_constraint=True)
    budget, clamped = _budget(serving, prompt.ids, body.max_tokens)
    stops = tuple(body.stop_sequences or ())
    req = Request(prompt.ids, params, budget, stop=stops, presence_penalty=body.presence_penalty,
                  frequency_penalty=body.frequency_penalty, constraint=prompt.constraint,
                  speculation=serving.speculation(body.sampling()))
    handle, queue = serving.submit(req)
    reply = _Reply(serving, body, prompt, stops, clamped)
    if not body.stream:
        text, tokens, done = await serving.collect(handle, queue, http)
        return reply.whole(text, [t.id for t in tokens], done)
    return StreamingResponse(reply.events(serving, handle, queue), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/v1/messages/count_tokens", dependencies=guarded)
async def count_tokens(body: CountTokensRequest, serving: ServingDep) -> dict:
    serving.sampling(Sampling(model=body.model))  # the model's name is checked as /v1/messages checks it
    return {"input_tokens": len(_prompt(serving, body, with_constraint=False).ids)}


# --- request -> prompt -------------------------------------------------------------------------------

@dataclass
class _Prompt:
    text: str
    ids: list[int]
    tools: list[dict] | None
    constraint: Any
    splitter: ReasoningSplitter | None  # a fresh one per prompt: it holds one reply's state


def _prompt(serving: Serving, body: PromptBody, with_constraint: bool) -> _Prompt:
    """The rendered prompt. A conversation that ends on an assistant turn is continued from its text (the API's
    prefill), as vLLM's `continue_final_message` does: the render is cut after that text."""
    tokenizer = serving.tokenizer
    try:
        tools = function_tools(body)
        chat = template_messages(body)
    except QwenError as e:
        raise ApiError(400, str(e)) from None
    forced = body.forced()
    if forced and body.thinking is not None and body.thinking.type != "disabled":
        raise ApiError(400, "thinking cannot be on while tool_choice forces a tool call or output_config sets a "
                            "format (the reply is bound by a grammar from its first token)")
    kwargs = {}
    if tokenizer.has_thinking_switch and (body.thinking is not None or forced):
        kwargs["enable_thinking"] = not forced and body.thinking.type != "disabled"
    if chat[-1]["role"] == "assistant" and not (chat[-1]["content"] or "").strip() and not chat[-1].get("tool_calls"):
        chat.pop()  # an empty final assistant turn: nothing to continue
    if not chat:
        raise ApiError(400, "messages: the conversation is empty once its empty final assistant turn is dropped")
    prefill = chat[-1]["content"] if chat[-1]["role"] == "assistant" else None
    if prefill is not None and chat[-1].get("tool_calls"):
        raise ApiError(400, "the last message is an assistant turn with tool_use blocks: send the tool_result in a "
                            "user turn")
    try:
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=prefill is None, tools=tools, **kwargs)
    except QwenError as e:
        raise ApiError(400, str(e)) from None
    if prefill is not None:
        at = text.rfind(prefill)
        if at < 0:
            raise ApiError(400, "this model's chat template does not keep the final assistant turn's text as "
                                "it is, so the reply cannot continue it")
        text = text[:at + len(prefill)]
    constraint = _constraint(serving, body) if with_constraint and forced else None
    splitter = ReasoningSplitter(starts_thinking(text)) \
        if thinks(tokenizer.chat_template) and constraint is None else None
    return _Prompt(text, tokenizer.encode(text), tools, constraint, splitter)


def _constraint(serving: Serving, body: PromptBody) -> Any:
    """The grammar of a forced tool call or a JSON output format (grammar.py, as the chat endpoint builds it)."""
    if serving.config.make_constraint is None:
        raise ApiError(400, "structured output (a forced tool_choice, output_config.format) is not available on "
                            "this server")
    try:
        return serving.config.make_constraint(constraint_body(body), serving.tokenizer)
    except QwenError as e:
        raise ApiError(400, str(e)) from None


def _budget(serving: Serving, prompt: list[int], asked: int) -> tuple[int, bool]:
    """(the reply's token budget, whether the context's end cut it below `asked`). Past the server's
    --max-tokens is refused; past the context's end the reply is cut there and its stop_reason says so
    (`model_context_window_exceeded`), as Anthropic's API does for its newer models."""
    context, most = serving.context, serving.config.max_tokens
    if len(prompt) >= context:  # worded as Anthropic's, which clients (Claude Code) read to compact the chat
        raise ApiError(400, f"prompt is too long: {len(prompt)} tokens > {context - 1} maximum")
    if asked > most:
        raise ApiError(400, f"max_tokens: {asked} > {most}, the most this server allows (serve --max-tokens)")
    room = context - len(prompt)
    return min(asked, room), asked > room


# --- answer -> content blocks ------------------------------------------------------------------------

def _sse(name: str, data: dict) -> str:
    return sse(data, event=name)


def _usage(done: Done) -> dict:
    return {"input_tokens": done.prompt_tokens - done.cached_tokens, "output_tokens": done.completion_tokens,
            "cache_read_input_tokens": done.cached_tokens, "cache_creation_input_tokens": 0}


def _tool_uses(calls: list[dict], single: bool) -> list[dict] | None:
    """OpenAI tool_calls as tool_use blocks, or None when one's arguments are not a JSON object (the reply
    then stays text, as a block that does not parse does)."""
    blocks = []
    for call in calls[:1] if single else calls:
        arguments = json.loads(call["function"]["arguments"])
        if isinstance(arguments, str):  # some models write the arguments as JSON inside a string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        blocks.append({"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": call["function"]["name"],
                       "input": arguments})
    return blocks


class _Reply:
    """One reply rendered back: whole (`whole`) or as SSE events (`events`)."""

    def __init__(self, serving: Serving, body: MessagesRequest, prompt: _Prompt, stops: tuple[str, ...],
                 clamped: bool):
        self.serving, self.prompt, self.stops, self.clamped = serving, prompt, stops, clamped
        self.omit = body.thinking is not None and getattr(body.thinking, "display", None) == "omitted"
        choice = body.tool_choice
        self.single = choice is not None and getattr(choice, "disable_parallel_tool_use", False)
        self.head = {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
                     "model": serving.config.model_id}

    def _stop(self, done: Done, calls: bool, raw: str, ids: list[int]) -> tuple[str, str | None]:
        """(stop_reason, stop_sequence). The engine cuts the text before a stop string and ends with "stop";
        which string it was is read off the decoded tokens just past the text."""
        if calls:
            return "tool_use", None
        if done.finish_reason == "length":
            return ("model_context_window_exceeded" if self.clamped else "max_tokens"), None
        if self.stops:
            detok = self.serving.tokenizer.detokenizer()
            tail = ("".join(detok.add_token(i) for i in ids) + detok.finalize())[len(raw):]
            for stop in self.stops:
                if tail.startswith(stop):
                    return "stop_sequence", stop
        return "end_turn", None

    def whole(self, text: str, ids: list[int], done: Done) -> dict:
        splitter, tools = self.prompt.splitter, self.prompt.tools
        reasoning, answer = splitter.split(text) if splitter is not None else ("", text)
        blocks: list[dict] = []
        if reasoning:
            blocks.append({"type": "thinking", "thinking": "" if self.omit else reasoning, "signature": ""})
        uses: list[dict] | None = None
        if tools:
            content, calls = parse_tool_calls(answer, parameter_schemas(tools))
            uses = _tool_uses(calls, self.single) if calls else None
            answer = content if uses else answer
        if answer:
            blocks.append({"type": "text", "text": answer})
        blocks += uses or []
        reason, sequence = self._stop(done, bool(uses), text, ids)
        return {**self.head, "content": blocks, "stop_reason": reason, "stop_sequence": sequence,
                "usage": _usage(done)}

    async def events(self, serving: Serving, handle: Any, queue: Any) -> AsyncIterator[str]:
        start = {**self.head, "content": [], "stop_reason": None, "stop_sequence": None,
                 "usage": {"input_tokens": len(self.prompt.ids), "output_tokens": 0, "cache_read_input_tokens": 0,
                           "cache_creation_input_tokens": 0}}
        yield _sse("message_start", {"type": "message_start", "message": start})
        blocks = _Blocks(self.omit)
        splitter = self.prompt.splitter
        filt = ToolCallFilter(self.prompt.tools) if self.prompt.tools else None
        raw, ids = "", []
        async for event in serving.events(handle, queue):
            if isinstance(event, Failed):
                yield _sse("error", error_body(event.status, event.message))
                return
            raw += event.text
            last = isinstance(event, Done)
            if not last:
                ids.append(event.id)
            reasoning, content = splitter.add(event.text) if splitter is not None else ("", event.text)
            if last and splitter is not None:
                more_reasoning, more_content = splitter.finish()
                reasoning, content = reasoning + more_reasoning, content + more_content
            if filt is not None:
                content = filt.add(content)
            for chunk in blocks.add("thinking", reasoning):
                yield chunk
            for chunk in blocks.add("text", content):
                yield chunk
            if not last:
                continue
            uses = None
            if filt is not None:
                held = filt.text[filt.sent:]
                rest, calls = filt.finish()
                uses = _tool_uses(calls, self.single) if calls else None
                for chunk in blocks.add("text", rest if uses else held):  # a call that is no tool_use stays text
                    yield chunk
            for chunk in blocks.tools(uses or []):
                yield chunk
            reason, sequence = self._stop(event, bool(uses), raw, ids)
            yield _sse("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                         "usage": _usage(event)})
            yield _sse("message_stop", {"type": "message_stop"})


class _Blocks:
    """Content blocks as SSE events: one open at a time, started, filled by deltas, stopped."""

    def __init__(self, omit_thinking: bool):
        self.index, self.open, self.omit = -1, None, omit_thinking

    def add(self, kind: str, piece: str) -> Iterator[str]:
        if not piece:
            return
        if self.open != kind:
            yield from self.close()
            self.index, self.open = self.index + 1, kind
            block = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else \
                {"type": "text", "text": ""}
            yield _sse("content_block_start", {"type": "content_block_start", "index": self.index,
                                               "content_block": block})
        if kind == "thinking" and self.omit:
            return
        delta = {"type": "thinking_delta", "thinking": piece} if kind == "thinking" else \
            {"type": "text_delta", "text": piece}
        yield _sse("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})

    def tools(self, uses: list[dict]) -> Iterator[str]:
        yield from self.close()
        for use in uses:
            self.index += 1
            yield _sse("content_block_start", {"type": "content_block_start", "index": self.index,
                                               "content_block": {**use, "input": {}}})
            yield _sse("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                               "delta": {"type": "input_json_delta",
                                                         "partial_json": json.dumps(use["input"], ensure_ascii=False)}})
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": self.index})

    def close(self) -> Iterator[str]:
        if self.open is not None:
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": self.index})
            self.open = None
