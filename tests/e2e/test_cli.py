"""The `fam` command line, run as a subprocess against the real server: results on standard output, progress
and errors on standard error, and the documented exit codes (0 ok, 1 API error, 2 usage, 3 unreachable)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

Fam = Callable[..., subprocess.CompletedProcess[str]]
SAMPLING = ["--max-tokens", "6", "--temperature", "1"]


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def show(fam: Fam, session_id: str) -> dict:
    return json.loads(ok(fam("sessions", "show", session_id, "--json")))


def test_ingest_ask_and_chat(fam: Fam, document: Path, make_pdf: Callable) -> None:
    ingested = fam("ingest", str(document))
    session_id = ok(ingested).strip()
    assert session_id.startswith("sess_") and "\n" not in session_id  # stdout is the id alone: SID=$(fam ingest)
    assert f"tokens in session {session_id}" in ingested.stderr and "100%" in ingested.stderr
    tokens = show(fam, session_id)["tokens"]

    pdf = make_pdf(["Page one of the report.", "Page two of the report."])
    added = fam("ingest", str(pdf), "--session", session_id)
    assert ok(added).strip() == session_id and "page 2/2" in added.stderr
    tokens_after_pdf = show(fam, session_id)["tokens"]
    assert tokens_after_pdf > tokens

    answer = ok(fam("ask", session_id, "Which anchors were repainted?", *SAMPLING))
    assert answer.strip() and answer.endswith("\n")
    assert show(fam, session_id)["tokens"] == tokens_after_pdf  # asking does not change the session

    chat = fam("chat", session_id, *SAMPLING, stdin="How much did it cost?\n\nAnd when?\nexit\n")
    assert ok(chat).count("\n") >= 2, "two answers, one per line asked"
    assert show(fam, session_id)["tokens"] > tokens_after_pdf  # chat turns are committed


def test_ingest_into_a_new_session_with_a_mode(fam: Fam, make_pdf: Callable) -> None:
    session_id = ok(fam("ingest", str(make_pdf(["Only page."])), "--mode", "full")).strip()
    session = show(fam, session_id)
    assert session["mode"] == "full" and session["tokens"] > 0


def test_sessions_list_show_fork_export_import_rm(fam: Fam, document: Path, tmp_path: Path) -> None:
    session_id = ok(fam("ingest", str(document))).strip()
    fork_id = ok(fam("sessions", "fork", session_id)).strip()
    snapshot = tmp_path / "state.famsnap"
    exported = fam("sessions", "export", session_id, str(snapshot))
    assert ok(exported) == "" and f"to {snapshot}" in exported.stderr and snapshot.stat().st_size > 0
    imported_id = ok(fam("sessions", "import", str(snapshot))).strip()

    ids = {session_id, fork_id, imported_id}
    assert len(ids) == 3
    table = ok(fam("sessions", "list"))
    assert table.splitlines()[0].split() == ["ID", "MODE", "TOKENS", "STATE", "CREATED", "(UTC)"]
    assert all(sid in table for sid in ids)
    listed = {s["id"]: s for s in json.loads(ok(fam("sessions", "list", "--json")))}
    assert len({listed[sid]["tokens"] for sid in ids}) == 1, "fork and import keep the document"
    details = ok(fam("sessions", "show", fork_id))
    assert f"id:          {fork_id}" in details and "tokens:" in details

    for sid in ids:
        removed = fam("sessions", "rm", sid)
        assert ok(removed) == "" and f"deleted session {sid}" in removed.stderr
    assert not ids & {s["id"] for s in json.loads(ok(fam("sessions", "list", "--json")))}


def test_exit_codes(
    fam: Fam, document: Path, make_pdf: Callable, tmp_path: Path, other_key: str, unused_url: str
) -> None:
    session_id = ok(fam("ingest", str(document))).strip()

    missing = fam("sessions", "show", "sess_missing")
    assert missing.returncode == 1 and "session_not_found" in missing.stderr and missing.stdout == ""
    other_owner = fam("ask", session_id, "Hello?", key=other_key)
    assert other_owner.returncode == 1 and "session_not_found" in other_owner.stderr
    for key in (None, "wrong-key"):
        refused = fam("sessions", "list", key=key)
        assert refused.returncode == 1 and "a valid API key is required" in refused.stderr
    garbage = tmp_path / "garbage.famsnap"
    garbage.write_bytes(b"not a snapshot")
    assert "invalid_snapshot" in fam("sessions", "import", str(garbage)).stderr

    before = {s["id"] for s in json.loads(ok(fam("sessions", "list", "--json")))}
    failed = fam("ingest", str(make_pdf([""])))
    assert failed.returncode == 1 and "pdf_no_text" in failed.stderr
    after = {s["id"] for s in json.loads(ok(fam("sessions", "list", "--json")))}
    assert after == before, "the session made for a failed ingest is deleted"

    unreachable = fam("sessions", "list", server=unused_url)
    assert unreachable.returncode == 3 and "cannot connect" in unreachable.stderr
    notes = tmp_path / "notes.docx"
    notes.write_bytes(b"PK")
    for usage in (("ingest", str(notes)), ("ask", session_id), ("sessions", "nope"), ("ingest", "no-such.txt")):
        result = fam(*usage)
        assert result.returncode == 2 and "usage: fam" in result.stderr, usage
