"""`GET /metrics`: the server's counters in Prometheus' text format (prometheus_client).

Each app has its own `CollectorRegistry` (on `app.state.metrics`), never the process-wide one, so several apps in
one process do not clash. What is measured, and where:
- HTTP requests by endpoint (the route's path; "other" for paths no route serves) and status: `CountRequests`,
  an ASGI middleware outside every other, so the body-size refusals and auth errors count too;
- per generation request: prompt, generated and prefix-cached tokens, time to first token, the gaps between
  tokens, and the time from submission to the last event, by `Metrics.watch`, which the serving core calls for
  each request it submits (`Serving.observe`) and which then sees that request's engine events on the engine's
  thread, as they happen (not when the event loop gets to them);
- running and waiting sequences, and requests cancelled because their client left: read from the engine
  (`Engine.load`, as /health does) when scraped.
Names follow vLLM's where one exists (`vllm:time_to_first_token_seconds` is `qwen_mlx_time_to_first_token_seconds`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..engine import Done, Failed, Token

# vLLM's buckets, with finer ones at the low end (a small model on one machine answers in milliseconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0)
PREFIX = "qwen_mlx_"


class Metrics:
    """One app's registry and the instruments in it."""

    def __init__(self, engine: Any):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(PREFIX + "http_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=registry)
        self.finished = Counter(PREFIX + "request_finished", "Generation requests finished, by finish reason "
                                "(stop, length, or error)", ["finished_reason"], registry=registry)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished requests",
                                     registry=registry)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens of finished requests",
                                         registry=registry)
        self.cached_tokens = Counter(PREFIX + "prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache "
                                     "(not prefilled again)", registry=registry)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "From submission to the first generated token",
                              buckets=TTFT_BUCKETS, registry=registry)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Between consecutive generated tokens",
                             buckets=ITL_BUCKETS, registry=registry)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "From submission to the end of the reply",
                             buckets=E2E_BUCKETS, registry=registry)
        registry.register(_Load(engine))

    def watch(self, _req: Any) -> Callable[[Any], None]:
        """An observer for one submitted request's events (called on the engine thread, in order)."""
        start = time.perf_counter()
        last: float | None = None

        def observe(event: Any) -> None:
            nonlocal last
            now = time.perf_counter()
            if isinstance(event, Token):
                (self.ttft if last is None else self.itl).observe(now - (start if last is None else last))
                last = now
            elif isinstance(event, Done):
                if last is None:  # the first token sampled was the end of the reply
                    self.ttft.observe(now - start)
                self.e2e.observe(now - start)
                self.prompt_tokens.inc(event.prompt_tokens)
                self.generation_tokens.inc(event.completion_tokens)
                self.cached_tokens.inc(event.cached_tokens)
                self.finished.labels(event.finish_reason).inc()
            elif isinstance(event, Failed):
                self.finished.labels("error").inc()

        return observe

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Load:
    """The engine's load, read when scraped."""

    def __init__(self, engine: Any):
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        load = self.engine.load()
        yield GaugeMetricFamily(PREFIX + "num_requests_running", "Sequences in the running batch (prefilling or "
                                "decoding)", value=load["running"])
        yield GaugeMetricFamily(PREFIX + "num_requests_waiting", "Requests queued for a batch slot",
                                value=load["waiting"])
        yield GaugeMetricFamily(PREFIX + "max_batch", "Batch slots", value=load["max_batch"])
        yield CounterMetricFamily(PREFIX + "requests_cancelled", "Requests stopped because their client left",
                                  value=load["cancelled"])


class CountRequests:
    """ASGI middleware: counts each HTTP request by the path of the route that served it (or, answered before
    routing, the one of `paths` it asked for), and its status."""

    def __init__(self, app: Any, metrics: Metrics, paths: Iterable[str] = ()):
        self.app, self.metrics, self.paths = app, metrics, frozenset(paths)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        counted = False

        def count(status: int) -> None:
            nonlocal counted
            counted = True
            self.metrics.requests.labels(self._endpoint(scope), str(status)).inc()

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":  # counted before the client can see the answer
                count(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if not counted:  # the app raised before answering: the client gets a 500
                count(500)

    def _endpoint(self, scope: dict) -> str:
        path = getattr(scope.get("route"), "path", None)  # the route's template, once routed
        if path is None and scope.get("path") in self.paths:  # answered before routing (BodyLimit's 413)
            path = scope["path"]
        return path or "other"  # no route serves it: one label for every such path
