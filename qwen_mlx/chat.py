"""The terminal chat: a multi-turn conversation kept in the KV cache.

Each turn renders the whole conversation with the checkpoint's chat template (the exact transcript HF
would render) and runs it through the engine with a batch of one (the server's generation loop), whose
backend keeps the conversation's KV cache and prefills only the new tokens. When the context fills up,
the oldest turns are dropped and the user is told.
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

from .backends import LoadedModel
from .engine import Engine, local_engine, stream_generate
from .errors import QwenError
from .backends.base import Session
from .engine.speculative import Drafter, Speculation
from .engine.text import GenerationStats
from .sampling import SamplingParams
from .text_input import check_text

HELP = "/reset forgets the conversation, /exit (or Ctrl-D) leaves, Ctrl-C stops a reply."


def run_chat(loaded: LoadedModel, params: SamplingParams, max_tokens: int, system: str | None = None,
             stop: tuple[str, ...] = (), read: Callable[[str], str] = input, out: TextIO = sys.stdout,
             err: TextIO = sys.stderr, session: Session | None = None, speculation: Speculation | None = None,
             drafters: dict[str, Drafter] | None = None) -> tuple[list[dict], Engine]:
    """Run until /exit or end of input; returns the conversation and the engine (for tests). `session`:
    one whose cache already holds a prefix (a saved prompt cache), else the engine starts empty.
    `speculation` and `drafters`: speculative decoding (qwen_mlx/engine/speculative.py)."""
    engine = local_engine(loaded.backend, loaded.tokenizer, session)
    engine.drafters.update(drafters or {})
    tokenizer = loaded.tokenizer
    context = loaded.backend.args.context_length
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    print(f"qwen-mlx chat on {loaded.backend.device}. {HELP}", file=err)
    while True:
        try:
            line = read(">>> ")
        except EOFError:
            print(file=out)
            return messages, engine
        except KeyboardInterrupt:
            print(file=out)
            continue
        text = line.strip()
        if not text:
            continue
        try:
            check_text(line, "that message")
        except QwenError as e:  # a bad line must not end the conversation
            print(f"error: {e}", file=err)
            continue
        if text in ("/exit", "/quit"):
            return messages, engine
        if text == "/reset":
            messages = list(start)  # the next prompt shares no cached prefix beyond the system turn
            print("(conversation forgotten)", file=err)
            continue
        messages.append({"role": "user", "content": line})
        prompt = tokenizer.encode_chat(messages)
        # Leave room for a reply: drop whole user/assistant turns from the front until it fits.
        room = min(max_tokens, max(context // 4, 1))
        while len(prompt) + room > context and len(messages) > len(start) + 1:
            del messages[len(start):len(start) + 2]
            prompt = tokenizer.encode_chat(messages)
            print("(context full: dropped the oldest turn)", file=err)
        if len(prompt) >= context:
            messages.pop()
            print(f"(that message is too long: {len(prompt)} tokens, the context holds {context})", file=err)
            continue
        stats = GenerationStats()
        reply = ""
        try:
            for piece in stream_generate(engine, prompt, params, max_tokens, stop, stats, speculation):
                reply += piece
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            print("\n(stopped)", file=err)
        except Exception as e:  # a failed turn must not end the conversation (the engine stays usable)
            out.write("\n")
            print(f"error: {_describe(e)}", file=err)
            messages.pop()  # forget the turn that failed: the next one renders as if it never happened
            continue
        out.write("\n")
        messages.append({"role": "assistant", "content": reply})
        if stats.generation_tokens:
            print(f"[{stats.prompt_tokens} prompt tokens, {stats.prompt_tps:.1f} tok/s | "
                  f"{stats.generation_tokens} tokens, {stats.generation_tps:.1f} tok/s | "
                  f"peak {stats.peak_memory_gb:.2f} GB"
                  + (f" | drafts kept {stats.accepted_tokens}/{stats.draft_tokens}" if stats.draft_tokens else "")
                  + "]", file=err)


def _describe(e: Exception) -> str:
    """One line: a QwenError's message as is; anything else (a bug, a backend failure) with its type."""
    text = " ".join(str(e).split()) or "(no message)"
    return text if isinstance(e, QwenError) else f"{type(e).__name__}: {text} (the conversation is kept)"
