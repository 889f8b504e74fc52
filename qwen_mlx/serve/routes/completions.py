"""`/v1/completions` (and the same under `/api/v1/generate`): a raw prompt, text or token ids, continued.

No chat template: the prompt is encoded as given (or taken as ids, checked against the vocabulary).
Logprobs come in the legacy completions shape: parallel `tokens`, `token_logprobs`, `top_logprobs`
and `text_offset` lists.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request as HTTPRequest

from ...engine import Done, Request, Token
from ...errors import QwenError
from ..core import ApiError, Serving, ServingDep, guarded, sse, usage
from ..protocol import CompletionRequest

router = APIRouter()


@router.post("/v1/completions", dependencies=guarded)
async def completions(body: CompletionRequest, http: HTTPRequest, serving: ServingDep) -> Any:
    return await complete(serving, body, http)


@router.post("/api/v1/generate", dependencies=guarded)
async def generate(body: CompletionRequest, http: HTTPRequest, serving: ServingDep) -> Any:
    return await complete(serving, body, http)


async def complete(serving: Serving, body: CompletionRequest, http: HTTPRequest) -> Any:
    params = serving.sampling(body)
    ids = _prompt_ids(serving, body.prompt)
    req = Request(ids, params, serving.budget(ids, body.max_tokens), body.stop_strings(), body.presence_penalty,
                  body.frequency_penalty, body.logprobs, speculation=serving.speculation(body))
    handle, queue = serving.submit(req)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": serving.config.model_id}
    want_logprobs = req.logprobs is not None

    def logprobs(events: list[Token], offset: int) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for ev in events:
            out["tokens"].append(serving.words.text(ev.id))
            out["token_logprobs"].append(ev.logprob)
            out["top_logprobs"].append({serving.words.text(i): lp for i, lp in ev.top or []})
            out["text_offset"].append(offset)
            offset += len(ev.text)
        return out

    if not body.stream:
        text, tokens, done = await serving.collect(handle, queue, http)
        choice = {"index": 0, "text": text, "logprobs": logprobs(tokens, 0) if want_logprobs else None,
                  "finish_reason": done.finish_reason}
        return {**head, "choices": [choice], "usage": usage(done)}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    offset = 0  # characters streamed so far: each chunk's text_offset

    def chunk(text: str, finish: str | None = None, lp: dict | None = None) -> str:
        return sse({**head, "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}],
                    **({"usage": None} if include_usage else {})})

    def render(event: Token | Done) -> Iterator[str]:
        nonlocal offset
        if isinstance(event, Token):
            if event.text or want_logprobs:
                yield chunk(event.text, lp=logprobs([event], offset) if want_logprobs else None)
            offset += len(event.text)
            return
        yield chunk(event.text, event.finish_reason)
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(event)})

    return serving.stream(handle, queue, render)


def _prompt_ids(serving: Serving, prompt: Any) -> list[int]:
    """The prompt's token ids: a string encoded, a list of ids checked; a one-string list is that string."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise ApiError(400, "one prompt per request: a list of prompts is not supported", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        try:
            ids = serving.tokenizer.encode(prompt)
        except QwenError as e:
            raise ApiError(400, str(e).replace("the text", "prompt"), param="prompt") from None
    else:
        ids = list(prompt)
        bad = [i for i in ids if not 0 <= i < serving.engine.backend.args.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary", param="prompt")
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    return ids
