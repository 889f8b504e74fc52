"""`GET /metrics`: the app's Prometheus registry (serve/metrics.py) in the text exposition format.

No API key, as vLLM's and llama.cpp's /metrics and this server's /health: it tells counts, token totals,
latencies and the load, never a prompt or a reply, and Prometheus scrapes it without the clients' key.
"""

from __future__ import annotations

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(http: HTTPRequest) -> Response:
    return Response(http.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
