"""An in-memory emulation of the fam-server HTTP API for ``httpx.MockTransport``, and fixtures around it.

The fake follows the API contract the real server implements (paths, bodies, status codes, SSE framing), so
client and CLI tests exercise the same requests and answers they will meet in production, without a model.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest

ANSWER_PIECES = ["Paris", " is", " the", " capital", "."]
MODEL_ID = "smollm2-135m-fam"


class FakeServer:
    """Routes requests like the real server, keeps sessions in a dict, and records every request."""

    @staticmethod
    def sse(*payloads: Any, done: bool = True) -> bytes:
        """An SSE body: one ``data:`` event per payload (JSON unless already a string), then ``[DONE]``."""
        events = [p if isinstance(p, str) else json.dumps(p, ensure_ascii=False) for p in payloads]
        if done:
            events.append("[DONE]")
        return "".join(f"data: {event}\n\n" for event in events).encode()

    @staticmethod
    def error_body(
        code: str, message: str, type_: str = "invalid_request_error", param: str | None = None
    ) -> dict:
        return {"error": {"message": message, "type": type_, "param": param, "code": code}}

    @classmethod
    def error(
        cls, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        """An error answer shaped like the server's."""
        kind = "server_error" if status >= 500 else "invalid_request_error"
        kind = "authentication_error" if status == 401 else kind
        return httpx.Response(status, json=cls.error_body(code, message, kind), headers=headers)

    @staticmethod
    def multipart_file(request: httpx.Request) -> tuple[str, str, str, bytes]:
        """(field name, filename, content type, bytes) of the single file part of a multipart request."""
        head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
        message = email.message_from_bytes(head + request.content, policy=email.policy.HTTP)
        (part,) = list(message.iter_parts())
        field = part.get_param("name", header="content-disposition")
        return field, part.get_filename(), part.get_content_type(), part.get_payload(decode=True)

    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.sessions: dict[str, dict[str, Any]] = {}
        self.requests: list[httpx.Request] = []
        self.ingests: dict[tuple[str, str], dict[str, Any]] = {}  # (session, Idempotency-Key) -> result
        self.commits: list[str] = []  # user messages committed to sessions
        self.ingest_error: str | None = None  # set to a code to fail ingests mid-stream
        self.generation_errors: list[httpx.Response] = []  # the next completions on a session answer these
        # Answers (or exceptions to raise) for the next requests, before normal routing: failures to retry.
        self.script: list[httpx.Response | Exception] = []
        self.routes: list[tuple[str, re.Pattern[str], Callable[..., httpx.Response]]] = [
            ("POST", re.compile(r"/v1/sessions"), self.create),
            ("GET", re.compile(r"/v1/sessions"), self.list),
            ("POST", re.compile(r"/v1/sessions/import"), self.import_state),
            ("GET", re.compile(r"/v1/sessions/([^/]+)"), self.get),
            ("DELETE", re.compile(r"/v1/sessions/([^/]+)"), self.delete),
            ("POST", re.compile(r"/v1/sessions/([^/]+)/ingest"), self.ingest),
            ("POST", re.compile(r"/v1/sessions/([^/]+)/fork"), self.fork),
            ("GET", re.compile(r"/v1/sessions/([^/]+)/state"), self.export_state),
            ("POST", re.compile(r"/v1/chat/completions"), self.chat),
            ("POST", re.compile(r"/v1/completions"), self.complete),
            ("GET", re.compile(r"/v1/models"), self.models),
            ("POST", re.compile(r"/tokenize"), self.tokenize),
            ("POST", re.compile(r"/detokenize"), self.detokenize),
            ("GET", re.compile(r"/health"), lambda request: httpx.Response(200, json={"status": "ok"})),
            ("GET", re.compile(r"/metrics"), lambda request: httpx.Response(200, text="fam_sessions 1\n")),
        ]

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)

    def paths(self) -> list[str]:
        return [f"{r.method} {r.url.path}" for r in self.requests]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.script:
            answer = self.script.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return self.error(401, "unauthorized", "invalid API key")
        path = request.url.path
        for method, pattern, handler in self.routes:
            match = pattern.fullmatch(path)
            if match and method == request.method:
                return handler(request, *match.groups())
        return self.error(404, "not_found", f"no route {request.method} {path}")

    # -- sessions

    def new_session(self, mode: str = "fam", metadata: dict[str, Any] | None = None, tokens: int = 0) -> dict:
        session = {
            "id": f"sess_{uuid.uuid4().hex[:12]}",
            "object": "session",
            "mode": mode,
            "model": MODEL_ID,
            "tokens": tokens,
            "state_bytes": 4096 + 2 * tokens,
            "created": 1_767_225_600,
            "metadata": metadata or {},
        }
        self.sessions[session["id"]] = session
        return session

    def lookup(self, session_id: str) -> dict[str, Any] | httpx.Response:
        if session_id not in self.sessions:
            return self.error(404, "session_not_found", f"session {session_id} not found")
        return self.sessions[session_id]

    def create(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content or b"{}")
        return httpx.Response(201, json=self.new_session(body.get("mode", "fam"), body.get("metadata")))

    def list(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"object": "list", "data": list(self.sessions.values())})

    def get(self, request: httpx.Request, session_id: str) -> httpx.Response:
        found = self.lookup(session_id)
        return found if isinstance(found, httpx.Response) else httpx.Response(200, json=found)

    def delete(self, request: httpx.Request, session_id: str) -> httpx.Response:
        found = self.lookup(session_id)
        if isinstance(found, httpx.Response):
            return found
        del self.sessions[session_id]
        return httpx.Response(200, json={"id": session_id, "object": "session.deleted", "deleted": True})

    def fork(self, request: httpx.Request, session_id: str) -> httpx.Response:
        found = self.lookup(session_id)
        if isinstance(found, httpx.Response):
            return found
        return httpx.Response(201, json=self.new_session(found["mode"], found["metadata"], found["tokens"]))

    def export_state(self, request: httpx.Request, session_id: str) -> httpx.Response:
        found = self.lookup(session_id)
        if isinstance(found, httpx.Response):
            return found
        snapshot = b"FAMSNAP\x00" + json.dumps(found).encode()
        return httpx.Response(200, content=snapshot, headers={"content-type": "application/octet-stream"})

    def import_state(self, request: httpx.Request) -> httpx.Response:
        if not request.content.startswith(b"FAMSNAP\x00"):
            return self.error(422, "invalid_snapshot", "not a FAM snapshot")
        old = json.loads(request.content[8:])
        return httpx.Response(201, json=self.new_session(old["mode"], old["metadata"], old["tokens"]))

    # -- ingest

    def ingest(self, request: httpx.Request, session_id: str) -> httpx.Response:
        found = self.lookup(session_id)
        if isinstance(found, httpx.Response):
            return found
        key = request.headers.get("idempotency-key", "")
        if (session_id, key) in self.ingests:
            return httpx.Response(200, content=self.sse(self.ingests[session_id, key]))
        if request.headers["content-type"].startswith("multipart/form-data"):
            _, filename, _, data = self.multipart_file(request)
            is_pdf = filename.lower().endswith(".pdf")
            text = data.decode("latin-1")
            stream = request.url.params.get("stream") == "true"
        else:
            body = json.loads(request.content)
            is_pdf, text, stream = False, body["text"], body.get("stream", False)
        total = len(text.split())
        pages = 2 if is_pdf else None
        events: list[Any] = [
            {
                "object": "ingest.progress",
                "tokens_done": done,
                "tokens_total": total,
                "pages_done": (pages if done == total else 1) if pages else None,
                "pages_total": pages,
            }
            for done in (total // 2, total)
        ]
        if self.ingest_error:
            return httpx.Response(
                200, content=self.sse(events[0], self.error_body(self.ingest_error, "cannot read PDF"))
            )
        found["tokens"] += total
        found["state_bytes"] += 2 * total
        if key:
            self.ingests[session_id, key] = dict(found)
        assert stream, "the client always asks for a streaming ingest"
        return httpx.Response(
            200, content=self.sse(*events, found), headers={"content-type": "text/event-stream"}
        )

    # -- generation

    def generation(self, request: httpx.Request, chat: bool) -> httpx.Response:
        body = json.loads(request.content)
        session_id = body.get("session_id")
        if session_id is not None:
            found = self.lookup(session_id)
            if isinstance(found, httpx.Response):
                return found
            if self.generation_errors:
                return self.generation_errors.pop(0)
            if body.get("commit"):
                self.commits.append(body["messages"][-1]["content"] if chat else body["prompt"])
                found["tokens"] += 10
        usage = {
            "prompt_tokens": 7,
            "completion_tokens": len(ANSWER_PIECES),
            "total_tokens": 7 + len(ANSWER_PIECES),
        }
        kind = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            text = "".join(ANSWER_PIECES)
            choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            return httpx.Response(
                200,
                json={
                    "id": "cmpl-1",
                    "object": kind,
                    "created": 0,
                    "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop", **choice}],
                    "usage": usage,
                },
            )
        chunks: list[dict[str, Any]] = []
        for i, piece in enumerate(ANSWER_PIECES):
            delta = ({"role": "assistant"} if i == 0 else {}) | {"content": piece}
            part = {"delta": delta} if chat else {"text": piece}
            finish = "stop" if i == len(ANSWER_PIECES) - 1 else None
            chunks.append(
                {
                    "id": "cmpl-1",
                    "object": f"{kind}.chunk",
                    "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": finish, **part}],
                }
            )
        if body.get("stream_options", {}).get("include_usage"):
            chunks.append({"id": "cmpl-1", "object": f"{kind}.chunk", "choices": [], "usage": usage})
        return httpx.Response(200, content=self.sse(*chunks), headers={"content-type": "text/event-stream"})

    def chat(self, request: httpx.Request) -> httpx.Response:
        return self.generation(request, chat=True)

    def complete(self, request: httpx.Request) -> httpx.Response:
        return self.generation(request, chat=False)

    # -- utilities

    def models(self, request: httpx.Request) -> httpx.Response:
        model = {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "fam-server"}
        return httpx.Response(200, json={"object": "list", "data": [model]})

    def tokenize(self, request: httpx.Request) -> httpx.Response:
        tokens = [ord(c) for c in json.loads(request.content)["text"]]
        return httpx.Response(200, json={"tokens": tokens, "count": len(tokens)})

    def detokenize(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"text": "".join(map(chr, json.loads(request.content)["tokens"]))})


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Records the client's back-off waits instead of sleeping (sync and async clients)."""
    waits: list[float] = []

    async def async_sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(time, "sleep", waits.append)
    monkeypatch.setattr(anyio, "sleep", async_sleep)
    return waits
