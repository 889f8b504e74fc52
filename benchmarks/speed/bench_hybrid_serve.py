"""A multi-turn chat against `cli.py serve` beside `mlx_lm.server` on one random Qwen3.5: per turn, time to first
token and the prompt tokens each server prefilled or took from its prefix cache.

    python -m benchmarks.speed.bench_hybrid_serve /tmp/hybrid_serve [--turns 5] [--system 1500] [--user 120] \
        [--max-tokens 16] [--rounds 2] [--servers qwen-mlx,mlx-lm+openblas] [--history own|scripted]

The first run writes the checkpoint into the folder: benchmarks/speed/bench_hybrid.py's random Qwen3.5 (hidden
1024, 8 layers of which 6 Gated DeltaNet and 2 full attention, float32) with the tiny 512-id tokenizer and
Qwen2.5's chat template (benchmarks/checkpoints/tiny_tokenizer.py). Both servers load it and stay up; each
round runs the whole chat on each server in turn (the order alternating between rounds), each round with a
system prompt of its own, so nothing is cached across rounds. A chat is a system prompt of about `--system`
tokens, then `--turns` user messages of about `--user` tokens; every request sends the whole conversation so far,
streams, greedy (temperature 0, no seed), `--max-tokens` tokens. The assistant messages sent back are the
server's own replies (`--history own`, as a chat client does) or fixed text (`--history scripted`: the same
requests to both servers whatever they answer).

Per turn: time to first token (from sending the request to the first streamed chunk with text or a finish
reason), `usage.prompt_tokens` and `usage.prompt_tokens_details.cached_tokens` as each server reports them;
prefilled = prompt - cached. Medians over rounds for the times. The replies of the servers are compared turn
by turn (same greedy text or not). `mlx-lm+openblas` is mlx_lm.server with the OpenBLAS qwen-mlx loads by itself
preloaded (LD_PRELOAD, as in bench_serve.py), `mlx-lm` as installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx

from benchmarks.common import prog, round_order
from benchmarks.speed.bench_serve import Server, start_servers

VOCAB = 512
SENTENCES = [
    "Answer in plain words and keep every reply short.", "Cite the section of the manual you rely on.",
    "Never invent a part number; ask for it instead.", "Prefer metric units and give tolerances.",
    "When a step is risky, say so before the step.", "Write code in Python unless told otherwise.",
    "Check the torque table before you tighten a bolt.", "A pump that runs dry for a minute must be replaced.",
    "The service interval is every 500 hours of operation.", "Filters come in three sizes: small, medium and large.",
    "Log every change you make with the date and your name.", "Do not open the housing while the unit is powered.",
]
QUESTIONS = [
    "The pressure gauge reads low after the filter change. What should I check first?",
    "Which filter size fits the model with the long housing, and how do I tell them apart?",
    "How often should the seals be replaced if the unit runs all day?",
    "Write a short checklist for the yearly inspection.",
    "The motor hums but does not start. Is it the capacitor or the switch?",
    "What torque do the cover bolts need, and in which order do I tighten them?",
    "Can I run the pump with the bypass valve open for a while?",
    "Summarize what we did so far in three lines.",
]
SCRIPTED_REPLY = "Check the inlet valve first, then the filter seat; log what you find."


class Tokens:
    """The folder's tokenizer, to size the system prompt and user messages in tokens."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))

    def count(self, text: str) -> int:
        return len(self.tok.encode(text).ids)

    def grow(self, head: str, pool: list[str], target: int, start: int = 0) -> str:
        """`head` followed by sentences of `pool` (numbered, from `start`, cycling) until about `target` tokens."""
        text, i = head, start
        while self.count(text) < target:
            text += f" ({i + 1}) {pool[i % len(pool)]}"
            i += 1
        return text


def chat_turns(tokens: Tokens, round_: int, system: int, user: int, turns: int) -> tuple[str, list[str]]:
    """One round's system prompt and user messages (the round's number first, so rounds share no prefix)."""
    sys_text = tokens.grow(f"Round {round_ + 1}. You are the maintenance assistant for pump line {round_ + 7}.",
                           SENTENCES, system, start=round_)
    users = [tokens.grow(QUESTIONS[(t + round_) % len(QUESTIONS)] + " Details:", SENTENCES, user, start=3 * t + round_)
             for t in range(turns)]
    return sys_text, users


def request(url: str, messages: list[dict], max_tokens: int) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent, first, text, usage, finish = time.perf_counter(), None, [], None, None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=1800) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            usage = data.get("usage") or usage
            for choice in data.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                finish = choice.get("finish_reason") or finish
                if content or choice.get("finish_reason"):
                    first = first or time.perf_counter()
                text.append(content or "")
    if usage is None:
        raise RuntimeError(f"{url}: no usage in the stream")
    details = usage.get("prompt_tokens_details") or {}
    return {"ttft": (first or time.perf_counter()) - sent, "total": time.perf_counter() - sent,
            "prompt": usage["prompt_tokens"], "cached": details.get("cached_tokens", 0),
            "completion": usage["completion_tokens"], "text": "".join(text), "finish": finish}


def run_chat(server: Server, sys_text: str, users: list[str], max_tokens: int, history: str) -> list[dict]:
    messages = [{"role": "system", "content": sys_text}]
    out = []
    for question in users:
        messages.append({"role": "user", "content": question})
        r = request(server.url, messages, max_tokens)
        out.append(r)
        messages.append({"role": "assistant", "content": r["text"] if history == "own" else SCRIPTED_REPLY})
    return out


def values(turns: list[dict], key: str) -> str:
    """One turn's `key` over rounds: one number, or each distinct one where rounds differ."""
    got = sorted({x["prompt"] - x["cached"] if key == "prefilled" else x[key] for x in turns})
    return "/".join(map(str, got))


def main() -> None:
    p = argparse.ArgumentParser(prog=prog(__spec__.name), description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="the random Qwen3.5 checkpoint (written on the first run)")
    p.add_argument("--servers", default="qwen-mlx,mlx-lm+openblas")
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--system", type=int, default=1500, help="system prompt tokens (about)")
    p.add_argument("--user", type=int, default=120, help="tokens of each user message (about)")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens of every request")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--history", choices=("own", "scripted"), default="own",
                   help="assistant messages sent back: the server's own replies, or fixed text")
    a = p.parse_args()
    if not (a.folder / "config.json").is_file():
        from benchmarks.speed.bench_hybrid import write_checkpoint

        write_checkpoint(a.folder, tokenizer=True, vocab_size=VOCAB)
    tokens = Tokens(a.folder)
    names = a.servers.split(",")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
          f"{a.turns} turns, system ~{a.system} tokens, user ~{a.user} tokens, {a.max_tokens} tokens per reply, "
          f"history {a.history}, {a.rounds} interleaved rounds", flush=True)
    servers = start_servers(str(a.folder), names, None)
    results: dict[str, list[list[dict]]] = {name: [] for name in names}
    loads = [os.getloadavg()[0]]
    try:
        for s in servers:  # warm-up: a short chat of its own
            request(s.url, [{"role": "user", "content": "Hello."}], 4)
        for r in range(a.rounds):
            sys_text, users = chat_turns(tokens, r, a.system, a.user, a.turns)
            for s in round_order(servers, r):
                t0 = time.perf_counter()
                results[s.name].append(run_chat(s, sys_text, users, a.max_tokens, a.history))
                loads.append(os.getloadavg()[0])
                turns = results[s.name][-1]
                print(f"round {r + 1} {s.name} ({time.perf_counter() - t0:.0f} s): TTFT "
                      + ", ".join(f"{x['ttft']:.2f}" for x in turns) + " s; cached "
                      + ", ".join(f"{x['cached']}/{x['prompt']}" for x in turns), file=sys.stderr, flush=True)
    finally:
        for s in servers:
            s.stop()
    print(f"load average {min(loads):.1f}-{max(loads):.1f}\n")
    print("| server | turn | prompt tokens | cached | prefilled | TTFT s (median) | TTFT s per round |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        for t in range(a.turns):
            xs = [chat[t] for chat in results[name]]
            prompt, cached, prefilled = (values(xs, k) for k in ("prompt", "cached", "prefilled"))
            rounds = ", ".join(f"{x['ttft']:.2f}" for x in xs)
            print(f"| {name} | {t + 1} | {prompt} | {cached} | {prefilled} | "
                  f"{statistics.median(x['ttft'] for x in xs):.2f} | {rounds} |")
    if len(names) > 1:
        base = results[names[0]]
        for name in names[1:]:
            same = [[x["text"] == y["text"] for x, y in zip(c0, c1)] for c0, c1 in zip(base, results[name])]
            per_round = ", ".join(f"{sum(s)}/{len(s)}" for s in same)
            print(f"\n{names[0]} vs {name}: same greedy reply text in {per_round} turns (per round)")
            for r, (c0, c1) in enumerate(zip(base, results[name])):
                for t, (x, y) in enumerate(zip(c0, c1)):
                    if x["text"] != y["text"]:
                        common = len(os.path.commonprefix([x["text"], y["text"]]))
                        print(f"  round {r + 1} turn {t + 1}: equal for {common} characters, then "
                              f"{x['text'][common:]!r} vs {y['text'][common:]!r} ({x['completion']} and "
                              f"{y['completion']} tokens)")


if __name__ == "__main__":
    main()
