"""The AsyncClient against the real app (scripted failures where needed): the same contract as the blocking
client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from clients import errors
from clients.client import AsyncClient
from clients.streams import AsyncTextStream
from clients.types import IngestProgress, Usage

T = TypeVar("T")
QUESTION = [{"role": "user", "content": "What is the capital?"}]
GREEDY = {"max_tokens": 6, "temperature": 0.0}


def run(server, scenario: Callable[[AsyncClient], Awaitable[T]]) -> T:
    async def main() -> T:
        async with AsyncClient("http://fam.test", transport=server.transport) as fam:
            return await scenario(fam)

    return asyncio.run(main())


def test_session_crud_and_not_found(server) -> None:
    async def scenario(fam: AsyncClient) -> None:
        created = await fam.create_session(mode="full", metadata={"n": 1})
        assert (await fam.get_session(created.id)) == created
        forked = await fam.fork_session(created.id)
        assert {s.id for s in await fam.list_sessions()} == {created.id, forked.id}
        assert await fam.delete_session(created.id) is True
        with pytest.raises(errors.NotFoundError) as caught:
            await fam.get_session(created.id)
        assert caught.value.code == "session_not_found" and caught.value.status == 404

    run(server, scenario)
    assert json.loads(server.requests[0].content) == {"mode": "full", "metadata": {"n": 1}}


def test_export_import_and_utilities(server) -> None:
    async def scenario(fam: AsyncClient) -> None:
        session = await fam.create_session()
        restored = await fam.import_state(await fam.export_state(session.id))
        assert restored.id != session.id
        with pytest.raises(errors.InvalidSnapshotError):
            await fam.import_state(b"junk")
        ids = await fam.tokenize("ok then")
        assert ids and await fam.detokenize(ids) == "ok then"
        assert [m.id for m in await fam.models()] == [server.model]
        assert (await fam.health())["status"] == "ok"
        assert "fam_sessions" in await fam.metrics()

    run(server, scenario)


def test_ingest_file_reports_progress(server, tmp_path: Path, pdf_bytes) -> None:
    doc = tmp_path / "doc.pdf"
    doc.write_bytes(pdf_bytes(["Two three four five six.", "Seven eight nine ten."]))
    seen: list[IngestProgress] = []

    async def scenario(fam: AsyncClient) -> int:
        session = await fam.create_session()
        return (await fam.ingest_file(session.id, doc, progress=seen.append)).tokens

    tokens = run(server, scenario)
    assert tokens > seen[-1].tokens_total > 0
    assert all(isinstance(p, IngestProgress) for p in seen)
    assert (seen[-1].tokens_done, seen[-1].pages_done, seen[-1].pages_total) == (seen[-1].tokens_total, 2, 2)
    assert server.multipart_file(server.requests[-1])[:3] == ("file", "doc.pdf", "application/pdf")


def test_ingest_retry_keeps_the_idempotency_key(server, sleeps) -> None:
    async def scenario(fam: AsyncClient) -> int:
        session = await fam.create_session()
        server.script = [server.error(429, "queue_full", "wait", headers={"Retry-After": "0.5"})]
        tokens = (await fam.ingest_text(session.id, "a b c")).tokens
        server.script = [httpx.Response(200, json=dict(server.session(session.id), tokens=99))]
        assert (await fam.ingest_text(session.id, "d")).tokens == 99  # a stored answer as plain JSON
        return tokens

    tokens = run(server, scenario)
    (session,) = server.sessions().values()
    assert tokens == session["tokens"] > 3
    first, second = server.requests[1:3]
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"]
    assert sleeps == [0.5]


def test_streaming_chat_pieces_and_usage(server) -> None:
    session = server.new_session(text="A short document about capitals. " * 3)
    expected = server.greedy_chat(QUESTION, session_id=session["id"], **GREEDY)

    async def scenario(fam: AsyncClient) -> tuple[list[str], Usage | None, str | None]:
        stream = await fam.chat(QUESTION, session_id=session["id"], commit=True, stream=True, **GREEDY)
        assert isinstance(stream, AsyncTextStream)
        async with stream:
            pieces = [piece async for piece in stream]
        return pieces, stream.usage, stream.finish_reason

    pieces, usage, finish = run(server, scenario)
    assert len(pieces) > 1 and "".join(pieces) == expected
    assert usage is not None and usage.completion_tokens == 6 and finish == "length"
    sent = json.loads(server.requests[-1].content)
    assert sent["commit"] is True and sent["max_tokens"] == 6 and sent["stream"] is True
    assert server.session(session["id"])["tokens"] > usage.prompt_tokens  # the turn was committed


def test_non_streaming_completion(server) -> None:
    async def scenario(fam: AsyncClient) -> str:
        return (await fam.complete("The capital of France is", **GREEDY)).text

    plain = server.http.post("/v1/completions", json={"prompt": "The capital of France is", **GREEDY}).json()
    assert run(server, scenario) == plain["choices"][0]["text"]
    assert server.paths() == ["GET /v1/models", "POST /v1/completions"]


def test_error_mid_stream_raises(server) -> None:
    chunk = {"choices": [{"index": 0, "text": "Par", "finish_reason": None}]}
    server.script = [
        httpx.Response(200, content=server.sse(chunk, server.error_body("server_error", "the model failed")))
    ]

    async def scenario(fam: AsyncClient) -> list[str]:
        pieces: list[str] = []
        with pytest.raises(errors.ServerError):
            async for piece in await fam.complete("x", stream=True, model="m"):
                pieces.append(piece)
        return pieces

    assert run(server, scenario) == ["Par"]


def test_committing_completion_is_not_retried_but_reads_are(server, sleeps) -> None:
    async def scenario(fam: AsyncClient) -> None:
        session = await fam.create_session()
        server.script = [server.error(429, "queue_full", "full", headers={"Retry-After": "1"})]
        with pytest.raises(errors.RateLimitError) as caught:
            await fam.complete("x", session_id=session.id, commit=True, model="m")
        assert caught.value.retry_after == 1.0
        server.script = [httpx.ConnectError("refused")]
        assert (await fam.get_session(session.id)).id == session.id

    run(server, scenario)
    assert [r.url.path for r in server.requests[:2]] == ["/v1/sessions", "/v1/completions"]
    assert [r.method for r in server.requests] == ["POST", "POST", "GET", "GET"]
    (session,) = server.sessions().values()
    assert len(sleeps) == 1 and session["tokens"] == 0  # nothing was committed


def test_connection_failure_raises_api_connection_error(sleeps) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused")

    async def scenario() -> None:
        async with AsyncClient(
            "http://down.test", transport=httpx.MockTransport(refuse), max_retries=1
        ) as fam:
            await fam.list_sessions()

    with pytest.raises(errors.APIConnectionError, match="cannot connect to http://down.test"):
        asyncio.run(scenario())
    assert len(sleeps) == 1
