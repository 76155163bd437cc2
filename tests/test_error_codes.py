"""The client knows every error code the server can send, so an error inside a stream (which has no HTTP status)
raises the same exception class as the same error in a plain answer."""

from __future__ import annotations

import pytest

from clients import errors
from server.errors import STATUS_BY_CODE


@pytest.mark.parametrize("code", sorted(set(STATUS_BY_CODE) - {"cancelled"}))  # nobody reads a cancelled answer
def test_streamed_error_gets_the_class_of_its_status(code):
    status = STATUS_BY_CODE[code]
    body = {"message": "m", "type": "t", "param": None, "code": code}
    in_stream = errors.error_from_body(body)
    assert in_stream.status is None
    expected = errors._BY_STATUS.get(status) or (errors.ServerError if status >= 500 else errors.FamError)
    assert isinstance(in_stream, expected), (code, type(in_stream), expected)
