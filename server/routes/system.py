"""Health, models, tokenizer and metrics routes, and the web page slot at `/`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.deps import EngineDep
from server.errors import APIError
from server.protocol import Detokenize, Tokenize

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter()


@router.get("/health", tags=["system"])
async def health(request: Request) -> JSONResponse:
    """Public. 503 while the model loads (or if it failed to), then 200."""
    state = request.app.state
    if state.engine is not None:
        return JSONResponse({"status": "ok", "model": state.engine.model_name})
    if state.load_error:
        return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
    return JSONResponse({"status": "loading"}, status_code=503)


@router.get("/metrics", tags=["system"])
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", tags=["openai"])
async def models(request: Request, engine: EngineDep) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": engine.model_name, "object": "model",
                                        "created": request.app.state.started, "owned_by": "fam-server"}]}


@router.post("/tokenize", tags=["tokenizer"])
async def tokenize(body: Tokenize, engine: EngineDep) -> dict[str, Any]:
    """Tokens of `text` as a prompt (special-token strings count as special tokens)."""
    ids = await engine.tokenize(body.text)
    return {"tokens": ids, "count": len(ids)}


@router.post("/detokenize", tags=["tokenizer"])
async def detokenize(body: Detokenize, engine: EngineDep) -> dict[str, Any]:
    return {"text": await engine.detokenize(body.tokens)}


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The web page, once `server/static/index.html` exists."""
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        raise APIError("not_found", "no web page is installed on this server; the API is under /v1")
    return FileResponse(page)
