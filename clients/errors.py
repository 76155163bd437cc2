"""Exceptions raised by the client, mirroring the server's error bodies.

Every server error, whether an HTTP 4xx/5xx answer or an error event inside a stream, has the body
``{"error": {"message", "type", "param", "code"}}``. The ``code`` picks the exception class; the HTTP status
is the fallback for bodies without a known code (e.g. an HTML page from a proxy in front of the server).

    FamError
    ├── BadRequestError          400/422 invalid_body, invalid_value
    │   ├── InvalidSnapshotError 422 invalid_snapshot
    │   └── PDFError             422 pdf_encrypted, pdf_invalid, pdf_no_text
    ├── AuthenticationError      401 unauthorized
    ├── NotFoundError            404 session_not_found
    ├── PayloadTooLargeError     413 payload_too_large
    ├── RateLimitError           429 queue_full, too_many_sessions (has retry_after)
    ├── ServerError              500 server_error, 507 store_full (and any other 5xx)
    │   └── ServiceUnavailableError  503 model_loading, shutting_down, session_busy, lease_lost,
    │                                store_unavailable (the client retries these)
    ├── APIConnectionError       no HTTP answer at all (refused, reset, DNS)
    │   └── APITimeoutError
    └── ProtocolError            the answer broke the API contract (bad JSON, stream cut before [DONE])
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx


class FamError(Exception):
    """Base class. ``status`` is the HTTP status, or None when the error came inside a stream or there was
    no HTTP answer; ``code``/``type``/``param`` are the server's fields (None when it sent none)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        type: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.type = type
        self.param = param

    def __str__(self) -> str:
        return f"{self.message} ({self.code})" if self.code else self.message


class BadRequestError(FamError):
    """The request was malformed or had an invalid value (400/422)."""


class InvalidSnapshotError(BadRequestError):
    """The bytes given to ``import_state`` are not a snapshot this server can load."""


class PDFError(BadRequestError):
    """The uploaded PDF is encrypted, unreadable, or has no extractable text."""


class AuthenticationError(FamError):
    """Missing or wrong API key."""


class NotFoundError(FamError):
    """The session does not exist (or no longer does)."""


class PayloadTooLargeError(FamError):
    """The upload or prompt exceeds the server's size limit."""


class RateLimitError(FamError):
    """The server's queue is full, or it holds its maximum of sessions; ``retry_after`` is the server's hint in
    seconds (None when it gave none)."""

    def __init__(self, message: str, *, retry_after: float | None = None, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.retry_after = retry_after


class ServerError(FamError):
    """The server failed (5xx)."""


class ServiceUnavailableError(ServerError):
    """The server is up but not ready, e.g. still loading the model (503)."""


class APIConnectionError(FamError):
    """No HTTP answer: the server could not be reached or the connection broke. ``url`` is the server."""

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = url


class APITimeoutError(APIConnectionError):
    """The server did not answer within the client's timeout."""


class ProtocolError(FamError):
    """The server's answer did not follow the API: unparsable JSON, missing fields, or a stream that ended
    before ``data: [DONE]``."""


_BY_CODE: dict[str, type[FamError]] = {
    "invalid_body": BadRequestError,
    "invalid_value": BadRequestError,
    "invalid_snapshot": InvalidSnapshotError,
    "pdf_encrypted": PDFError,
    "pdf_invalid": PDFError,
    "pdf_no_text": PDFError,
    "unauthorized": AuthenticationError,
    "session_not_found": NotFoundError,
    "payload_too_large": PayloadTooLargeError,
    "queue_full": RateLimitError,
    "server_error": ServerError,
    "model_loading": ServiceUnavailableError,
    # the rest of the server's codes, so that an error inside a stream (no HTTP status) gets the same class
    "context_length_exceeded": BadRequestError,
    "idempotency_key_reused": BadRequestError,
    "unsupported_media_type": BadRequestError,
    "not_found": NotFoundError,
    "method_not_allowed": BadRequestError,
    "too_many_sessions": RateLimitError,
    "shutting_down": ServiceUnavailableError,
    "session_busy": ServiceUnavailableError,
    "lease_lost": ServiceUnavailableError,
    "store_unavailable": ServiceUnavailableError,
    "store_full": ServerError,
}

_BY_STATUS: dict[int, type[FamError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    422: BadRequestError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds (``"2"``, also ``"0.5"``) or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def error_from_body(
    error: Mapping[str, Any], *, status: int | None = None, retry_after: float | None = None
) -> FamError:
    """The exception for a server error object (the value of the ``"error"`` key)."""
    code = error.get("code")
    cls = _BY_CODE.get(code) if isinstance(code, str) else None
    if cls is None:
        cls = _BY_STATUS.get(status or 0) or (ServerError if status and status >= 500 else FamError)
    fields: dict[str, Any] = {
        "status": status,
        "code": code if isinstance(code, str) else None,
        "type": error.get("type"),
        "param": error.get("param"),
    }
    if cls is RateLimitError:
        fields["retry_after"] = retry_after
    return cls(str(error.get("message") or f"HTTP {status}"), **fields)


def error_from_response(response: httpx.Response) -> FamError:
    """The exception for an unsuccessful HTTP answer. The body must have been read."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        snippet = response.text.strip()[:200]
        error = {"message": f"HTTP {response.status_code} {response.reason_phrase}: {snippet}".rstrip(": ")}
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    return error_from_body(error, status=response.status_code, retry_after=retry_after)
