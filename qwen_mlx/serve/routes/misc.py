"""The server's own endpoints: `/health` (for load balancers), `/` (the chat page) and `/v1/models`."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse

from ..core import ServingDep, guarded

STATIC = Path(__file__).resolve().parent.parent / "static"

router = APIRouter()


@router.get("/health")
async def health(serving: ServingDep) -> JSONResponse:
    # No key: load balancers probe it, and it tells only the load and the model's name.
    load = serving.engine.load()
    if serving.engine.closing:
        return JSONResponse({"status": "shutting down", **load}, status_code=503)
    return JSONResponse({"status": "ok", "model": serving.config.model_id, **load})


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    # The page is static (no model access); its API calls carry the key the user types in.
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))


@router.get("/v1/models", dependencies=guarded)
async def models(serving: ServingDep) -> dict:
    return {"object": "list", "data": [{"id": serving.config.model_id, "object": "model", "created": 0,
                                        "owned_by": "qwen-mlx", "max_model_len": serving.context}]}
