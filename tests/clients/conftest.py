"""The client and CLI tests run against the real fam-server app (the tiny chat model, on a loopback port).

The `server` fixture is that app behind a transport that records every request the client sends and can
answer the next ones from a script (refusals, resets, 429/503 sequences, broken or malformed answers) instead
of passing them on: only the failures a real server cannot be made to produce on demand are scripted. Clients
may use any base URL (`http://fam.test`); the transport delivers the requests to the app.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
from types import SimpleNamespace
from typing import Any

import anyio
import httpx
import pytest

from clients import client as client_module


class Server(httpx.BaseTransport, httpx.AsyncBaseTransport):
    def __init__(self, base_url: str) -> None:
        self.url = httpx.URL(base_url)
        self.requests: list[httpx.Request] = []
        # Answers (or exceptions to raise) for the next requests, before they reach the app.
        self.script: list[httpx.Response | Exception] = []
        self.script_by_path: dict[str, list[httpx.Response]] = {}  # the same, only for requests to that path
        self.http = httpx.Client(base_url=base_url, timeout=60)  # for the tests' own look-ups (not recorded)
        self._sync = httpx.HTTPTransport()
        self._async: dict[asyncio.AbstractEventLoop, httpx.AsyncHTTPTransport] = {}  # one per test event loop

    # -- the transport (sync and async)

    @property
    def transport(self) -> Server:
        return self

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        scripted = self._scripted(request)
        return scripted if scripted is not None else self._sync.handle_request(self._to_app(request))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        scripted = self._scripted(request)
        if scripted is not None:
            return scripted
        loop = asyncio.get_running_loop()
        forward = self._async.setdefault(loop, httpx.AsyncHTTPTransport())
        return await forward.handle_async_request(self._to_app(request))

    def _scripted(self, request: httpx.Request) -> httpx.Response | None:
        self.requests.append(request)
        by_path = self.script_by_path.get(request.url.path)
        if by_path:
            return by_path.pop(0)
        if not self.script:
            return None
        answer = self.script.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def _to_app(self, request: httpx.Request) -> httpx.Request:
        url = request.url.copy_with(scheme=self.url.scheme, host=self.url.host, port=self.url.port)
        return httpx.Request(request.method, url, headers=request.headers, content=request.content,
                             extensions=request.extensions)

    def close(self) -> None:
        """A client closing its transport leaves the app reachable for the next client of the test."""

    async def aclose(self) -> None:
        pass

    def shut(self) -> None:
        self.http.close()
        self._sync.close()

    # -- what the tests look at

    def paths(self) -> list[str]:
        return [f"{r.method} {r.url.path}" for r in self.requests]

    @property
    def model(self) -> str:
        return self.http.get("/v1/models").json()["data"][0]["id"]

    def new_session(self, mode: str | None = None, metadata: dict[str, Any] | None = None,
                    text: str | None = None) -> dict[str, Any]:
        """A session made directly on the app (not through the client under test), holding `text` if given."""
        body = {k: v for k, v in {"mode": mode, "metadata": metadata}.items() if v is not None}
        session = self.http.post("/v1/sessions", json=body).raise_for_status().json()
        if text is not None:
            session = self.http.post(f"/v1/sessions/{session['id']}/ingest", json={"text": text})
            session = session.raise_for_status().json()
        return session

    def session(self, session_id: str) -> dict[str, Any]:
        return self.http.get(f"/v1/sessions/{session_id}").raise_for_status().json()

    def sessions(self) -> dict[str, dict[str, Any]]:
        return {s["id"]: s for s in self.http.get("/v1/sessions").raise_for_status().json()["data"]}

    def greedy_chat(self, messages: list[dict[str, str]], **body: Any) -> str:
        """What the app answers (temperature 0) without the client, to compare the client's text with."""
        r = self.http.post("/v1/chat/completions", json={"messages": messages, "temperature": 0, **body})
        return r.raise_for_status().json()["choices"][0]["message"]["content"]

    # -- scripted answers

    @staticmethod
    def sse(*payloads: Any, done: bool = True) -> bytes:
        """An SSE body: one ``data:`` event per payload (JSON unless already a string), then ``[DONE]``."""
        events = [p if isinstance(p, str) else json.dumps(p, ensure_ascii=False) for p in payloads]
        if done:
            events.append("[DONE]")
        return "".join(f"data: {event}\n\n" for event in events).encode()

    @staticmethod
    def error_body(code: str, message: str, type_: str = "invalid_request_error",
                   param: str | None = None) -> dict:
        return {"error": {"message": message, "type": type_, "param": param, "code": code}}

    @classmethod
    def error(cls, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> httpx.Response:
        """An error answer in the server's shape."""
        kind = "server_error" if status >= 500 else "invalid_request_error"
        kind = "rate_limit_error" if status == 429 else kind
        return httpx.Response(status, json=cls.error_body(code, message, kind), headers=headers)

    @staticmethod
    def multipart_file(request: httpx.Request) -> tuple[str, str, str, bytes]:
        """(field name, filename, content type, bytes) of the single file part of a multipart request."""
        head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
        message = email.message_from_bytes(head + request.content, policy=email.policy.HTTP)
        (part,) = list(message.iter_parts())
        field = part.get_param("name", header="content-disposition")
        return field, part.get_filename(), part.get_content_type(), part.get_payload(decode=True)


@pytest.fixture
def server(live_server) -> Server:
    """A fresh app per test (its own sessions and data dir)."""
    s = Server(live_server())
    yield s
    s.shut()


@pytest.fixture
def keyed_server(live_server) -> Server:
    """An app that needs `Authorization: Bearer sk-right`."""
    s = Server(live_server(api_keys="sk-right"))
    s.http.headers["Authorization"] = "Bearer sk-right"
    yield s
    s.shut()


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Records the client's back-off waits instead of sleeping (sync and async clients). Only the client's
    module sees the stand-ins: the app's event loop (in another thread) still sleeps for real."""
    waits: list[float] = []

    async def async_sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(client_module, "time", SimpleNamespace(sleep=waits.append))
    monkeypatch.setattr(client_module, "anyio", SimpleNamespace(sleep=async_sleep, Path=anyio.Path))
    return waits
