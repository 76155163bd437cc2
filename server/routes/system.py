"""Health, models, tokenizer and metrics routes, and the web page slot at `/`."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import openapi
from server.deps import EngineDep
from server.errors import APIError
from server.protocol import Detokenize, DetokenizeResponse, Health, ModelCard, ModelList, Tokenize, TokenizeResponse

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter()


@router.get("/health", tags=["system"], response_model=Health, response_model_exclude_none=True,
            responses={503: {"model": Health, "description": "the model is loading, or failed to load"}})
async def health(request: Request) -> JSONResponse:
    """Public. 503 while the model loads (or if it failed to), then 200."""
    state = request.app.state
    if state.engine is not None:
        return _health(Health(status="ok", model=state.engine.model_name), 200)
    if state.load_error:
        return _health(Health(status="error", error=state.load_error), 503)
    return _health(Health(status="loading"), 503)


def _health(body: Health, status: int) -> JSONResponse:
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status)


@router.get("/metrics", tags=["system"], response_class=Response, responses={200: {
    "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
    "description": "Prometheus text format"}})
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", tags=["openai"], response_model=ModelList, responses=openapi.ERRORS)
async def models(request: Request, engine: EngineDep) -> ModelList:
    return ModelList(data=[ModelCard(id=engine.model_name, created=request.app.state.started, owned_by="fam-server")])


@router.post("/tokenize", tags=["tokenizer"], response_model=TokenizeResponse, responses=openapi.ERRORS)
async def tokenize(body: Tokenize, engine: EngineDep) -> TokenizeResponse:
    """Tokens of `text` as a prompt (special-token strings count as special tokens)."""
    ids = await engine.tokenize(body.text)
    return TokenizeResponse(tokens=ids, count=len(ids))


@router.post("/detokenize", tags=["tokenizer"], response_model=DetokenizeResponse, responses=openapi.ERRORS)
async def detokenize(body: Detokenize, engine: EngineDep) -> DetokenizeResponse:
    return DetokenizeResponse(text=await engine.detokenize(body.tokens))


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The web page (`server/static/index.html`)."""
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        raise APIError("not_found", "no web page is installed on this server; the API is under /v1")
    return FileResponse(page)
