"""``fam``: the command line for a fam-server.

    fam ingest report.pdf                 # new session, progress bar, prints the session id
    fam ask SESSION "What changed in Q3?" # streams the answer
    fam chat SESSION                      # interactive; every turn is committed to the session
    fam sessions list|show ID|rm ID|fork ID|export ID FILE|import FILE

Standard output carries only results (session ids, tables, JSON, answers), so ``SID=$(fam ingest doc.pdf)``
works; progress and confirmations go to standard error.

Exit codes: 0 ok, 1 the server answered with an error, 2 usage error, 3 the server could not be reached,
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import httpx
from tqdm import tqdm

from clients._common import ingest_content_type
from clients.client import Client
from clients.errors import APIConnectionError, FamError
from clients.streams import TextStream
from clients.types import IngestProgress, Sampling, Session

EXIT_OK = 0
EXIT_API_ERROR = 1
EXIT_USAGE = 2  # raised by argparse itself
EXIT_CONNECT = 3
EXIT_INTERRUPTED = 130

MODES = ("fam", "bswa", "sink", "full")

Handler = Callable[[Client, argparse.Namespace], None]


def main(argv: Sequence[str] | None = None, *, transport: httpx.BaseTransport | None = None) -> int:
    """Run the CLI and return its exit code. ``transport`` is handed to the client (tests pass a mock)."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        with Client(args.server, api_key=args.api_key, transport=transport) as client:
            handler(client, args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except APIConnectionError as exc:
        _error(exc.message)
        return EXIT_CONNECT
    except FamError as exc:
        _error(str(exc))
        return EXIT_API_ERROR
    except OSError as exc:
        _error(str(exc))
        return EXIT_API_ERROR
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fam", description="Talk to a fam-server.")
    parser.add_argument(
        "--server", metavar="URL", help="server URL (default: $FAM_SERVER or http://127.0.0.1:8000)"
    )
    parser.add_argument("--api-key", metavar="KEY", help="API key (default: $FAM_API_KEY)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ingest = commands.add_parser("ingest", help="ingest a .pdf, .txt or .md file into a session")
    ingest.add_argument("file", metavar="FILE", type=_ingestable_file)
    target = ingest.add_mutually_exclusive_group()
    target.add_argument("--session", metavar="ID", help="ingest into this session (default: a new one)")
    target.add_argument(
        "--mode", choices=MODES, help="attention mode of the new session (server default: fam with the bundled adapter)"
    )
    ingest.set_defaults(handler=_ingest)

    ask = commands.add_parser("ask", help="ask one question about a session's document; streams the answer")
    ask.add_argument("session", metavar="SESSION")
    ask.add_argument("question", metavar="QUESTION")
    _add_sampling(ask)
    ask.set_defaults(handler=_ask)

    chat = commands.add_parser("chat", help="interactive chat; each turn is committed to the session")
    chat.add_argument("session", metavar="SESSION")
    _add_sampling(chat)
    chat.set_defaults(handler=_chat)

    sessions = commands.add_parser("sessions", help="manage sessions")
    actions = sessions.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="list sessions")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_list)
    show = actions.add_parser("show", help="show one session")
    show.add_argument("id", metavar="ID")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=_show)
    remove = actions.add_parser("rm", help="delete a session")
    remove.add_argument("id", metavar="ID")
    remove.set_defaults(handler=_remove)
    fork = actions.add_parser("fork", help="copy a session; prints the new id")
    fork.add_argument("id", metavar="ID")
    fork.set_defaults(handler=_fork)
    export = actions.add_parser("export", help="save a session's state snapshot to FILE")
    export.add_argument("id", metavar="ID")
    export.add_argument("file", metavar="FILE", type=Path)
    export.set_defaults(handler=_export)
    restore = actions.add_parser("import", help="create a session from a snapshot FILE; prints the new id")
    restore.add_argument("file", metavar="FILE", type=_existing_file)
    restore.set_defaults(handler=_import)
    return parser


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, metavar="N", help="answer length limit in tokens")
    parser.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (0 = greedy)")


def _existing_file(value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {value}")
    return path


def _ingestable_file(value: str) -> Path:
    path = _existing_file(value)
    try:
        ingest_content_type(path)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return path


def _error(message: str) -> None:
    print(f"fam: error: {message}", file=sys.stderr)


# -- ingest


class _ProgressBar:
    """A tqdm bar over tokens (with rate and ETA once the total is known) and a page counter for PDFs."""

    def __init__(self, name: str) -> None:
        self._bar = tqdm(desc=name, unit="tok", unit_scale=True, dynamic_ncols=True, file=sys.stderr)

    def __call__(self, progress: IngestProgress) -> None:
        if self._bar.total != progress.tokens_total:
            self._bar.total = progress.tokens_total
        if progress.pages_total is not None:
            self._bar.set_postfix_str(f"page {progress.pages_done}/{progress.pages_total}", refresh=False)
        self._bar.update(progress.tokens_done - self._bar.n)

    def close(self) -> None:
        self._bar.close()


def _ingest(client: Client, args: argparse.Namespace) -> None:
    created = args.session is None
    session_id = client.create_session(mode=args.mode).id if created else args.session
    try:
        with closing(_ProgressBar(args.file.name)) as bar:
            session = client.ingest_file(session_id, args.file, progress=bar)
    except BaseException:
        if created:
            _discard(client, session_id)
        raise
    print(f"{session.tokens} tokens in session {session.id}", file=sys.stderr)
    print(session.id)


def _discard(client: Client, session_id: str) -> None:
    """Delete the half-filled session a failed ``fam ingest`` created, so it cannot be queried by mistake."""
    try:
        client.delete_session(session_id)
    except FamError:
        print(f"fam: the new session {session_id} holds a partial document; delete it", file=sys.stderr)


# -- generation


def _sampling(args: argparse.Namespace) -> Sampling:
    sampling: Sampling = {}
    if args.max_tokens is not None:
        sampling["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        sampling["temperature"] = args.temperature
    return sampling


def _print_stream(stream: TextStream) -> None:
    with stream:
        for piece in stream:
            print(piece, end="", flush=True)
    print()


def _ask(client: Client, args: argparse.Namespace) -> None:
    message = {"role": "user", "content": args.question}
    _print_stream(client.chat([message], session_id=args.session, stream=True, **_sampling(args)))


def _chat(client: Client, args: argparse.Namespace) -> None:
    """The REPL: one committed chat turn per line until end of input or ``exit``. An API error ends the
    turn, not the REPL; a lost connection ends both."""
    session = client.get_session(args.session)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"session {session.id}: {session.tokens} tokens. Ctrl-D or 'exit' quits.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "").strip()
        except EOFError:
            return
        if line in ("exit", "quit"):
            return
        if not line:
            continue
        message = {"role": "user", "content": line}
        try:
            _print_stream(
                client.chat([message], session_id=session.id, commit=True, stream=True, **_sampling(args))
            )
        except APIConnectionError:
            raise
        except FamError as exc:
            _error(str(exc))


# -- sessions


def _list(client: Client, args: argparse.Namespace) -> None:
    sessions = client.list_sessions()
    if args.json:
        print(json.dumps([asdict(session) for session in sessions], indent=2))
    elif not sessions:
        print("no sessions", file=sys.stderr)
    else:
        rows = [("ID", "MODE", "TOKENS", "STATE", "CREATED (UTC)")]
        rows += [
            (s.id, s.mode, str(s.tokens), _human_bytes(s.state_bytes), _timestamp(s.created))
            for s in sessions
        ]
        widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _show(client: Client, args: argparse.Namespace) -> None:
    session = client.get_session(args.id)
    if args.json:
        print(json.dumps(asdict(session), indent=2))
        return
    for label, value in _describe(session):
        print(f"{label + ':':<13}{value}")


def _describe(session: Session) -> list[tuple[str, str]]:
    return [
        ("id", session.id),
        ("mode", session.mode),
        ("model", session.model),
        ("tokens", str(session.tokens)),
        ("state", f"{_human_bytes(session.state_bytes)} ({session.state_bytes} bytes)"),
        ("created", f"{_timestamp(session.created)} UTC"),
        ("metadata", json.dumps(session.metadata)),
    ]


def _remove(client: Client, args: argparse.Namespace) -> None:
    client.delete_session(args.id)
    print(f"deleted session {args.id}", file=sys.stderr)


def _fork(client: Client, args: argparse.Namespace) -> None:
    print(client.fork_session(args.id).id)


def _export(client: Client, args: argparse.Namespace) -> None:
    snapshot = client.export_state(args.id)
    args.file.write_bytes(snapshot)
    print(f"wrote {len(snapshot)} bytes to {args.file}", file=sys.stderr)


def _import(client: Client, args: argparse.Namespace) -> None:
    print(client.import_state(args.file.read_bytes()).id)


def _human_bytes(count: int) -> str:
    size, unit = float(count), "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, larger
    return f"{count} B" if unit == "B" else f"{size:.1f} {unit}"


def _timestamp(created: int) -> str:
    return datetime.fromtimestamp(created, UTC).strftime("%Y-%m-%d %H:%M:%S")
