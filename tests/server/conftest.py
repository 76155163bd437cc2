"""Server test fixtures: apps built in-process over the tiny chat model (`tiny_runtime`, in tests/conftest.py),
and helpers to read SSE bodies."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from clients.sse import iter_sse
from model import FamConfig, FamRuntime
from server.app import create_app
from server.settings import Settings


@pytest.fixture
def make_client(tmp_path: Path, tiny_runtime: FamRuntime) -> Iterator[Callable[..., TestClient]]:
    """make_client(runtime=None, **settings) -> a started TestClient over a fresh app (same data dir unless
    `data_dir` is given). Every client is shut down at the end of the test."""
    started: list[TestClient] = []

    def make(runtime: FamRuntime | None = None, **overrides: Any) -> TestClient:
        settings = Settings(**{"data_dir": tmp_path / "data", "secret": "test-secret", **overrides})
        client = TestClient(create_app(settings, runtime or tiny_runtime))
        client.__enter__()
        started.append(client)
        return client

    yield make
    for client in started:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


@pytest.fixture(scope="session")
def wide_block_runtime(tiny_chat_dir: Path) -> FamRuntime:
    """The tiny model with 512-token blocks: long prompts and documents in few steps."""
    return FamRuntime.load(tiny_chat_dir, fam=FamConfig(block_size=512, memory_blocks=1, fam_len=4),
                           dtype="float32", device="cpu")


def sse_events(text: str) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded ("[DONE]" stays a string), through the client's parser
    (the one SSE parser in Python here: it splits lines only where SSE does, never on U+2028)."""
    return [e.data if e.data == "[DONE]" else json.loads(e.data) for e in iter_sse([text])]


@pytest.fixture
def events() -> Callable[[str], list[Any]]:
    return sse_events


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    """The response is an error in OpenAI's shape with this status and code; returns the error object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"], body
    return body["error"]


@pytest.fixture
def error() -> Callable[..., dict[str, Any]]:
    return assert_error


def encrypted_pdf_bytes(data: bytes, user_password: str) -> bytes:
    """`data` encrypted with RC4-128 (pypdf needs no extra package for it)."""
    import io

    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


@pytest.fixture
def make_pdf(pdf_bytes) -> Callable[[list[str]], bytes]:
    return pdf_bytes


@pytest.fixture
def encrypt_pdf() -> Callable[[bytes, str], bytes]:
    return encrypted_pdf_bytes
