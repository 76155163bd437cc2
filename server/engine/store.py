"""Sessions in memory, each backed by a signed snapshot file; idle sessions spill to disk under a memory budget.

Snapshot format (the bytes on disk and the bytes `GET /v1/sessions/{id}/state` returns):

    b"FAMSNAP1" | HMAC-SHA256(secret, payload) (32 bytes) | payload

The payload is `FamRuntime.state_to_bytes(state, extra={"fam_session": <JSON>})`: safetensors tensors plus
metadata naming the model, adapter and FAM configuration, and the session record (id, mode, creation time,
metadata, token count, chat turn, completed Idempotency-Keys). The HMAC is both the checksum (a torn or
corrupted file fails it) and the signature (a tampered or foreign snapshot fails it). Files are written
atomically: temp file, fsync, rename, fsync of the directory.

Only the worker thread changes sessions and touches files; the event loop reads session records (under
`lock`) to answer list/get without waiting for the model.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import struct
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from hashlib import sha256
from pathlib import Path
from typing import Any

from model import FamRuntime, FamState, StateMismatchError
from server.engine.chat import Turn
from server.engine.errors import EngineFailure, InvalidSnapshot, SessionNotFound

log = logging.getLogger(__name__)

MAGIC = b"FAMSNAP1"
MAC_BYTES = 32
SESSION_KEY = "fam_session"  # safetensors metadata key holding the session record


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def new_session_id() -> str:
    return "sess_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class SessionInfo:
    """What the engine tells about a session (the HTTP layer turns it into the API's session object)."""

    id: str
    mode: str
    model: str  # the model that holds its state
    tokens: int
    state_bytes: int
    created: int
    metadata: dict[str, Any]

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SessionInfo:
        """From its fields as stored in an idempotency record (older snapshots stored the API object, a superset)."""
        return cls(**{f.name: record[f.name] for f in fields(cls)})


@dataclass
class Session:
    id: str
    owner: str  # hash of the API key that created it ("" without authentication)
    mode: str
    created: int
    metadata: dict[str, Any]
    tokens: int = 0
    state_bytes: int = 0
    turn: Turn = Turn.NONE
    # Idempotency-Key -> {"digest", "status": "partial" | "done", "doc_tokens_done", "result": SessionInfo fields};
    # oldest first
    idempotency: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)
    state: FamState | None = None  # None: spilled; the snapshot file holds it
    dirty: bool = False  # the state in memory is newer than the file
    deleted: bool = False
    last_used: float = field(default_factory=time.monotonic)

    def record(self) -> dict[str, Any]:
        """What the snapshot file keeps besides the tensors."""
        return {"id": self.id, "owner": self.owner, "mode": self.mode, "created": self.created,
                "metadata": self.metadata, "tokens": self.tokens, "state_bytes": self.state_bytes,
                "turn": str(self.turn), "idempotency": list(self.idempotency.items())}

    def info(self, model: str) -> SessionInfo:
        return SessionInfo(id=self.id, mode=self.mode, model=model, tokens=self.tokens, state_bytes=self.state_bytes,
                           created=self.created, metadata=self.metadata)

    def set_state(self, state: FamState) -> None:
        self.state, self.dirty = state, True
        self.tokens, self.state_bytes = int(state.n_tokens[0]), state.nbytes
        self.last_used = time.monotonic()


class SessionStore:
    def __init__(self, rt: FamRuntime, data_dir: Path, secret: bytes, memory_budget_bytes: int):
        self.rt, self.secret, self.budget = rt, secret, memory_budget_bytes
        self.dir = data_dir / "sessions"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._scan()

    # ---------------------------------------------------------------------------------------------- lookup

    def get(self, session_id: str, owner: str) -> Session:
        """The session if it exists and belongs to `owner` (another owner's session does not exist for it)."""
        with self.lock:
            s = self._sessions.get(session_id)
        if s is None or s.deleted or not hmac.compare_digest(s.owner, owner):
            raise SessionNotFound(session_id)
        return s

    def list(self, owner: str) -> list[Session]:
        with self.lock:
            found = [s for s in self._sessions.values() if s.owner == owner and not s.deleted]
        return sorted(found, key=lambda s: (s.created, s.id))

    def count(self) -> int:
        with self.lock:
            return len(self._sessions)

    def all(self) -> list[Session]:
        with self.lock:
            return list(self._sessions.values())

    def resident(self) -> list[Session]:
        with self.lock:
            return [s for s in self._sessions.values() if s.state is not None]

    # ---------------------------------------------------------------------------------------------- changes
    # (worker thread only)

    def add(self, session: Session) -> None:
        with self.lock:
            self._sessions[session.id] = session
        self.persist(session)

    def remove(self, session: Session) -> None:
        session.deleted = True
        with self.lock:
            self._sessions.pop(session.id, None)
        self._path(session.id).unlink(missing_ok=True)

    def persist(self, session: Session) -> None:
        """Write the session's snapshot (its state must be resident)."""
        if session.deleted or session.state is None:
            return
        data = self.sign(self.rt.state_to_bytes(session.state, extra={SESSION_KEY: json.dumps(session.record())}))
        try:
            atomic_write(self._path(session.id), data)
        except OSError as e:
            raise EngineFailure(f"could not save session {session.id}: {e}") from e
        session.dirty = False

    def load(self, session: Session) -> FamState:
        """The session's state, read back from its snapshot if it was spilled."""
        session.last_used = time.monotonic()
        if session.state is None:
            try:
                data = self._path(session.id).read_bytes()
                session.state, _ = self.unpack(data)
            except (OSError, InvalidSnapshot) as e:
                raise EngineFailure(f"the saved snapshot of session {session.id} cannot be read: {e}") from e
        return session.state

    def enforce_budget(self, idle: Callable[[str], bool]) -> int:
        """Spill the least recently used sessions that are `idle` (by id: no job waits on them) and whose file is
        current, until the resident states fit the budget. Returns the number spilled."""
        resident = sorted(self.resident(), key=lambda s: s.last_used)
        total = sum(s.state_bytes for s in resident)
        spilled = 0
        for s in resident:
            if total <= self.budget:
                break
            if s.dirty or not idle(s.id):
                continue
            s.state = None
            total -= s.state_bytes
            spilled += 1
        return spilled

    # ---------------------------------------------------------------------------------------------- snapshots

    def sign(self, payload: bytes) -> bytes:
        return MAGIC + hmac.new(self.secret, payload, sha256).digest() + payload

    def verify(self, data: bytes) -> bytes:
        """The payload of a snapshot signed with this server's secret."""
        if not data.startswith(MAGIC) or len(data) < len(MAGIC) + MAC_BYTES:
            raise InvalidSnapshot("not a fam-server snapshot (missing FAMSNAP1 header)")
        mac, payload = data[len(MAGIC):len(MAGIC) + MAC_BYTES], data[len(MAGIC) + MAC_BYTES:]
        if not hmac.compare_digest(mac, hmac.new(self.secret, payload, sha256).digest()):
            raise InvalidSnapshot("snapshot signature does not verify: it was altered, or signed by a server "
                                  "with another secret (FAM_SECRET)")
        return payload

    def unpack(self, data: bytes) -> tuple[FamState, dict[str, Any]]:
        """Verify and decode a snapshot -> (state, session record)."""
        try:
            state, meta = self.rt.state_from_bytes(self.verify(data))
            return state, json.loads(meta[SESSION_KEY])
        except StateMismatchError as e:
            raise InvalidSnapshot(str(e)) from e
        except (KeyError, ValueError, OSError) as e:  # signed by us, so only a bug or a format change gets here
            raise InvalidSnapshot(f"snapshot payload cannot be decoded: {type(e).__name__}: {e}") from e

    def export(self, session: Session, state: FamState) -> bytes:
        """A snapshot for a client: the session record without owner and idempotency keys."""
        record = {**session.record(), "owner": "", "idempotency": []}
        return self.sign(self.rt.state_to_bytes(state, extra={SESSION_KEY: json.dumps(record)}))

    # ---------------------------------------------------------------------------------------------- startup

    def _path(self, session_id: str) -> Path:
        return self.dir / f"{session_id}.snap"

    def _scan(self) -> None:
        """Register every snapshot in the data directory as a spilled session (tensors load on first use)."""
        for tmp in self.dir.glob(".*.tmp"):  # a write interrupted by a crash; the old file is intact
            tmp.unlink(missing_ok=True)
        for path in sorted(self.dir.glob("*.snap")):
            try:
                rec = _read_record(path)
                s = Session(id=rec["id"], owner=rec["owner"], mode=rec["mode"], created=int(rec["created"]),
                            metadata=rec["metadata"], tokens=int(rec["tokens"]), state_bytes=int(rec["state_bytes"]),
                            turn=Turn(rec["turn"]), idempotency=OrderedDict(rec["idempotency"]))
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("skipping unreadable snapshot %s: %s", path, e)
                continue
            if s.id != path.stem:
                log.warning("skipping snapshot %s: it holds session %s", path, s.id)
                continue
            self._sessions[s.id] = s
        if self._sessions:
            log.info("found %d saved sessions in %s", len(self._sessions), self.dir)


def _read_record(path: Path) -> dict[str, Any]:
    """The session record from a snapshot file's safetensors header, without reading the tensors (the
    signature is checked when the state is loaded)."""
    with path.open("rb") as f:
        head = f.read(len(MAGIC) + MAC_BYTES + 8)
        if len(head) < len(MAGIC) + MAC_BYTES + 8 or not head.startswith(MAGIC):
            raise ValueError("not a snapshot file")
        (n,) = struct.unpack("<Q", head[-8:])
        if n > 100_000_000:
            raise ValueError("bad safetensors header length")
        header = json.loads(f.read(n))
    return json.loads(header["__metadata__"][SESSION_KEY])
