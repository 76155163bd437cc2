"""Mapping server error bodies and statuses to exception classes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from clients import errors
from clients.errors import error_from_body, error_from_response, parse_retry_after


def error_body(code: str, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json=error_body(code, message), headers=headers)


CASES = [
    (400, "invalid_body", errors.BadRequestError),
    (422, "invalid_value", errors.BadRequestError),
    (401, "unauthorized", errors.AuthenticationError),
    (404, "session_not_found", errors.NotFoundError),
    (413, "payload_too_large", errors.PayloadTooLargeError),
    (429, "too_many_sessions", errors.RateLimitError),
    (429, "queue_full", errors.RateLimitError),
    (422, "invalid_snapshot", errors.InvalidSnapshotError),
    (422, "pdf_encrypted", errors.PDFError),
    (422, "pdf_invalid", errors.PDFError),
    (422, "pdf_no_text", errors.PDFError),
    (500, "server_error", errors.ServerError),
    (503, "model_loading", errors.ServiceUnavailableError),
]


@pytest.mark.parametrize(("status", "code", "cls"), CASES)
def test_each_server_code_maps_to_its_class(status: int, code: str, cls: type[errors.FamError]) -> None:
    exc = error_from_response(error(status, code, "it went wrong"))
    assert type(exc) is cls
    assert (exc.status, exc.code, exc.message) == (status, code, "it went wrong")
    assert str(exc) == f"it went wrong ({code})"


def test_all_fields_are_kept() -> None:
    body = error_body("invalid_value", "temperature must be >= 0", param="temperature")
    exc = error_from_response(httpx.Response(422, json=body))
    assert (exc.type, exc.param) == ("invalid_request_error", "temperature")


def test_specific_classes_are_caught_by_their_family() -> None:
    assert issubclass(errors.PDFError, errors.BadRequestError)
    assert issubclass(errors.ServiceUnavailableError, errors.ServerError)
    assert issubclass(errors.APITimeoutError, errors.APIConnectionError)
    assert all(issubclass(cls, errors.FamError) for _, _, cls in CASES)


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (404, errors.NotFoundError),
        (409, errors.FamError),
        (502, errors.ServerError),
        (418, errors.FamError),
    ],
)
def test_unknown_code_falls_back_to_the_status(status: int, cls: type[errors.FamError]) -> None:
    exc = error_from_response(error(status, "something_new", "new failure"))
    assert type(exc) is cls
    assert exc.code == "something_new"


def test_body_that_is_not_an_error_object_still_gives_a_useful_message() -> None:
    exc = error_from_response(httpx.Response(502, text="<html>Bad gateway</html>"))
    assert type(exc) is errors.ServerError
    assert exc.code is None
    assert exc.message == "HTTP 502 Bad Gateway: <html>Bad gateway</html>"
    assert str(exc) == exc.message


def test_rate_limit_error_carries_retry_after() -> None:
    exc = error_from_response(error(429, "queue_full", "queue is full", headers={"Retry-After": "3"}))
    assert isinstance(exc, errors.RateLimitError)
    assert exc.retry_after == 3.0


def test_error_inside_a_stream_has_no_status() -> None:
    exc = error_from_body({"message": "CUDA out of memory", "type": "server_error", "code": "server_error"})
    assert type(exc) is errors.ServerError
    assert exc.status is None


def test_parse_retry_after() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.25") == 0.25
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    in_ten = format_datetime(datetime.now(UTC) + timedelta(seconds=10), usegmt=True)
    assert 8.0 <= parse_retry_after(in_ten) <= 10.0
    past = format_datetime(datetime.now(UTC) - timedelta(seconds=10), usegmt=True)
    assert parse_retry_after(past) == 0.0
