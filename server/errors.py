"""Every error the API returns, in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.

Engine exceptions, HTTP-level refusals, request validation errors, unknown routes and unexpected exceptions
are all turned into that shape here, with the status picked from one table by the error's string code.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from server.engine import EngineError

log = logging.getLogger(__name__)

STATUS_BY_CODE = {
    "invalid_body": 400,
    "invalid_value": 400,
    "context_length_exceeded": 400,
    "unauthorized": 401,
    "session_not_found": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "idempotency_key_reused": 422,
    "invalid_snapshot": 422,
    "pdf_encrypted": 422,
    "pdf_invalid": 422,
    "pdf_no_text": 422,
    "too_many_sessions": 429,
    "queue_full": 429,
    "cancelled": 499,  # the client went away; nobody reads this answer
    "server_error": 500,
    "model_loading": 503,
    "shutting_down": 503,
    "session_busy": 503,  # another replica works on the session; Retry-After
    "lease_lost": 503,  # this replica lost the session's lease mid-request; the session is as of its last commit
    "store_unavailable": 503,  # Redis cannot be reached
    "store_full": 507,  # Redis is at maxmemory (noeviction): nothing committed is lost
}
BODY_SHAPE_ERRORS = ("missing", "model_attributes_type", "model_type", "dict_type")
CODE_BY_HTTP_STATUS = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                       415: "unsupported_media_type"}


class APIError(Exception):
    """An error raised by the HTTP layer itself (authentication, body limits, model still loading)."""

    def __init__(self, code: str, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code, self.message, self.param, self.headers = code, message, param, headers or {}


def error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status == 503:
        return "service_unavailable_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    status = STATUS_BY_CODE.get(code, 500)
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_response(code: str, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, param), status_code=STATUS_BY_CODE.get(code, 500),
                        headers=headers)


def from_exception(exc: Exception) -> tuple[str, str, str | None, dict[str, str]]:
    """(code, message, param, headers) for any exception; used for responses and for errors inside streams."""
    if isinstance(exc, EngineError):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else {}
        return exc.code, exc.message, exc.param, headers
    if isinstance(exc, APIError):
        return exc.code, exc.message, exc.param, exc.headers
    if isinstance(exc, RequestValidationError):
        return validation_error(exc)
    if isinstance(exc, HTTPException):
        code = CODE_BY_HTTP_STATUS.get(exc.status_code, "invalid_body" if exc.status_code < 500 else "server_error")
        return code, str(exc.detail), None, dict(exc.headers or {})
    log.error("unexpected error", exc_info=exc)
    return "server_error", f"internal error ({type(exc).__name__})", None, {}


def validation_error(exc: RequestValidationError) -> tuple[str, str, str | None, dict[str, str]]:
    """Pydantic's errors -> invalid_body (not JSON, or not an object) or invalid_value (a field is wrong)."""
    errors = list(exc.errors())
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(p) for p in first.get("loc", ()) if not _union_member(str(p))]
    loc = loc[1:] if loc and loc[0] in ("body", "query", "header", "path") else loc
    kind, msg = first.get("type", ""), first.get("msg", "")
    if kind == "json_invalid":
        return "invalid_body", f"the request body is not valid JSON: {msg}", None, {}
    if not loc and kind in BODY_SHAPE_ERRORS:
        return "invalid_body", "the request body must be a JSON object", None, {}
    param = ".".join(loc) or None
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return "invalid_value", f"{param}: {msg}{more}" if param else f"{msg}{more}", param, {}


def _union_member(part: str) -> bool:
    """Pydantic names the member of a union that failed ("str", "list[int]") in the error location."""
    return "[" in part or part in ("str", "int", "float", "bool") or part.startswith("function-")


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    code, message, param, headers = from_exception(exc)
    if code in ("not_found", "method_not_allowed") and isinstance(exc, HTTPException):
        message = f"{message}: {request.method} {request.url.path}"
    return error_response(code, message, param, headers)


def install(app: FastAPI) -> None:
    for exc_class in (EngineError, APIError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(exc_class, _handle)
