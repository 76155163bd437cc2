"""The ``fam`` CLI: commands, output streams and exit codes, against the real app (see conftest.py)."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from clients import cli


@pytest.fixture
def fam(server, capsys: pytest.CaptureFixture[str]):
    """Run ``fam ARGS...`` against the app; returns (exit code, stdout, stderr)."""

    def run(*args: str, transport: httpx.BaseTransport | None = None) -> tuple[int, str, str]:
        code = cli.main(["--server", "http://fam.test", *args], transport=transport or server.transport)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def body(request: httpx.Request) -> dict:
    return json.loads(request.content)


def utc(created: int) -> list[str]:
    return datetime.fromtimestamp(created, UTC).strftime("%Y-%m-%d %H:%M:%S").split()


def answer_of(server, session_id: str, question: str, **sampling) -> str:
    """What the app answers a greedy question about the session (without committing it)."""
    return server.greedy_chat([{"role": "user", "content": question}], session_id=session_id, **sampling)


TEXT = "The keeper of the lighthouse wrote in her log every evening. " * 2


# -- sessions


def test_sessions_list_prints_a_table(fam, server) -> None:
    first = server.new_session(mode="bswa", text=TEXT)
    second = server.new_session(mode="sink")
    code, out, _ = fam("sessions", "list")
    header, *rows = out.splitlines()
    assert code == 0
    assert header.split() == ["ID", "MODE", "TOKENS", "STATE", "CREATED", "(UTC)"]
    kib = f"{first['state_bytes'] / 1024:.1f}"
    assert sorted(row.split() for row in rows)[0 if first["id"] < second["id"] else 1] == [
        first["id"], "bswa", str(first["tokens"]), kib, "KiB", *utc(first["created"])]
    assert {row.split()[0]: row.split()[1:3] for row in rows}[second["id"]] == ["sink", "0"]


def test_sessions_list_json(fam, server) -> None:
    session = server.new_session(metadata={"title": "doc"})
    code, out, _ = fam("sessions", "list", "--json")
    assert code == 0
    assert json.loads(out) == [{k: v for k, v in session.items() if k != "object"}]


def test_sessions_list_empty_says_so_on_stderr(fam) -> None:
    assert fam("sessions", "list") == (0, "", "no sessions\n")


def test_sessions_show_text_and_json(fam, server) -> None:
    session = server.new_session(metadata={"a": 1}, text=TEXT)
    code, out, _ = fam("sessions", "show", session["id"])
    assert code == 0
    assert f"id:          {session['id']}" in out.splitlines()
    assert f"state:       {session['state_bytes'] / 1024:.1f} KiB ({session['state_bytes']} bytes)" in out
    assert f"created:     {' '.join(utc(session['created']))} UTC" in out
    assert 'metadata:    {"a": 1}' in out
    code, out, _ = fam("sessions", "show", session["id"], "--json")
    assert json.loads(out)["tokens"] == session["tokens"] > 0


def test_sessions_rm_and_fork(fam, server) -> None:
    session = server.new_session()
    code, out, err = fam("sessions", "fork", session["id"])
    new_id = out.strip()
    assert code == 0 and new_id in server.sessions() and new_id != session["id"]
    assert fam("sessions", "rm", session["id"]) == (0, "", f"deleted session {session['id']}\n")
    assert list(server.sessions()) == [new_id]


def test_sessions_export_then_import(fam, server, tmp_path: Path) -> None:
    session = server.new_session(mode="bswa", text=TEXT)
    snapshot = tmp_path / "state.fam"
    code, out, err = fam("sessions", "export", session["id"], str(snapshot))
    assert code == 0 and out == ""
    assert err == f"wrote {snapshot.stat().st_size} bytes to {snapshot}\n"
    code, out, _ = fam("sessions", "import", str(snapshot))
    restored = server.session(out.strip())
    assert code == 0 and restored["mode"] == "bswa" and restored["tokens"] == session["tokens"]
    assert server.requests[-1].content == snapshot.read_bytes()


def test_export_to_an_unwritable_path_is_an_error(fam, server, tmp_path: Path) -> None:
    session = server.new_session()
    code, _, err = fam("sessions", "export", session["id"], str(tmp_path / "missing-dir" / "x"))
    assert code == 1
    assert err.startswith("fam: error: [Errno 2] No such file or directory")


# -- ingest


def test_ingest_creates_a_session_and_prints_only_its_id(fam, server, tmp_path: Path, pdf_bytes) -> None:
    doc = tmp_path / "report.pdf"
    doc.write_bytes(pdf_bytes(["The first page of the report.", "The second page, and the end."]))
    code, out, err = fam("ingest", str(doc), "--mode", "bswa")
    session_id = out.strip()
    assert code == 0 and out == f"{session_id}\n"
    session = server.session(session_id)
    assert session["mode"] == "bswa" and session["tokens"] > 0
    assert body(server.requests[0]) == {"mode": "bswa"}
    # the progress bar (on stderr) shows the file, tokens, pages, rate
    assert "report.pdf" in err and "page 2/2" in err and "tok/s" in err
    assert err.rstrip().endswith(f"{session['tokens']} tokens in session {session_id}")


def test_ingest_into_an_existing_session(fam, server, tmp_path: Path) -> None:
    session = server.new_session(text=TEXT)
    notes = tmp_path / "notes.md"
    notes.write_text("# Notes\nmore words here")
    code, out, _ = fam("ingest", str(notes), "--session", session["id"])
    assert code == 0 and out == f"{session['id']}\n"
    assert server.session(session["id"])["tokens"] > session["tokens"]
    assert server.paths() == [f"POST /v1/sessions/{session['id']}/ingest"]


def test_failed_ingest_deletes_the_session_it_created(fam, server, tmp_path: Path, pdf_bytes) -> None:
    doc = tmp_path / "scan.pdf"
    doc.write_bytes(pdf_bytes([""]))  # a page without text, as a scan has
    code, out, err = fam("ingest", str(doc))
    assert code == 1 and out == ""
    assert "fam: error: the PDF (1 pages) has no extractable text" in err and "(pdf_no_text)" in err
    assert server.sessions() == {}
    assert server.paths()[-1].startswith("DELETE /v1/sessions/")


def test_failed_ingest_keeps_a_session_it_did_not_create(fam, server, tmp_path: Path) -> None:
    session = server.new_session()
    doc = tmp_path / "broken.pdf"
    doc.write_bytes(b"%PDF-1.7 not really a PDF")
    code, _, err = fam("ingest", str(doc), "--session", session["id"])
    assert code == 1 and "(pdf_invalid)" in err and session["id"] in server.sessions()


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
    session = server.new_session(text=TEXT)
    code, out, _ = fam(
        "ask", session["id"], "What is the capital?", "--max-tokens", "6", "--temperature", "0"
    )
    assert code == 0 and out == answer_of(server, session["id"], "What is the capital?", max_tokens=6) + "\n"
    sent = body(server.requests[-1])
    assert sent["messages"] == [{"role": "user", "content": "What is the capital?"}]
    assert (sent["session_id"], sent["max_tokens"], sent["temperature"], sent["stream"]) == (
        session["id"],
        6,
        0.0,
        True,
    )
    assert "commit" not in sent and server.session(session["id"])["tokens"] == session["tokens"]


def sent_questions(server) -> list[str]:
    chats = [body(r) for r in server.requests if r.url.path == "/v1/chat/completions"]
    assert all(c["commit"] is True for c in chats)
    return [c["messages"][-1]["content"] for c in chats]


def test_chat_commits_each_turn_until_exit(fam, server, monkeypatch) -> None:
    session = server.new_session(text=TEXT)
    monkeypatch.setattr("sys.stdin", io.StringIO("first question\n\n  second question  \nexit\nnever sent\n"))
    code, out, _ = fam("chat", session["id"], "--max-tokens", "4")
    assert code == 0
    assert sent_questions(server) == ["first question", "second question"]
    assert len(out.splitlines()) == 2
    assert server.session(session["id"])["tokens"] > session["tokens"] + 2 * 4  # both turns were committed


def test_chat_ends_at_end_of_input(fam, server, monkeypatch) -> None:
    session = server.new_session()
    monkeypatch.setattr("sys.stdin", io.StringIO("only question"))
    assert fam("chat", session["id"], "--max-tokens", "4")[0] == 0
    assert sent_questions(server) == ["only question"]
    assert server.session(session["id"])["tokens"] > 4


def test_chat_survives_an_api_error_in_one_turn(fam, server, monkeypatch) -> None:
    session = server.new_session()
    expected = answer_of(server, session["id"], "two", max_tokens=4)  # the failed turn commits nothing
    monkeypatch.setattr("sys.stdin", io.StringIO("one\ntwo\n"))
    full = server.error(400, "context_length_exceeded", "the session is full")
    server.script_by_path["/v1/chat/completions"] = [full]
    code, out, err = fam("chat", session["id"], "--max-tokens", "4", "--temperature", "0")
    assert code == 0
    assert "fam: error: the session is full (context_length_exceeded)" in err
    assert out == expected + "\n"
    assert sent_questions(server) == ["one", "two"]


def test_chat_on_a_missing_session_fails_before_reading_input(fam, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("never read\n"))
    code, out, err = fam("chat", "sess_missing")
    assert (code, out) == (1, "")
    assert err == "fam: error: no session 'sess_missing' (session_not_found)\n"


# -- errors and exit codes


def test_api_error_exits_1_with_message_and_code(fam) -> None:
    code, out, err = fam("sessions", "show", "sess_nope")
    assert (code, out) == (1, "")
    assert err == "fam: error: no session 'sess_nope' (session_not_found)\n"


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


def test_api_key_and_server_options(keyed_server, capsys, monkeypatch) -> None:
    monkeypatch.setenv("FAM_SERVER", "http://ignored.test")
    code = cli.main(
        ["--server", "http://chosen.test:1234", "--api-key", "sk-right", "sessions", "list"],
        transport=keyed_server.transport,
    )
    assert code == 0
    (request,) = keyed_server.requests
    assert request.url.host == "chosen.test" and request.url.port == 1234
    assert request.headers["authorization"] == "Bearer sk-right"
    capsys.readouterr()
