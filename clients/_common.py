"""What :class:`~clients.client.Client` and :class:`~clients.client.AsyncClient` share: configuration, the
description of each request, and the decoding of streamed events. Nothing here does I/O, so the two clients
differ only in how they send, sleep and iterate."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from clients.errors import APIConnectionError, APITimeoutError, ProtocolError, error_from_body
from clients.retry import UNSENT_ERRORS, Retry
from clients.sse import ServerSentEvent
from clients.types import IngestProgress, Sampling, Session, parse

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# Generous read timeout: a non-streaming completion sends nothing until the whole answer is generated.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)
DEFAULT_MAX_RETRIES = 2

INGEST_CONTENT_TYPES = {".pdf": "application/pdf", ".txt": "text/plain", ".md": "text/markdown"}

ProgressCallback = Callable[[IngestProgress], None]


@dataclass(frozen=True)
class Call:
    """One API request, rebuilt from this description on every attempt."""

    method: str
    path: str
    retry: Retry
    json: Any = None
    content: bytes | None = None
    files: Mapping[str, tuple[str, bytes, str]] | None = None
    params: Mapping[str, str] | None = None
    headers: Mapping[str, str] | None = None

    def build(self, http: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        return http.build_request(
            self.method,
            self.path,
            json=self.json,
            content=self.content,
            files=self.files,
            params=self.params,
            headers=self.headers,
        )


class ClientBase:
    """Settings common to both clients. ``base_url`` and ``api_key`` default to the ``FAM_SERVER`` and
    ``FAM_API_KEY`` environment variables."""

    def __init__(self, base_url: str | None, api_key: str | None, max_retries: int) -> None:
        self.base_url = (base_url or os.environ.get("FAM_SERVER") or DEFAULT_BASE_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("FAM_API_KEY") or None
        self.max_retries = max_retries
        self._model: str | None = None  # the server's model id, looked up once when a call needs it

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _transport_error(self, exc: httpx.TransportError) -> APIConnectionError:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, httpx.TimeoutException):
            return APITimeoutError(f"timed out waiting for {self.base_url} ({reason})", url=self.base_url)
        if isinstance(exc, UNSENT_ERRORS):
            return APIConnectionError(f"cannot connect to {self.base_url} ({reason})", url=self.base_url)
        return APIConnectionError(f"connection to {self.base_url} failed ({reason})", url=self.base_url)


def session_path(session_id: str, *rest: str) -> str:
    return "/".join(["/v1/sessions", quote(session_id, safe=""), *rest])


def create_session_call(mode: str | None, metadata: Mapping[str, Any] | None) -> Call:
    body: dict[str, Any] = {}
    if mode is not None:
        body["mode"] = mode
    if metadata is not None:
        body["metadata"] = dict(metadata)
    return Call("POST", "/v1/sessions", Retry.IF_UNSENT, json=body)


def ingest_content_type(path: Path) -> str:
    """The upload content type for ``path``, by suffix; ValueError for a type the server does not take."""
    try:
        return INGEST_CONTENT_TYPES[path.suffix.lower()]
    except KeyError:
        expected = ", ".join(INGEST_CONTENT_TYPES)
        raise ValueError(
            f"unsupported file type {path.suffix or path.name!r} (expected {expected})"
        ) from None


def ingest_text_call(session_id: str, text: str) -> Call:
    """A streaming text ingest. The Idempotency-Key is made here, once per ingest, and sent unchanged on
    every retry of this call: that is what makes retrying an ingest safe."""
    return Call(
        "POST",
        session_path(session_id, "ingest"),
        Retry.IDEMPOTENT,
        json={"text": text, "stream": True},
        headers={"Idempotency-Key": str(uuid.uuid4())},
    )


def ingest_file_call(session_id: str, name: str, data: bytes, content_type: str) -> Call:
    """A streaming multipart upload of a file (field ``file``), idempotent like :func:`ingest_text_call`."""
    return Call(
        "POST",
        session_path(session_id, "ingest"),
        Retry.IDEMPOTENT,
        files={"file": (name, data, content_type)},
        params={"stream": "true"},
        headers={"Idempotency-Key": str(uuid.uuid4())},
    )


def generation_call(
    path: str,
    body: Mapping[str, Any],
    *,
    model: str,
    session_id: str | None,
    commit: bool,
    stream: bool,
    sampling: Sampling,
) -> Call:
    """A completion or chat completion. Committing calls change the session, so they are never retried."""
    payload: dict[str, Any] = {**body, **sampling, "model": model}
    if session_id is not None:
        payload["session_id"] = session_id
    if commit:
        payload["commit"] = True
    if stream:
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
    return Call("POST", path, Retry.NEVER if commit else Retry.IDEMPOTENT, json=payload)


def event_payload(event: ServerSentEvent) -> dict[str, Any] | None:
    """The JSON object carried by a stream event, or None for the final ``[DONE]``. An error event raises
    the matching :class:`~clients.errors.FamError` (with ``status`` None: the HTTP status was 200)."""
    if event.data == "[DONE]":
        return None
    try:
        payload = json.loads(event.data)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"invalid JSON in stream event: {event.data[:200]!r}") from exc
    if not isinstance(payload, dict):
        raise ProtocolError(f"stream event is not a JSON object: {event.data[:200]!r}")
    if isinstance(payload.get("error"), dict):
        raise error_from_body(payload["error"])
    return payload


def ingest_event(payload: Mapping[str, Any], progress: ProgressCallback | None) -> Session | None:
    """Handle one ingest stream event: report progress, or return the final session object."""
    kind = payload.get("object")
    if kind == "ingest.progress" and progress is not None:
        progress(parse(IngestProgress.from_dict, payload, "ingest progress"))
    if kind == "session":
        return parse(Session.from_dict, payload, "session")
    return None
