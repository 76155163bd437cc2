"""The Python clients against the real server: `Client` over loopback HTTP to the `fam-server` subprocess (API
keys on), the stock `openai` client against the same server, and `AsyncClient` over `httpx.ASGITransport`
into an in-process app without API keys."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from clients import AsyncClient, Client, IngestProgress
from clients import errors as e
from model import FamConfig, FamRuntime
from server.app import create_app
from server.settings import Settings

QUESTION = [{"role": "user", "content": "Which anchors were repainted?"}]
SAMPLING = {"max_tokens": 6, "temperature": 1.0, "seed": 7}


@pytest.fixture
def client(server_url: str, api_key: str) -> Iterator[Client]:
    with Client(server_url, api_key=api_key) as fam:
        yield fam


def check_progress(events: list[IngestProgress], pages: int | None) -> None:
    """pages: a PDF's page count; None for text, which has no pages."""
    assert events, "no progress events"
    done = [p.tokens_done for p in events]
    assert done == sorted(done) and done[-1] == events[-1].tokens_total > 0
    assert events[-1].pages_done == events[-1].pages_total == pages


def test_ingest_text_and_pdf_with_progress_then_ask(client: Client, document: Path, make_pdf: Callable) -> None:
    session = client.create_session(mode="fam", metadata={"source": "e2e"})
    assert (session.mode, session.tokens, session.metadata) == ("fam", 0, {"source": "e2e"})
    assert session.model == client.models()[0].id

    text_events: list[IngestProgress] = []
    after_text = client.ingest_file(session.id, document, progress=text_events.append)
    check_progress(text_events, pages=None)
    assert after_text.tokens >= text_events[-1].tokens_total

    pdf_events: list[IngestProgress] = []
    pdf = make_pdf(["First page: the bridge has 112 anchors.", "Second page: nine were repainted."])
    after_pdf = client.ingest_file(session.id, pdf, progress=pdf_events.append)
    check_progress(pdf_events, pages=2)
    assert after_pdf.tokens > after_text.tokens
    assert client.get_session(session.id) == after_pdf

    stream = client.chat(QUESTION, session_id=session.id, stream=True, **SAMPLING)
    pieces = list(stream)
    assert pieces and all(pieces) and stream.finish_reason in ("length", "stop")
    assert stream.usage is not None and 0 < stream.usage.completion_tokens <= SAMPLING["max_tokens"]
    # not committed: the session is unchanged, and the same seed gives the same answer
    assert client.get_session(session.id).tokens == after_pdf.tokens
    assert client.chat(QUESTION, session_id=session.id, **SAMPLING).text == "".join(pieces)


def test_commit_appends_the_exchange(client: Client, document_text: str) -> None:
    session = client.ingest_text(client.create_session().id, document_text)
    answer = client.chat(QUESTION, session_id=session.id, commit=True, **SAMPLING)
    assert answer.text and answer.usage is not None
    assert client.get_session(session.id).tokens > session.tokens + answer.usage.completion_tokens
    completion = client.complete("The bridge", session_id=session.id, max_tokens=4, temperature=0)
    assert completion.text and completion.finish_reason in ("length", "stop")


def test_fork_export_import_delete(client: Client, document_text: str) -> None:
    session = client.ingest_text(client.create_session(mode="bswa").id, document_text)
    fork = client.fork_session(session.id)
    assert fork.id != session.id and (fork.tokens, fork.mode) == (session.tokens, "bswa")

    snapshot = client.export_state(session.id)
    restored = client.import_state(snapshot)
    assert restored.id not in (session.id, fork.id) and restored.tokens == session.tokens
    assert client.chat(QUESTION, session_id=restored.id, **SAMPLING).text == client.chat(
        QUESTION, session_id=session.id, **SAMPLING
    ).text

    listed = {s.id for s in client.list_sessions()}
    assert {session.id, fork.id, restored.id} <= listed
    for sid in (session.id, fork.id, restored.id):
        assert client.delete_session(sid) is True
    assert not {session.id, fork.id, restored.id} & {s.id for s in client.list_sessions()}
    with pytest.raises(e.NotFoundError) as caught:
        client.get_session(session.id)
    assert (caught.value.status, caught.value.code) == (404, "session_not_found")


def test_utilities(client: Client) -> None:
    assert client.health()["status"] == "ok"
    tokens = client.tokenize("Harbour Bridge")
    assert tokens and client.detokenize(tokens) == "Harbour Bridge"
    assert "fam_request_seconds" in client.metrics()


def test_api_keys_separate_owners(server_url: str, client: Client, other_key: str) -> None:
    mine = client.create_session()
    with Client(server_url, api_key=other_key) as other:
        assert mine.id not in {s.id for s in other.list_sessions()}
        with pytest.raises(e.NotFoundError):
            other.get_session(mine.id)
        with pytest.raises(e.NotFoundError):
            other.delete_session(mine.id)
    for key in (None, "wrong-key"):
        with Client(server_url, api_key=key) as anonymous, pytest.raises(e.AuthenticationError) as caught:
            anonymous.list_sessions()
        assert (caught.value.status, caught.value.code) == (401, "unauthorized")
    with Client(server_url) as anonymous:
        assert anonymous.health()["status"] == "ok"  # /health stays public


def test_errors_raise_their_classes(client: Client, tmp_path: Path, make_pdf: Callable, unused_url: str) -> None:
    session = client.create_session()
    with pytest.raises(e.BadRequestError) as caught:
        client.create_session(mode="no-such-mode")
    assert caught.value.status == 400 and caught.value.param == "mode"
    with pytest.raises(e.PDFError) as caught:
        client.ingest_file(session.id, make_pdf(["", ""]))
    assert caught.value.code == "pdf_no_text"
    with pytest.raises(e.InvalidSnapshotError):
        client.import_state(b"not a snapshot")
    with pytest.raises(e.NotFoundError):
        client.chat(QUESTION, session_id="sess_missing", stream=True, **SAMPLING)
    unsupported = tmp_path / "notes.docx"
    unsupported.write_bytes(b"PK")
    with pytest.raises(ValueError, match="unsupported file type"):
        client.ingest_file(session.id, unsupported)
    with Client(unused_url, max_retries=0) as nobody, pytest.raises(e.APIConnectionError):
        nobody.list_sessions()


def test_openai_client_with_session_id(server_url: str, api_key: str, client: Client, document_text: str) -> None:
    session = client.ingest_text(client.create_session().id, document_text)
    stock = openai.OpenAI(base_url=f"{server_url}/v1", api_key=api_key)
    model = stock.models.list().data[0].id
    stream = stock.chat.completions.create(
        model=model, messages=QUESTION, stream=True, extra_body={"session_id": session.id}, **SAMPLING
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == client.chat(QUESTION, session_id=session.id, **SAMPLING).text
    with pytest.raises(openai.NotFoundError):
        stock.chat.completions.create(model=model, messages=QUESTION, extra_body={"session_id": "sess_missing"})


@pytest.fixture(scope="module")
def tiny_runtime(tiny_chat_dir: Path) -> FamRuntime:
    return FamRuntime.load(tiny_chat_dir, fam=FamConfig(block_size=16, memory_blocks=1, fam_len=4),
                           dtype="float32", device="cpu")


def test_async_client_in_process_without_api_keys(tiny_runtime: FamRuntime, tmp_path: Path, document_text: str) -> None:
    app = create_app(Settings(data_dir=tmp_path / "data", secret="e2e", api_keys=None), tiny_runtime)

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with AsyncClient("http://fam.test", api_key=None, transport=transport) as fam:
                session = await fam.create_session(mode="sink")
                events: list[IngestProgress] = []
                session = await fam.ingest_text(session.id, document_text, progress=events.append)
                check_progress(events, pages=None)
                stream = await fam.chat(QUESTION, session_id=session.id, stream=True, **SAMPLING)
                pieces = [piece async for piece in stream]
                assert pieces and stream.usage is not None
                fork = await fam.fork_session(session.id)
                assert {s.id for s in await fam.list_sessions()} == {session.id, fork.id}
                assert await fam.delete_session(fork.id)
                with pytest.raises(e.NotFoundError):
                    await fam.get_session(fork.id)

    asyncio.run(scenario())
