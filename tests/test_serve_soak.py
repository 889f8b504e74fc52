"""The server under abuse, as a real process on 127.0.0.1: a bounded soak of concurrent streaming clients on
all four generation APIs (some hanging up mid-stream, some sending malformed or oversized bodies), and a
SIGTERM with 16 streams open. Every reply that finishes must be well-formed in its API's own shape."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from tests.support.server import Server

import httpx  # noqa: E402

SOAK_SECONDS = 20.0
CLIENTS = 16
OVERSIZED = 4 * 1024 * 1024 + 1  # one byte over the server's default --max-body


@dataclass
class Stream:
    """One SSE reply: its events as (event name or None, decoded data)."""
    events: list[tuple[str | None, object]] = field(default_factory=list)


def read_sse(response: httpx.Response, stop_after: int | None = None) -> Stream:
    """Parse `text/event-stream` strictly: every `data:` payload is JSON (or OpenAI's `[DONE]`)."""
    out, name, data = Stream(), None, []
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data.append(line[len("data: "):])
        elif line == "":
            if data:
                payload = "\n".join(data)
                out.events.append((name, payload if payload == "[DONE]" else json.loads(payload)))
                if stop_after is not None and len(out.events) >= stop_after:
                    return out
            name, data = None, []
        else:
            raise AssertionError(f"not an SSE line: {line!r}")
    return out


# --- each API: a streaming body, and what a well-formed end of its stream is -------------------------

def _chat(n: int, model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": f"Tell me about the number {n}."}],
            "max_tokens": n, "temperature": 0.7, "stream": True, "stream_options": {"include_usage": True}}


def _completion(n: int, model: str) -> dict:
    return {"model": model, "prompt": f"Once upon a time, {n}", "max_tokens": n, "temperature": 0.7, "stream": True}


def _messages(n: int, model: str) -> dict:
    return {"model": model, "max_tokens": n, "stream": True,
            "messages": [{"role": "user", "content": f"Count to {n}."}]}


def _responses(n: int, model: str) -> dict:
    return {"model": model, "input": f"Write {n} words.", "max_output_tokens": n, "stream": True}


def _openai_end(s: Stream, shutdown: bool) -> str:
    datas = [d for _, d in s.events]
    assert datas and datas[-1] == "[DONE]", datas[-3:]
    last = datas[-2]
    if "error" in last:
        assert shutdown and "shut" in last["error"]["message"], last
        return "error"
    finishes = [c["finish_reason"] for d in datas[:-1] for c in d.get("choices", [])]
    assert finishes and finishes[-1] in ("length", "stop"), finishes[-3:]
    return finishes[-1]


def _anthropic_end(s: Stream, shutdown: bool) -> str:
    names = [n for n, _ in s.events]
    assert names[0] == "message_start", names
    if names[-1] == "error":
        assert shutdown and "shut" in s.events[-1][1]["error"]["message"], s.events[-1]
        return "error"
    assert names[-2:] == ["message_delta", "message_stop"], names[-3:]
    return s.events[-2][1]["delta"]["stop_reason"]


def _responses_end(s: Stream, shutdown: bool) -> str:
    names = [n for n, _ in s.events]
    assert names[0] == "response.created", names
    assert [d["sequence_number"] for _, d in s.events] == list(range(len(s.events)))
    if names[-1] == "response.failed":
        assert shutdown and "shut" in s.events[-1][1]["response"]["error"]["message"], s.events[-1]
        return "error"
    assert names[-1] in ("response.completed", "response.incomplete"), names[-3:]
    return s.events[-1][1]["response"]["status"]


APIS = {"chat": ("/v1/chat/completions", _chat, _openai_end, "openai"),
        "completions": ("/v1/completions", _completion, _openai_end, "openai"),
        "messages": ("/v1/messages", _messages, _anthropic_end, "anthropic"),
        "responses": ("/v1/responses", _responses, _responses_end, "openai")}


def assert_error_shape(r: httpx.Response, shape: str, status: int) -> None:
    assert r.status_code == status, (r.status_code, r.text[:200])
    body = r.json()
    if shape == "anthropic":
        assert body["type"] == "error" and body["error"]["message"], body
    else:
        assert set(body) == {"error"} and body["error"]["message"], body


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


# --- the soak -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tiny_model):
    return tiny_model("long-context")


def _client_loop(url: str, model: str, seed: int, until: float, tally: Counter, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=60) as h:
        while time.monotonic() < until:
            api = rng.choice(list(APIS))
            path, body_of, end_of, shape = APIS[api]
            action = rng.choices(["finish", "hang up", "malformed", "oversized"], [6, 3, 1, 0.3])[0]
            if action == "malformed":
                r = h.post(url + path, content=b'{"messages": [', headers={"Content-Type": "application/json"})
                assert_error_shape(r, shape, 400)
            elif action == "oversized":
                r = h.post(url + path, content=b"x" * OVERSIZED, headers={"Content-Type": "application/json"})
                assert_error_shape(r, shape, 413)
            else:
                with h.stream("POST", url + path, json=body_of(rng.randint(4, 48), model)) as r:
                    assert r.status_code == 200, r.read()[:200]
                    if action == "hang up":  # read a few events, then close the connection mid-stream
                        assert read_sse(r, stop_after=rng.randint(1, 3)).events
                    else:
                        end = end_of(read_sse(r), shutdown=False)
                        assert end in ("length", "stop", "end_turn", "max_tokens", "completed", "incomplete")
            with lock:
                tally[action] += 1
                tally[api] += 1


def test_soak_concurrent_streams_hangups_and_bad_bodies(folder):
    s = Server(folder, "--backend", "mlx", "--max-batch", "8")
    try:
        pid = s.proc.pid
        # warm every API once (first-use allocations are not growth), then take the baseline
        with httpx.Client(timeout=60) as h:
            for path, body_of, end_of, _ in APIS.values():
                with h.stream("POST", s.url + path, json=body_of(8, folder.name)) as r:
                    end_of(read_sse(r), shutdown=False)
        before = rss_kib(pid)
        tally: Counter = Counter()
        lock = threading.Lock()
        until = time.monotonic() + SOAK_SECONDS
        with ThreadPoolExecutor(CLIENTS) as pool:
            clients = [pool.submit(_client_loop, s.url, folder.name, seed, until, tally, lock)
                       for seed in range(CLIENTS)]
            for f in clients:
                f.result()
        # the hung-up streams are dropped at the engine's next step: nothing stays running or waiting
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            health = httpx.get(s.url + "/health").json()
            if health["running"] == 0 and health["waiting"] == 0:
                break
            time.sleep(0.05)
        assert health["status"] == "ok" and health["running"] == 0 and health["waiting"] == 0, health
        after = rss_kib(pid)
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 8, "temperature": 0},
                       timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
        print(f"\nsoak: {SOAK_SECONDS:.0f} s, {CLIENTS} clients, {dict(tally)}; "
              f"RSS {before / 1024:.0f} -> {after / 1024:.0f} MiB")
        assert tally["finish"] >= 20 and tally["hang up"] >= 10 and tally["malformed"] >= 1
        assert all(tally[api] > 0 for api in APIS)
        assert after - before < 64 * 1024, f"resident memory grew by {(after - before) / 1024:.0f} MiB"
    finally:
        assert s.stop() == 0


def test_sigterm_with_16_streams_open_ends_each_and_exits_0(folder):
    grace = 1
    s = Server(folder, "--backend", "mlx", "--grace", str(grace))
    try:
        ready, ends = threading.Barrier(17), []

        def one(i: int) -> str:
            path, body_of, end_of, _ = APIS[list(APIS)[i % 4]]
            with httpx.Client(timeout=60) as h, h.stream("POST", s.url + path, json=body_of(900, folder.name)) as r:
                try:
                    assert r.status_code == 200, r.read()[:300]
                    lines = r.iter_lines()
                    first = [next(lines) for _ in range(2)]  # the stream is open and producing
                except BaseException:
                    ready.abort()  # the main thread stops waiting and reports this failure
                    raise
                ready.wait(timeout=60)
                rest = Stream()
                rest.events = read_sse(_Replay(first, lines)).events
                return end_of(rest, shutdown=True)

        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(one, i) for i in range(16)]
            try:
                ready.wait(timeout=60)
            except threading.BrokenBarrierError:
                for f in futures:
                    f.result(timeout=60)
                raise
            # most are still decoding (a random tiny model may have ended one at EOS already: still a case)
            running = httpx.get(s.url + "/health").json()["running"]
            t0 = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            ends = [f.result(timeout=60) for f in futures]
            code = s.proc.wait(timeout=grace + 30)
            took = time.monotonic() - t0
        # each stream ended well-formed: a reply that finished within the grace period (a random tiny model meets
        # EOS often), or its API's error event naming the shutdown (the checks are in the end_of functions)
        print(f"\nSIGTERM with 16 streams open, {running} decoding: {Counter(ends)}, exit {code} after {took:.1f} s")
        assert running >= 1 and len(ends) == 16, (running, ends)
        assert code == 0 and took < grace + 15, (code, took)
        assert "server stopped" in "".join(s.lines)
    finally:
        s.stop()


class _Replay:
    """A response whose first lines were already read: `read_sse` sees them again, then the rest."""

    def __init__(self, first: list[str], rest):
        self.first, self.rest = first, rest

    def iter_lines(self):
        yield from self.first
        yield from self.rest


def test_an_event_is_one_line_for_every_line_splitter():
    """Found by the soak: a tiny model's reply held U+2028, which JSON leaves raw and httpx's iter_lines (like
    every str.splitlines reader) ends a line at. Each API's events go through the one `sse` writer."""
    from qwen_mlx.serve.core import sse

    text = "a\u2028b\u2029c\x85d\re\nf\x1cg"
    for frame in (sse({"text": text}), sse({"text": text}, event="content_block_delta")):
        lines = frame.rstrip("\n").splitlines()
        assert lines[-1].startswith("data: ") and len(lines) == (2 if "event:" in frame else 1)
        assert json.loads(lines[-1][len("data: "):]) == {"text": text}
