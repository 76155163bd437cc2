"""The ``fam`` CLI: commands, output streams and exit codes, with the fake server as transport."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import pytest

from clients import cli


@pytest.fixture
def fam(server, capsys: pytest.CaptureFixture[str]):
    """Run ``fam ARGS...`` against the fake server; returns (exit code, stdout, stderr)."""

    def run(*args: str, transport: httpx.BaseTransport | None = None) -> tuple[int, str, str]:
        code = cli.main(["--server", "http://fam.test", *args], transport=transport or server.transport)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def body(request: httpx.Request) -> dict:
    return json.loads(request.content)


# -- sessions


def test_sessions_list_prints_a_table(fam, server) -> None:
    first = server.new_session(tokens=1536)
    second = server.new_session(mode="sink", tokens=10)
    code, out, _ = fam("sessions", "list")
    header, *rows = out.splitlines()
    assert code == 0
    assert header.split() == ["ID", "MODE", "TOKENS", "STATE", "CREATED", "(UTC)"]
    assert rows[0].split() == [first["id"], "fam", "1536", "7.0", "KiB", "2026-01-01", "00:00:00"]
    assert rows[1].split()[:3] == [second["id"], "sink", "10"]


def test_sessions_list_json(fam, server) -> None:
    session = server.new_session(metadata={"title": "doc"})
    code, out, _ = fam("sessions", "list", "--json")
    assert code == 0
    assert json.loads(out) == [{k: v for k, v in session.items() if k != "object"}]


def test_sessions_list_empty_says_so_on_stderr(fam) -> None:
    assert fam("sessions", "list") == (0, "", "no sessions\n")


def test_sessions_show_text_and_json(fam, server) -> None:
    session = server.new_session(tokens=100, metadata={"a": 1})
    code, out, _ = fam("sessions", "show", session["id"])
    assert code == 0
    assert f"id:          {session['id']}" in out.splitlines()
    assert "state:       4.2 KiB (4296 bytes)" in out
    assert 'metadata:    {"a": 1}' in out
    code, out, _ = fam("sessions", "show", session["id"], "--json")
    assert json.loads(out)["tokens"] == 100


def test_sessions_rm_and_fork(fam, server) -> None:
    session = server.new_session()
    code, out, err = fam("sessions", "fork", session["id"])
    new_id = out.strip()
    assert code == 0 and new_id in server.sessions and new_id != session["id"]
    assert fam("sessions", "rm", session["id"]) == (0, "", f"deleted session {session['id']}\n")
    assert list(server.sessions) == [new_id]


def test_sessions_export_then_import(fam, server, tmp_path: Path) -> None:
    session = server.new_session(mode="bswa", tokens=5)
    snapshot = tmp_path / "state.fam"
    code, out, err = fam("sessions", "export", session["id"], str(snapshot))
    assert code == 0 and out == ""
    assert err == f"wrote {snapshot.stat().st_size} bytes to {snapshot}\n"
    code, out, _ = fam("sessions", "import", str(snapshot))
    restored = server.sessions[out.strip()]
    assert code == 0 and restored["mode"] == "bswa" and restored["tokens"] == 5
    assert server.requests[-1].content == snapshot.read_bytes()


def test_export_to_an_unwritable_path_is_an_error(fam, server, tmp_path: Path) -> None:
    session = server.new_session()
    code, _, err = fam("sessions", "export", session["id"], str(tmp_path / "missing-dir" / "x"))
    assert code == 1
    assert err.startswith("fam: error: [Errno 2] No such file or directory")


# -- ingest


def test_ingest_creates_a_session_and_prints_only_its_id(fam, server, tmp_path: Path) -> None:
    doc = tmp_path / "report.pdf"
    doc.write_bytes(b"%PDF-1.7 " + b"word " * 99)
    code, out, err = fam("ingest", str(doc), "--mode", "bswa")
    session_id = out.strip()
    assert code == 0 and out == f"{session_id}\n"
    assert server.sessions[session_id]["mode"] == "bswa"
    assert server.sessions[session_id]["tokens"] == 100
    assert body(server.requests[0]) == {"mode": "bswa"}
    # the progress bar (on stderr) shows the file, tokens, pages, rate
    assert "report.pdf" in err and "100/100" in err and "page 2/2" in err and "tok/s" in err
    assert err.rstrip().endswith(f"100 tokens in session {session_id}")


def test_ingest_into_an_existing_session(fam, server, tmp_path: Path) -> None:
    session = server.new_session(tokens=3)
    notes = tmp_path / "notes.md"
    notes.write_text("# Notes\nmore words here")
    code, out, _ = fam("ingest", str(notes), "--session", session["id"])
    assert code == 0 and out == f"{session['id']}\n"
    assert session["tokens"] == 3 + 5
    assert server.paths() == [f"POST /v1/sessions/{session['id']}/ingest"]


def test_failed_ingest_deletes_the_session_it_created(fam, server, tmp_path: Path) -> None:
    doc = tmp_path / "scan.pdf"
    doc.write_bytes(b"%PDF-1.7 image only")
    server.ingest_error = "pdf_no_text"
    code, out, err = fam("ingest", str(doc))
    assert code == 1 and out == ""
    assert "fam: error: cannot read PDF (pdf_no_text)" in err
    assert server.sessions == {}
    assert server.paths()[-1].startswith("DELETE /v1/sessions/")


def test_failed_ingest_keeps_a_session_it_did_not_create(fam, server, tmp_path: Path) -> None:
    session = server.new_session()
    doc = tmp_path / "scan.pdf"
    doc.write_bytes(b"%PDF-1.7")
    server.ingest_error = "pdf_encrypted"
    code, _, _ = fam("ingest", str(doc), "--session", session["id"])
    assert code == 1 and session["id"] in server.sessions


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ingest", "slides.docx"], "unsupported file type '.docx'"),
        (["ingest", "missing.pdf"], "no such file: missing.pdf"),
        (["ingest", "doc.txt", "--session", "s", "--mode", "fam"], "not allowed with argument"),
        (["sessions", "import", "missing.snap"], "no such file"),
        (["sessions"], "required: ACTION"),
        ([], "required: COMMAND"),
    ],
)
def test_usage_errors_exit_2(fam, server, tmp_path, monkeypatch, capsys, args, message) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "slides.docx").write_bytes(b"PK")
    (tmp_path / "doc.txt").write_text("text")
    with pytest.raises(SystemExit) as exited:
        fam(*args)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert server.requests == []


# -- ask and chat


def test_ask_streams_the_answer(fam, server) -> None:
    session = server.new_session()
    code, out, _ = fam(
        "ask", session["id"], "What is the capital?", "--max-tokens", "20", "--temperature", "0"
    )
    assert code == 0 and out == "Paris is the capital.\n"
    sent = body(server.requests[-1])
    assert sent["messages"] == [{"role": "user", "content": "What is the capital?"}]
    assert (sent["session_id"], sent["max_tokens"], sent["temperature"], sent["stream"]) == (
        session["id"],
        20,
        0.0,
        True,
    )
    assert "commit" not in sent and server.commits == []


def test_chat_commits_each_turn_until_exit(fam, server, monkeypatch) -> None:
    session = server.new_session()
    monkeypatch.setattr("sys.stdin", io.StringIO("first question\n\n  second question  \nexit\nnever sent\n"))
    code, out, _ = fam("chat", session["id"])
    assert code == 0
    assert server.commits == ["first question", "second question"]
    assert out == "Paris is the capital.\n" * 2
    assert all(body(r)["commit"] is True for r in server.requests if r.url.path == "/v1/chat/completions")


def test_chat_ends_at_end_of_input(fam, server, monkeypatch) -> None:
    session = server.new_session()
    monkeypatch.setattr("sys.stdin", io.StringIO("only question"))
    assert fam("chat", session["id"])[0] == 0
    assert server.commits == ["only question"]


def test_chat_survives_an_api_error_in_one_turn(fam, server, monkeypatch) -> None:
    session = server.new_session()
    monkeypatch.setattr("sys.stdin", io.StringIO("one\ntwo\n"))
    server.generation_errors = [server.error(400, "context_length_exceeded", "the session is full")]
    code, out, err = fam("chat", session["id"])
    assert code == 0
    assert "fam: error: the session is full (context_length_exceeded)" in err
    assert out == "Paris is the capital.\n"
    assert server.commits == ["two"]


def test_chat_on_a_missing_session_fails_before_reading_input(fam, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("never read\n"))
    code, out, err = fam("chat", "sess_missing")
    assert (code, out) == (1, "")
    assert err == "fam: error: session sess_missing not found (session_not_found)\n"


# -- errors and exit codes


def test_api_error_exits_1_with_message_and_code(fam) -> None:
    code, out, err = fam("sessions", "show", "sess_nope")
    assert (code, out) == (1, "")
    assert err == "fam: error: session sess_nope not found (session_not_found)\n"


def test_unreachable_server_exits_3_naming_the_url(fam, sleeps) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    code, out, err = fam("sessions", "list", transport=httpx.MockTransport(refuse))
    assert (code, out) == (3, "")
    assert err == "fam: error: cannot connect to http://fam.test ([Errno 111] Connection refused)\n"


def test_ctrl_c_exits_130(fam, server) -> None:
    session = server.new_session()

    def interrupted(request: httpx.Request) -> httpx.Response:
        raise KeyboardInterrupt

    code, _, _ = fam("ask", session["id"], "q", transport=httpx.MockTransport(interrupted))
    assert code == 130


def test_api_key_and_server_options(server, capsys, monkeypatch) -> None:
    monkeypatch.setenv("FAM_SERVER", "http://ignored.test")
    server.api_key = "sk-cli"
    code = cli.main(
        ["--server", "http://chosen.test:1234", "--api-key", "sk-cli", "sessions", "list"],
        transport=server.transport,
    )
    assert code == 0
    (request,) = server.requests
    assert request.url.host == "chosen.test" and request.url.port == 1234
    assert request.headers["authorization"] == "Bearer sk-cli"
    capsys.readouterr()
