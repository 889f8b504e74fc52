"""`cli.py serve` beside `mlx_lm.server` under 1, 4, 8 and 16 concurrent streaming clients, in one run.

Both servers load the same HF folder on this machine, each on its own defaults (dtype as stored: float32
for the real checkpoint's folder), and stay up for the whole run; rounds interleave them, so load from
other jobs falls on both alike. Every client streams one chat completion with its own prompt, greedy
(temperature 0, no seed: mlx_lm.server batches only unseeded requests), `max_tokens` each.

    nice python -m benchmarks.speed.bench_serve --model $(python -m qwen_mlx.formats.real_checkpoint)

Per (server, clients), medians over rounds: aggregate tok/s (completion tokens of all clients over the
wall time from the first request sent to the last answer), time to first token and inter-token latency
(gaps between streamed chunks that carry text), p50 and p99 over every request / gap of every round.
`mlx-lm+openblas` is mlx_lm.server with the OpenBLAS that qwen-mlx loads by itself preloaded
(LD_PRELOAD), to separate what the BLAS gives from what the server does.

`onnx` is `cli.py serve --backend onnx` on the folder `export-onnx` wrote from the same checkpoint
(`--onnx FOLDER`), batched (export/backends/onnx_batch.py); `onnx-batch1` is the same server at `--max-batch 1`,
one sequence at a time as ONNX ran before it batched:

    nice python -m benchmarks.speed.bench_serve --model $(python -m qwen_mlx.formats.real_checkpoint) \
        --onnx ONNX_FOLDER --servers onnx,onnx-batch1 --clients 1,8 --tokens 32 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

from benchmarks.common import REPO, prog, round_order

OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
TOPICS = ["a robot who learns to paint", "the history of the printing press", "a lighthouse keeper's last night",
          "how bridges carry loads", "a cat that runs a bakery", "the water cycle", "a chess match on a train",
          "why the sky is blue", "a city under the sea", "the first day at a new school", "volcanoes",
          "a detective who cannot smell", "how vaccines work", "a journey across the desert",
          "the life of a honeybee", "a library that never closes"]


@dataclass
class Sample:
    sent: float
    first: float | None = None
    chunks: list[float] = field(default_factory=list)
    tokens: int = 0
    end: float = 0.0
    error: str | None = None


class Server:
    def __init__(self, name: str, command: list[str], env: dict[str, str], port: int):
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.log = open(f"/tmp/bench_serve_{name}.log", "w")
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited; see {self.log.name}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{name} did not come up")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_servers(model: str, names: list[str], max_batch: int | None, onnx: str | None = None) -> list[Server]:
    base = dict(os.environ, HF_HUB_OFFLINE="1", QWEN_MLX_QUIET="1", PYTHONUNBUFFERED="1")
    base.pop("LD_PRELOAD", None)
    servers = []
    for name in names:
        port = free_port()
        if name == "qwen-mlx":
            cmd = [sys.executable, str(REPO / "cli.py"), "serve", "--model", model, "--port", str(port)]
            cmd += ["--max-batch", str(max_batch)] if max_batch else []
            servers.append(Server(name, cmd, base, port))
        elif name in ("onnx", "onnx-batch1"):
            if not onnx:
                raise SystemExit(f"{name} needs --onnx FOLDER (written by `cli.py export-onnx`)")
            cmd = [sys.executable, str(REPO / "cli.py"), "serve", "--backend", "onnx", "--model", onnx,
                   "--port", str(port)]
            batch = 1 if name == "onnx-batch1" else max_batch
            cmd += ["--max-batch", str(batch)] if batch else []
            servers.append(Server(name, cmd, base, port))
        elif name in ("mlx-lm", "mlx-lm+openblas"):
            env = dict(base, LD_PRELOAD=OPENBLAS) if name.endswith("openblas") else base
            cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", model, "--port", str(port)]
            servers.append(Server(name, cmd, env, port))
        else:
            raise SystemExit(f"unknown server {name!r}")
    return servers


def one_request(url: str, prompt: str, max_tokens: int) -> Sample:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    s = Sample(time.perf_counter())
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=1800) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if data.get("usage"):
                    s.tokens = data["usage"]["completion_tokens"]
                for choice in data.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        s.first = s.first or now
                        s.chunks.append(now)
    except (httpx.HTTPError, ValueError, KeyError) as e:
        s.error = f"{type(e).__name__}: {e}"
    s.end = time.perf_counter()
    return s


def run_clients(server: Server, clients: int, max_tokens: int, round_: int) -> tuple[float, list[Sample]]:
    prompts = [f"Write a long story about {TOPICS[(i + round_) % len(TOPICS)]}." for i in range(clients)]
    barrier = threading.Barrier(clients)

    def go(prompt: str) -> Sample:
        barrier.wait()
        return one_request(server.url, prompt, max_tokens)

    with ThreadPoolExecutor(clients) as pool:
        samples = list(pool.map(go, prompts))
    bad = [s.error for s in samples if s.error or not s.tokens]
    if bad:
        raise RuntimeError(f"{server.name}: {len(bad)} failed requests, first: {bad[0]}")
    wall = max(s.end for s in samples) - min(s.sent for s in samples)
    return sum(s.tokens for s in samples) / wall, samples


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, round(q * (len(v) - 1)))] if v else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(prog=prog(__spec__.name), description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF folder both servers load")
    p.add_argument("--servers", default="qwen-mlx,mlx-lm+openblas,mlx-lm")
    p.add_argument("--clients", default="1,4,8,16")
    p.add_argument("--tokens", type=int, default=32, help="max_tokens of every request")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=None, help="qwen-mlx --max-batch (default: its own)")
    p.add_argument("--onnx", default=None, help="export-onnx folder of the same checkpoint (servers onnx*)")
    a = p.parse_args()
    counts = [int(c) for c in a.clients.split(",")]
    servers = start_servers(a.model, a.servers.split(","), a.max_batch, a.onnx)
    results: dict[tuple[str, int], list[tuple[float, list[Sample]]]] = {}
    loads = [os.getloadavg()[0]]
    try:
        for s in servers:
            run_clients(s, 1, 4, 0)  # warm-up
        for r in range(a.rounds):
            for n in counts:
                for s in round_order(servers, r):
                    results.setdefault((s.name, n), []).append(run_clients(s, n, a.tokens, r))
                    loads.append(os.getloadavg()[0])
                    print(f"round {r + 1} {s.name} {n} clients: {results[s.name, n][-1][0]:.2f} tok/s",
                          file=sys.stderr, flush=True)
    finally:
        for s in servers:
            s.stop()
    print(f"{a.rounds} rounds, {a.tokens} tokens per request, load average {min(loads):.1f}-{max(loads):.1f}\n")
    print("| server | clients | aggregate tok/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | x own 1-client |")
    print("| --- | --- | --- | --- | --- | --- |")
    for s in servers:
        single = statistics.median(t for t, _ in results.get((s.name, 1), [(float("nan"), [])]))
        for n in counts:
            runs = results[s.name, n]
            rate = statistics.median(t for t, _ in runs)
            samples = [x for _, xs in runs for x in xs]
            ttft = [x.first - x.sent for x in samples if x.first]
            itl = [1000 * (b - a) for x in samples for a, b in zip(x.chunks, x.chunks[1:])]
            print(f"| {s.name} | {n} | {rate:.2f} | {pct(ttft, .5):.2f} / {pct(ttft, .99):.2f} | "
                  f"{pct(itl, .5):.0f} / {pct(itl, .99):.0f} | {rate / single:.2f} |")


if __name__ == "__main__":
    main()
