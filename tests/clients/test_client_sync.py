"""The blocking Client against the real app, with scripted failures where a real server cannot produce them
(see conftest.py)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from clients import errors
from clients.client import Client
from clients.streams import TextStream
from clients.types import Completion, IngestProgress, Session, Usage

QUESTION = [{"role": "user", "content": "What is the capital?"}]
GREEDY = {"max_tokens": 6, "temperature": 0.0}
TEXT = "The capital of the kingdom was moved to the coast in the spring. " * 3


@pytest.fixture
def client(server) -> Iterator[Client]:
    with Client("http://fam.test", transport=server.transport) as fam:
        yield fam


def body(request: httpx.Request) -> dict:
    return json.loads(request.content)


# -- configuration


def test_base_url_and_api_key_default_to_the_environment(keyed_server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAM_SERVER", "http://env.test:9000/")
    monkeypatch.setenv("FAM_API_KEY", "sk-right")
    with Client(transport=keyed_server.transport) as fam:
        assert fam.list_sessions() == []  # the key from the environment is accepted
    (request,) = keyed_server.requests
    assert str(request.url) == "http://env.test:9000/v1/sessions"
    assert request.headers["authorization"] == "Bearer sk-right"


def test_without_environment_the_local_default_and_no_auth_header(server, monkeypatch) -> None:
    monkeypatch.delenv("FAM_SERVER", raising=False)
    monkeypatch.delenv("FAM_API_KEY", raising=False)
    with Client(transport=server.transport) as fam:
        fam.list_sessions()
    assert str(server.requests[0].url) == "http://127.0.0.1:8000/v1/sessions"
    assert "authorization" not in server.requests[0].headers


def test_wrong_api_key_raises_authentication_error(keyed_server) -> None:
    with Client("http://fam.test", api_key="sk-wrong", transport=keyed_server.transport) as fam:
        with pytest.raises(errors.AuthenticationError) as caught:
            fam.list_sessions()
    assert caught.value.status == 401
    assert caught.value.type == "authentication_error"


# -- sessions


def test_session_crud(client: Client, server) -> None:
    created = client.create_session(mode="bswa", metadata={"title": "Q3 report"})
    assert isinstance(created, Session)
    assert (created.mode, created.metadata, created.tokens) == ("bswa", {"title": "Q3 report"}, 0)
    assert body(server.requests[-1]) == {"mode": "bswa", "metadata": {"title": "Q3 report"}}

    assert client.get_session(created.id) == created
    forked = client.fork_session(created.id)
    assert forked.id != created.id and forked.mode == "bswa"
    assert {s.id for s in client.list_sessions()} == {created.id, forked.id}
    assert client.delete_session(created.id) is True
    assert [s.id for s in client.list_sessions()] == [forked.id]
    assert server.paths() == [
        "POST /v1/sessions",
        f"GET /v1/sessions/{created.id}",
        f"POST /v1/sessions/{created.id}/fork",
        "GET /v1/sessions",
        f"DELETE /v1/sessions/{created.id}",
        "GET /v1/sessions",
    ]


def test_create_session_without_options_sends_an_empty_object(client: Client, server) -> None:
    assert client.create_session().mode == "sink"  # the server's default (the tiny model has no adapter)
    assert body(server.requests[0]) == {}


def test_missing_session_raises_not_found_with_the_server_fields(client: Client) -> None:
    with pytest.raises(errors.NotFoundError) as caught:
        client.get_session("sess_nope")
    exc = caught.value
    assert (exc.status, exc.code, exc.type) == (404, "session_not_found", "invalid_request_error")
    assert exc.message == "no session 'sess_nope'" and exc.param == "session_id"


def test_session_ids_are_escaped_in_paths(client: Client, server) -> None:
    with pytest.raises(errors.NotFoundError):
        client.get_session("a/b?c")
    assert server.requests[0].url.raw_path == b"/v1/sessions/a%2Fb%3Fc"


def test_malformed_session_body_raises_protocol_error(client: Client, server) -> None:
    server.script = [httpx.Response(201, json={"id": "sess_1", "object": "session"})]
    with pytest.raises(errors.ProtocolError, match="malformed session"):
        client.create_session()


def test_export_and_import_state(client: Client, server) -> None:
    original = client.create_session(mode="sink", metadata={"k": "v"})
    snapshot = client.export_state(original.id)
    assert isinstance(snapshot, bytes) and snapshot.startswith(b"FAMSNAP1")
    restored = client.import_state(snapshot)
    assert restored.id != original.id
    assert (restored.mode, restored.metadata, restored.tokens) == ("sink", {"k": "v"}, original.tokens)
    upload = server.requests[-1]
    assert upload.headers["content-type"] == "application/octet-stream"
    assert upload.content == snapshot


def test_importing_garbage_raises_invalid_snapshot(client: Client) -> None:
    with pytest.raises(errors.InvalidSnapshotError) as caught:
        client.import_state(b"not a snapshot")
    assert caught.value.code == "invalid_snapshot"


# -- ingest


def test_ingest_text_streams_progress_to_the_callback(client: Client, server) -> None:
    session = client.create_session()
    seen: list[IngestProgress] = []
    result = client.ingest_text(session.id, TEXT, progress=seen.append)
    done = [p.tokens_done for p in seen]
    assert len(seen) > 2 and done == sorted(done) and done[-1] == seen[-1].tokens_total
    assert all(p.pages_done is None and p.pages_total is None for p in seen)  # text has no pages
    assert result.id == session.id and result.tokens > seen[-1].tokens_total  # plus the turn's opening
    request = server.requests[-1]
    assert body(request) == {"text": TEXT, "stream": True}
    assert uuid.UUID(request.headers["idempotency-key"])
    assert result == client.get_session(session.id)


def test_ingest_file_uploads_a_pdf_as_multipart(client: Client, server, tmp_path: Path, pdf_bytes) -> None:
    pdf = tmp_path / "Report.PDF"
    pdf.write_bytes(pdf_bytes(["Alpha beta gamma delta.", "Epsilon zeta eta theta."]))
    session = client.create_session()
    seen: list[IngestProgress] = []
    result = client.ingest_file(session.id, pdf, progress=seen.append)
    assert result.tokens > seen[-1].tokens_total > 0
    assert (seen[-1].tokens_done, seen[-1].pages_done, seen[-1].pages_total) == (seen[-1].tokens_total, 2, 2)
    request = server.requests[-1]
    assert request.url.params["stream"] == "true"
    assert server.multipart_file(request) == ("file", "Report.PDF", "application/pdf", pdf.read_bytes())


@pytest.mark.parametrize(("suffix", "content_type"), [(".txt", "text/plain"), (".md", "text/markdown")])
def test_ingest_file_content_type_follows_the_suffix(client, server, tmp_path, suffix, content_type) -> None:
    path = tmp_path / f"notes{suffix}"
    path.write_text("# Notes\nsome words")
    assert client.ingest_file(client.create_session().id, path).tokens > 0
    assert server.multipart_file(server.requests[-1])[2] == content_type


def test_ingest_file_rejects_other_types_before_any_request(client: Client, server, tmp_path: Path) -> None:
    path = tmp_path / "slides.docx"
    path.write_bytes(b"PK")
    with pytest.raises(ValueError, match="unsupported file type '.docx'"):
        client.ingest_file("sess_1", path)
    assert server.requests == []


def test_error_event_during_ingest_raises_the_mapped_error(client: Client, server) -> None:
    session = client.create_session()
    progress = {"object": "ingest.progress", "tokens_done": 16, "tokens_total": 32, "pages_done": 1,
                "pages_total": 2}
    server.script = [httpx.Response(200, content=server.sse(progress, server.error_body("pdf_no_text", "no text")))]
    seen: list[IngestProgress] = []
    with pytest.raises(errors.PDFError) as caught:
        client.ingest_text(session.id, "a b c d", progress=seen.append)
    assert caught.value.code == "pdf_no_text"
    assert caught.value.status is None
    assert seen == [IngestProgress(16, 32, 1, 2)]  # progress before the error was still reported


def test_the_servers_refusal_inside_an_ingest_stream(client: Client, server) -> None:
    session = client.create_session(mode="full")  # full mode is limited to the model's context (8192)
    with pytest.raises(errors.BadRequestError) as caught:
        client.ingest_text(session.id, "word " * 9000)
    assert (caught.value.code, caught.value.status) == ("context_length_exceeded", None)
    assert client.get_session(session.id).tokens == 0


def test_a_pdf_without_text_is_refused_before_the_stream(client: Client, tmp_path: Path, pdf_bytes) -> None:
    scan = tmp_path / "scan.pdf"
    scan.write_bytes(pdf_bytes([""]))
    with pytest.raises(errors.PDFError) as caught:
        client.ingest_file(client.create_session().id, scan)
    assert (caught.value.code, caught.value.status) == ("pdf_no_text", 422)


def test_ingest_stream_cut_before_done_raises_protocol_error(client: Client, server) -> None:
    session = client.create_session()
    progress = {"object": "ingest.progress", "tokens_done": 1, "tokens_total": 2}
    server.script = [httpx.Response(200, content=server.sse(progress, done=False))]
    with pytest.raises(errors.ProtocolError, match=r"\[DONE\]"):
        client.ingest_text(session.id, "a b")


def test_ingest_without_final_session_event_raises_protocol_error(client: Client, server) -> None:
    session = client.create_session()
    server.script = [httpx.Response(200, content=server.sse())]
    with pytest.raises(errors.ProtocolError, match="without the final session"):
        client.ingest_text(session.id, "a b")


def test_ingest_retries_reuse_one_idempotency_key_and_ingest_once(client: Client, server, sleeps) -> None:
    session = client.create_session()
    server.script = [
        httpx.ReadTimeout("server is slow"),  # the request may have arrived: only the key makes a retry safe
        server.error(503, "model_loading", "loading", headers={"Retry-After": "0"}),
    ]
    result = client.ingest_text(session.id, TEXT)
    attempts = server.requests[1:]
    keys = {request.headers["idempotency-key"] for request in attempts}
    assert len(attempts) == 3 and len(keys) == 1
    assert result.tokens > 0
    assert sleeps[1] == 0.0

    # a repeat of that key is answered from the server's memory, not ingested again
    with httpx.Client(transport=server.transport) as raw:
        again = raw.send(attempts[-1])
    assert again.status_code == 200 and f'"tokens": {result.tokens}' in again.text
    assert client.get_session(session.id).tokens == result.tokens
    # a new ingest call gets a new key
    client.ingest_text(session.id, "More.")
    assert server.requests[-1].headers["idempotency-key"] not in keys


def test_ingest_accepts_a_plain_json_session_where_a_stream_was_asked_for(client: Client, server) -> None:
    session = client.create_session()
    stored = dict(server.session(session.id), tokens=42)
    server.script = [httpx.Response(200, json=stored)]
    seen: list[IngestProgress] = []
    assert client.ingest_text(session.id, "a b", progress=seen.append).tokens == 42
    assert seen == []


# -- generation


def test_chat_returns_text_finish_reason_and_usage(client: Client, server) -> None:
    session = client.create_session()
    result = client.chat(QUESTION, session_id=session.id, max_tokens=6, temperature=0.0, seed=7)
    assert isinstance(result, Completion) and result.id.startswith("chatcmpl-")
    assert result.model == server.model and result.finish_reason == "length"
    assert result.text == server.greedy_chat(QUESTION, session_id=session.id, max_tokens=6)
    assert result.usage is not None and result.usage.completion_tokens == 6
    assert result.usage.total_tokens == result.usage.prompt_tokens + 6
    sent = body(server.requests[-1])
    assert sent == {
        "messages": QUESTION,
        "max_tokens": 6,
        "temperature": 0.0,
        "seed": 7,
        "model": server.model,
        "session_id": session.id,
    }


def test_model_is_looked_up_once_unless_given(client: Client, server) -> None:
    client.complete("Once upon a time")
    client.complete("Twice upon a time")
    client.complete("Thrice", model="other-model")
    assert server.paths().count("GET /v1/models") == 1
    assert [body(r)["model"] for r in server.requests if r.method == "POST"] == [
        server.model,
        server.model,
        "other-model",  # any name is accepted: the loaded model answers
    ]


def test_complete_without_stream_reads_choice_text(client: Client, server) -> None:
    result = client.complete("The capital of France is", stop=["\n"], max_tokens=5)
    assert isinstance(result.text, str) and result.usage is not None and result.usage.completion_tokens <= 5
    assert result.id.startswith("cmpl-") and result.finish_reason in ("stop", "length")
    assert body(server.requests[-1])["stop"] == ["\n"]
    assert "session_id" not in body(server.requests[-1])


def test_streaming_chat_yields_pieces_then_usage(client: Client, server) -> None:
    session = client.ingest_text(client.create_session().id, TEXT)
    expected = server.greedy_chat(QUESTION, session_id=session.id, **GREEDY)
    stream = client.chat(QUESTION, session_id=session.id, commit=True, stream=True, **GREEDY)
    assert isinstance(stream, TextStream)
    assert stream.usage is None
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == expected
    assert stream.usage is not None and stream.usage.completion_tokens == 6
    assert stream.usage.prompt_tokens > session.tokens
    assert stream.finish_reason == "length"
    sent = body(server.requests[-1])
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["commit"] is True
    assert client.get_session(session.id).tokens > stream.usage.prompt_tokens  # the turn was committed


def test_streaming_completion_reads_choice_text(client: Client) -> None:
    plain = client.complete("The capital of France is", **GREEDY)
    with client.complete("The capital of France is", stream=True, **GREEDY) as stream:
        assert "".join(stream) == plain.text
    assert isinstance(stream.usage, Usage) and stream.usage == plain.usage


def test_streamed_text_with_unicode_line_separators_arrives_intact(client: Client, server) -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": "line\u2028sep\u0085end"}, "finish_reason": None}]}
    server.script = [httpx.Response(200, content=server.sse(chunk))]
    assert list(client.chat(QUESTION, stream=True, model="m")) == ["line\u2028sep\u0085end"]


def test_error_mid_stream_raises_after_the_pieces_before_it(client: Client, server) -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": "Par"}, "finish_reason": None}]}
    failure = server.error_body("server_error", "generation failed", "server_error")
    server.script = [httpx.Response(200, content=server.sse(chunk, failure))]
    pieces: list[str] = []
    with pytest.raises(errors.ServerError, match="generation failed"):
        for piece in client.chat(QUESTION, stream=True, model="m"):
            pieces.append(piece)
    assert pieces == ["Par"]


def test_error_before_a_stream_starts_raises_at_the_call(client: Client) -> None:
    with pytest.raises(errors.NotFoundError):
        client.chat(QUESTION, session_id="sess_gone", stream=True)


def test_a_broken_stream_is_not_retried(client: Client, server) -> None:
    class Broken(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield server.sse({"choices": [{"index": 0, "text": "Once", "finish_reason": None}]}, done=False)
            raise httpx.ReadError("connection reset")

    server.script = [httpx.Response(200, stream=Broken())]
    stream = client.complete("Tell me", stream=True, model="m")
    pieces = []
    with pytest.raises(errors.APIConnectionError, match="connection to http://fam.test failed"):
        for piece in stream:
            pieces.append(piece)
    assert pieces == ["Once"]
    assert len(server.requests) == 1


# -- retries


def test_429_is_retried_after_the_servers_retry_after(client: Client, server, sleeps) -> None:
    server.script = [server.error(429, "queue_full", "slow down", headers={"Retry-After": "0.25"})]
    assert client.list_sessions() == []
    assert sleeps == [0.25]
    assert server.paths() == ["GET /v1/sessions", "GET /v1/sessions"]


def test_retries_stop_after_max_retries(server, sleeps) -> None:
    busy = [server.error(429, "queue_full", "full", headers={"Retry-After": "2"}) for _ in range(4)]
    server.script = list(busy)
    with Client("http://fam.test", max_retries=2, transport=server.transport) as fam:
        with pytest.raises(errors.RateLimitError) as caught:
            fam.models()
    assert caught.value.retry_after == 2.0 and caught.value.code == "queue_full"
    assert len(server.requests) == 3 and sleeps == [2.0, 2.0]


def test_committing_completion_is_never_retried(client: Client, server, sleeps) -> None:
    session = client.create_session()
    server.script = [server.error(503, "model_loading", "loading", headers={"Retry-After": "0"})]
    with pytest.raises(errors.ServiceUnavailableError):
        client.chat(QUESTION, session_id=session.id, commit=True, model="m")
    server.script = [httpx.ConnectError("refused")]
    with pytest.raises(errors.APIConnectionError):
        client.complete("x", session_id=session.id, commit=True, stream=True, model="m")
    assert server.paths()[-2:] == ["POST /v1/chat/completions", "POST /v1/completions"]
    assert sleeps == [] and client.get_session(session.id).tokens == 0


def test_non_committing_completion_is_retried(client: Client, server, sleeps) -> None:
    server.script = [server.error(503, "model_loading", "loading", headers={"Retry-After": "0"})]
    assert client.chat(QUESTION, model="m", **GREEDY).text == server.greedy_chat(QUESTION, **GREEDY)
    assert server.paths() == ["POST /v1/chat/completions", "POST /v1/chat/completions"]


def test_creating_retries_only_when_the_request_cannot_have_arrived(client: Client, server, sleeps) -> None:
    server.script = [httpx.ConnectError("refused")]
    client.create_session()
    assert len(server.sessions()) == 1 and len(server.requests) == 2

    server.script = [httpx.ReadTimeout("no answer")]
    with pytest.raises(errors.APITimeoutError, match="timed out waiting for http://fam.test"):
        client.create_session()
    assert len(server.requests) == 3


def test_reads_are_retried_after_any_transport_failure(client: Client, server, sleeps) -> None:
    server.script = [httpx.ReadError("reset"), httpx.RemoteProtocolError("garbled")]
    assert client.list_sessions() == []
    assert len(server.requests) == 3 and len(sleeps) == 2


def test_server_errors_other_than_503_are_not_retried(client: Client, server, sleeps) -> None:
    server.script = [server.error(500, "server_error", "boom")]
    with pytest.raises(errors.ServerError):
        client.list_sessions()
    assert len(server.requests) == 1 and sleeps == []


def test_connection_failure_names_the_server(sleeps) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    with Client("http://down.test:8000", transport=httpx.MockTransport(refuse)) as fam:
        with pytest.raises(errors.APIConnectionError) as caught:
            fam.get_session("sess_1")
    assert caught.value.url == "http://down.test:8000"
    assert str(caught.value) == "cannot connect to http://down.test:8000 ([Errno 111] Connection refused)"
    assert len(sleeps) == 2


# -- utilities


def test_models_tokenize_detokenize_health_metrics(client: Client, server) -> None:
    (model,) = client.models()
    assert (model.id, model.owned_by) == (server.model, "fam-server") and isinstance(model.created, int)
    ids = client.tokenize("Hello there")
    assert ids and all(isinstance(i, int) for i in ids)
    assert client.detokenize(ids) == "Hello there"
    assert client.health() == {"status": "ok", "model": server.model}
    assert "fam_sessions 0.0" in client.metrics()


def test_health_reports_loading_at_once_without_retrying(client: Client, server, sleeps) -> None:
    server.script = [httpx.Response(503, json={"status": "loading"})]
    with pytest.raises(errors.ServiceUnavailableError, match="503"):
        client.health()
    assert len(server.requests) == 1 and sleeps == []
