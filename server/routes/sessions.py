"""Session routes: create, list, get, delete, ingest, fork, export and import.

Ingest takes JSON `{"text": ...}`, a multipart upload with a `file` field (PDF, text, markdown), or a raw
PDF/text body. With `stream` (JSON field, form field or `?stream=true`) it answers with SSE progress events.
An `Idempotency-Key` header makes a retried ingest safe (see `server.engine.jobs.IngestJob`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from server import openapi
from server.deps import EngineDep, OwnerDep, sse_response, wait_for
from server.engine import Failed, Finished, IngestJob, Progress, TokenizedDocument
from server.errors import APIError, error_body, from_exception
from server.protocol import (
    CreateSession,
    IngestProgressEvent,
    IngestText,
    SessionDeleted,
    SessionList,
    SessionObject,
    session_object,
)

router = APIRouter(prefix="/v1/sessions", tags=["sessions"], responses=openapi.ERRORS)
INGEST_BODY = openapi.request_body(
    "JSON, a multipart upload with a `file` field (and an optional `stream` field), or a raw PDF / text body",
    {"application/json": {"schema": openapi.ref(IngestText, "validation")},
     "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
         "file": {"type": "string", "format": "binary"}, "stream": {"type": "string", "enum": ["true", "false"]}}}},
     "application/pdf": {"schema": {"type": "string", "format": "binary"}},
     "text/plain": {"schema": {"type": "string"}},
     "text/markdown": {"schema": {"type": "string"}}})
SNAPSHOT_BODY = openapi.request_body("a snapshot from `GET /v1/sessions/{id}/state`",
                                     openapi.binary("the snapshot bytes"))


@router.post("", status_code=201, response_model=SessionObject)
async def create_session(engine: EngineDep, owner: OwnerDep,
                         body: Annotated[CreateSession | None, Body()] = None) -> SessionObject:
    body = body or CreateSession()
    return session_object(await engine.create_session(owner, body.mode, body.metadata))


@router.get("", response_model=SessionList)
async def list_sessions(engine: EngineDep, owner: OwnerDep) -> SessionList:
    return SessionList(data=[session_object(s) for s in engine.list_sessions(owner)])


@router.post("/import", status_code=201, response_model=SessionObject, openapi_extra=SNAPSHOT_BODY)
async def import_session(request: Request, engine: EngineDep, owner: OwnerDep) -> SessionObject:
    """The raw body is a snapshot from `GET /v1/sessions/{id}/state` (signed by a server with this secret)."""
    return session_object(await engine.import_snapshot(owner, await request.body()))


@router.get("/{session_id}", response_model=SessionObject)
async def get_session(session_id: str, engine: EngineDep, owner: OwnerDep) -> SessionObject:
    return session_object(engine.get_session(owner, session_id))


@router.delete("/{session_id}", response_model=SessionDeleted)
async def delete_session(session_id: str, engine: EngineDep, owner: OwnerDep) -> SessionDeleted:
    await engine.delete_session(owner, session_id)
    return SessionDeleted(id=session_id)


@router.post("/{session_id}/fork", status_code=201, response_model=SessionObject)
async def fork_session(session_id: str, request: Request, engine: EngineDep, owner: OwnerDep) -> SessionObject:
    return session_object(await wait_for(request, engine.fork(owner, session_id)))


@router.get("/{session_id}/state", response_class=Response,
            responses={200: {"content": openapi.binary("the session's snapshot (FAMSNAP1, signed)")}})
async def export_session(session_id: str, request: Request, engine: EngineDep, owner: OwnerDep) -> Response:
    data = await wait_for(request, engine.export(owner, session_id))
    return Response(data, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{session_id}.famsnap"'})


@router.post("/{session_id}/ingest", response_model=SessionObject, openapi_extra=INGEST_BODY, responses={200: {
    "description": "the session after the ingest; with `stream`, progress events, then the session, then `[DONE]`",
    "content": openapi.sse(IngestProgressEvent, SessionObject, description="ingest progress")}})
async def ingest(session_id: str, request: Request, engine: EngineDep, owner: OwnerDep,
                 stream: Annotated[bool, Query()] = False,
                 idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None) -> Response:
    engine.get_session(owner, session_id)  # 404 before reading a large body
    doc, stream_asked = await _read_document(request, engine)
    job = engine.ingest(owner, session_id, doc, idempotency_key)
    if stream or stream_asked:
        return sse_response(_ingest_events(job), job)
    result = session_object(await wait_for(request, job))
    return JSONResponse(result.model_dump(mode="json"),
                        headers={"Idempotent-Replayed": "true"} if job.replayed else None)


async def _read_document(request: Request, engine: EngineDep) -> tuple[TokenizedDocument, bool]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        async with request.form(max_files=1) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise APIError("invalid_value", "a multipart ingest needs a `file` field", param="file")
            data = await upload.read()
            doc = await engine.prepare_file(data, upload.content_type, upload.filename)
            return doc, str(form.get("stream", "")).lower() in ("1", "true")
    if ctype in ("application/json", ""):
        try:
            body = IngestText.model_validate_json(await request.body())
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from e
        return await engine.prepare_text(body.text), body.stream
    return await engine.prepare_file(await request.body(), ctype, None), False


async def _ingest_events(job: IngestJob) -> AsyncIterator[dict[str, Any]]:
    async for event in job.events():
        if isinstance(event, Progress):
            yield IngestProgressEvent(tokens_done=event.tokens_done, tokens_total=event.tokens_total,
                                      pages_done=event.pages_done, pages_total=event.pages_total).model_dump()
        elif isinstance(event, Finished):
            yield session_object(event.result).model_dump()
        elif isinstance(event, Failed):
            code, message, param, _ = from_exception(event.error)
            yield error_body(code, message, param)
