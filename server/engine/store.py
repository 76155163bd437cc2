"""Sessions: a cache of session records and states in this process over a `Backend` that keeps their snapshots.

Two backends (`open_backend`): the local data directory (`LocalBackend`, the default: one server owns the
directory) and Redis (`server.engine.redis_store.RedisBackend`, shared by any number of replicas).

Snapshot format (what a backend stores per session and what `GET /v1/sessions/{id}/state` returns):

    b"FAMSNAP1" | HMAC-SHA256(secret, payload) (32 bytes) | payload

The payload is `FamRuntime.state_to_bytes(state, extra={"fam_session": <JSON>})`: safetensors tensors plus
metadata naming the model, adapter and FAM configuration, and the session record (id, mode, creation time,
metadata, token count, chat turn, completed Idempotency-Keys). The HMAC is both the checksum (a torn or
corrupted file fails it) and the signature (a tampered or foreign snapshot fails it).

One writer per session: a job that changes a session first takes its lease from the backend (`acquire`; another
replica holding it means wait), and each commit (`persist`) succeeds only while that lease is current, so a
replica that lost its lease (paused, partitioned) cannot overwrite a newer state. Every commit moves the head to a
new snapshot in one step: a reader sees the old state or the new one, never a mix. The local backend grants every
lease at once (its directory's lock already makes its server the only writer).

The cache holds one `Session` per id. Only the worker thread changes sessions; it refreshes a session from its
head (`refresh`) when no job of this process holds its lease. The event loop reads records (`get`, `list`) to
answer without waiting for the model.
"""

from __future__ import annotations

import copy
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
from typing import Any, Protocol

from model import FamRuntime, FamState, StateMismatchError
from server.engine.chat import Turn
from server.engine.errors import EngineFailure, InvalidSnapshot, LeaseLost, SessionNotFound

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


# ------------------------------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class Head:
    """A session as last committed: its record (`Session.record()`) and how many commits it has had."""

    record: dict[str, Any]
    version: int

    @property
    def id(self) -> str:
        return self.record["id"]


class Lease:
    """The right to commit one session, from `Backend.acquire` until `Backend.release` or until it is `lost`
    (the backend found another holder, or the session gone)."""

    def __init__(self, session_id: str, epoch: int, token: str = ""):
        self.session_id, self.epoch, self.token = session_id, epoch, token
        self.lost = False


class Backend(Protocol):
    """Where sessions live. `shared`: other processes change sessions too (heads are read back, leases are
    real). Every method may raise `StoreUnavailable`; writes may raise `StoreFull`."""

    shared: bool
    description: str  # for logs: where the sessions are

    def head(self, session_id: str) -> Head | None: ...

    def heads(self, owner: str) -> list[Head]: ...

    def count(self) -> int: ...

    def create(self, record: dict[str, Any], blob: bytes) -> Head:
        """A new session (its id is new: a collision is a bug)."""
        ...

    def load(self, session_id: str) -> tuple[Head, bytes]:
        """The head and its snapshot, read together (SessionNotFound if there is none)."""
        ...

    def acquire(self, session_id: str) -> Lease | None:
        """The session's lease, or None while another process holds it (SessionNotFound if there is none)."""
        ...

    def release(self, lease: Lease) -> None: ...

    def commit(self, lease: Lease, base: int, record: dict[str, Any], blob: bytes) -> Head:
        """Move the head to a new snapshot if `lease` is still the session's and the head is still version `base`
        (else LeaseLost; SessionNotFound if it was deleted)."""
        ...

    def delete(self, session_id: str) -> None:
        """Remove the session, whoever holds its lease (that holder's next commit finds it gone)."""
        ...

    def close(self) -> None: ...


class LocalBackend:
    """One snapshot file per session in a directory only this process writes (`server.data_dir` holds its lock).
    Files are written atomically: temp file, fsync, rename, fsync of the directory. The heads are kept in memory,
    read at start from the files' headers (tensors load on first use)."""

    shared = False

    def __init__(self, directory: Path):
        self.dir = directory
        self.description = f"data directory {directory}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._heads: dict[str, Head] = {}
        self._scan()

    def head(self, session_id: str) -> Head | None:
        with self._lock:
            return self._heads.get(session_id)

    def heads(self, owner: str) -> list[Head]:
        with self._lock:
            return [h for h in self._heads.values() if h.record["owner"] == owner]

    def count(self) -> int:
        with self._lock:
            return len(self._heads)

    def create(self, record: dict[str, Any], blob: bytes) -> Head:
        return self._write(Head(record, 0), blob)

    def load(self, session_id: str) -> tuple[Head, bytes]:
        head = self.head(session_id)
        if head is None:
            raise SessionNotFound(session_id)
        try:
            return head, self._path(session_id).read_bytes()
        except OSError as e:
            raise EngineFailure(f"the saved snapshot of session {session_id} cannot be read: {e}") from e

    def acquire(self, session_id: str) -> Lease | None:
        if self.head(session_id) is None:
            raise SessionNotFound(session_id)
        return Lease(session_id, 0)

    def release(self, lease: Lease) -> None:
        pass

    def commit(self, lease: Lease, base: int, record: dict[str, Any], blob: bytes) -> Head:
        head = self.head(lease.session_id)
        if head is None:
            raise SessionNotFound(lease.session_id)
        if head.version != base:
            raise LeaseLost(lease.session_id)  # the head moved since this change began
        return self._write(Head(record, head.version + 1), blob)

    def delete(self, session_id: str) -> None:
        with self._lock:
            self._heads.pop(session_id, None)
        self._path(session_id).unlink(missing_ok=True)

    def close(self) -> None:
        pass

    def _write(self, head: Head, blob: bytes) -> Head:
        try:
            atomic_write(self._path(head.id), blob)
        except OSError as e:
            raise EngineFailure(f"could not save session {head.id}: {e}") from e
        with self._lock:
            self._heads[head.id] = head
        return head

    def _path(self, session_id: str) -> Path:
        return self.dir / f"{session_id}.snap"

    def _scan(self) -> None:
        for tmp in self.dir.glob(".*.tmp"):  # a write interrupted by a crash; the old file is intact
            tmp.unlink(missing_ok=True)
        for path in sorted(self.dir.glob("*.snap")):
            try:
                rec = _read_record(path)
                Session.from_record(rec, 0)  # every field there and of its type
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("skipping unreadable snapshot %s: %s", path, e)
                continue
            if rec["id"] != path.stem:
                log.warning("skipping snapshot %s: it holds session %s", path, rec["id"])
                continue
            self._heads[rec["id"]] = Head(rec, 0)
        if self._heads:
            log.info("found %d saved sessions in %s", len(self._heads), self.dir)


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


def open_backend(data_dir: Path, store_url: str | None, lease_seconds: float) -> Backend:
    """`store_url` None: `data_dir/sessions`; `redis://...`: that Redis (see `server.engine.redis_store`)."""
    if store_url is None:
        return LocalBackend(data_dir / "sessions")
    from server.engine.redis_store import RedisBackend  # redis-py is imported only by servers that use it

    return RedisBackend(store_url, lease_seconds)


# ------------------------------------------------------------------------------------------------- sessions


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
    state: FamState | None = None  # None: not loaded (or spilled); the backend holds it
    version: int = 0  # the head this session is as of (plus `dirty` changes)
    dirty: bool = False  # the state in memory is newer than the head
    deleted: bool = False
    lease: Lease | None = None  # held while a job of this process may change the session
    last_used: float = field(default_factory=time.monotonic)

    @classmethod
    def from_record(cls, rec: dict[str, Any], version: int) -> Session:
        s = cls(id=rec["id"], owner=rec["owner"], mode=rec["mode"], created=int(rec["created"]), metadata={})
        s.apply(rec, version)
        return s

    def apply(self, rec: dict[str, Any], version: int) -> None:
        """Take the record of a newer head (the state is loaded again when next used). The record is copied: jobs
        change a session's idempotency records in place."""
        rec = copy.deepcopy(rec)
        self.metadata, self.tokens, self.state_bytes = rec["metadata"], int(rec["tokens"]), int(rec["state_bytes"])
        self.turn, self.idempotency = Turn(rec["turn"]), OrderedDict(rec["idempotency"])
        self.version, self.state, self.dirty = version, None, False

    def record(self) -> dict[str, Any]:
        """What the snapshot keeps besides the tensors."""
        return {"id": self.id, "owner": self.owner, "mode": self.mode, "created": self.created,
                "metadata": self.metadata, "tokens": self.tokens, "state_bytes": self.state_bytes,
                "turn": str(self.turn), "idempotency": list(self.idempotency.items())}

    def info(self, model: str) -> SessionInfo:
        return SessionInfo(id=self.id, mode=self.mode, model=model, tokens=self.tokens, state_bytes=self.state_bytes,
                           created=self.created, metadata=self.metadata)

    def set_state(self, state: FamState) -> None:
        state = state.compact()  # a state that ends a decode holds views of the executor's shared buffers
        self.state, self.dirty = state, True
        self.tokens, self.state_bytes = int(state.n_tokens[0]), state.nbytes
        self.last_used = time.monotonic()


class SessionStore:
    def __init__(self, rt: FamRuntime, backend: Backend, secret: bytes, memory_budget_bytes: int):
        self.rt, self.backend, self.secret, self.budget = rt, backend, secret, memory_budget_bytes
        self.lock = threading.Lock()
        self._sessions: dict[str, Session] = {}  # the cache (under `lock`)

    # ---------------------------------------------------------------------------------------------- lookup

    def get(self, session_id: str, owner: str) -> Session:
        """The session if it exists and belongs to `owner` (another owner's session does not exist for it).
        Its record may be older than the head until the worker refreshes it (`refresh`)."""
        return self._lookup(session_id, owner)[0]

    def current(self, session_id: str, owner: str) -> Session:
        """The freshest view of a session for answering about it: this process's copy when it is as new as the
        head (it may be newer: an ingest's block commits), else one read from the head."""
        s, head = self._lookup(session_id, owner)
        return s if s.version >= head.version else Session.from_record(head.record, head.version)

    def _lookup(self, session_id: str, owner: str) -> tuple[Session, Head]:
        head = self.backend.head(session_id)
        if head is None or not hmac.compare_digest(head.record["owner"], owner):
            self._forget(session_id)
            raise SessionNotFound(session_id)
        with self.lock:
            s = self._sessions.get(session_id)
            if s is None or s.deleted:
                s = self._sessions[session_id] = Session.from_record(head.record, head.version)
        return s, head

    def list(self, owner: str) -> list[Session]:
        found = []
        for head in self.backend.heads(owner):
            with self.lock:
                s = self._sessions.get(head.id)
            found.append(s if s is not None and not s.deleted and s.version >= head.version
                         else Session.from_record(head.record, head.version))
        return sorted(found, key=lambda s: (s.created, s.id))

    def count(self) -> int:
        return self.backend.count()

    def resident(self) -> list[Session]:
        with self.lock:
            return [s for s in self._sessions.values() if s.state is not None]

    def _forget(self, session_id: str) -> None:
        with self.lock:
            s = self._sessions.pop(session_id, None)
        if s is not None:
            s.deleted = True

    # ---------------------------------------------------------------------------------------------- changes
    # (worker thread only)

    def add(self, session: Session) -> None:
        """Create the session in the backend (its state must be set)."""
        assert session.state is not None
        head = self.backend.create(session.record(), self._snapshot(session.record(), session.state))
        session.version, session.dirty = head.version, False
        with self.lock:
            self._sessions[session.id] = session

    def remove(self, session: Session) -> None:
        self.backend.delete(session.id)
        self._forget(session.id)

    def acquire(self, session: Session) -> bool:
        """Take the session's lease for a job that will change it; False while another process holds it. The
        session is brought up to its head first."""
        if session.lease is not None:
            return True
        try:
            lease = self.backend.acquire(session.id)
        except SessionNotFound:
            self._forget(session.id)
            raise
        if lease is None:
            return False
        try:
            self.refresh(session)
        except BaseException:
            self.backend.release(lease)
            raise
        session.lease = lease
        return True

    def release(self, session: Session) -> None:
        lease, session.lease = session.lease, None
        if lease is not None:
            try:
                self.backend.release(lease)
            except Exception as e:  # it expires on its own
                log.warning("could not release the lease of session %s: %s", session.id, e)

    def lease_lost(self, session: Session) -> bool:
        return session.lease is not None and session.lease.lost

    def refresh(self, session: Session) -> None:
        """Bring a session nobody here is changing up to its head (SessionNotFound if it is gone)."""
        if session.lease is not None:
            return  # while this process holds the lease, nobody else commits: the copy here is the newest
        head = self.backend.head(session.id)
        if head is None:
            self._forget(session.id)
            raise SessionNotFound(session.id)
        if head.version != session.version:
            session.apply(head.record, head.version)

    def persist(self, session: Session) -> None:
        """Commit the session's state (it must be resident and leased) as its new head."""
        if session.deleted or session.state is None:
            return
        if session.lease is None:
            raise LeaseLost(session.id)  # never leased here: nothing may be committed
        try:
            head = self.backend.commit(session.lease, session.version, session.record(),
                                       self._snapshot(session.record(), session.state))
        except SessionNotFound:
            self._forget(session.id)
            raise
        session.version, session.dirty = head.version, False

    def load(self, session: Session) -> FamState:
        """The session's state as of its head (or newer, while a job here changes it)."""
        session.last_used = time.monotonic()
        self.refresh(session)
        if session.state is None:
            head, data = self.backend.load(session.id)
            try:
                state, _ = self.unpack(data)
            except InvalidSnapshot as e:
                raise EngineFailure(f"the saved snapshot of session {session.id} cannot be read: {e}") from e
            if head.version != session.version:
                session.apply(head.record, head.version)
            session.state = state
        return session.state

    def enforce_budget(self, idle: Callable[[str], bool]) -> int:
        """Drop the states of the least recently used sessions that are `idle` (by id: no job waits on them) and
        whose head is current, until the resident states fit the budget. Returns the number dropped."""
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

    def close(self) -> None:
        with self.lock:
            held = [s for s in self._sessions.values() if s.lease is not None]
        for s in held:
            self.release(s)
        self.backend.close()

    # ---------------------------------------------------------------------------------------------- snapshots

    def _snapshot(self, record: dict[str, Any], state: FamState) -> bytes:
        return self.sign(self.rt.state_to_bytes(state, extra={SESSION_KEY: json.dumps(record)}))

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
        return self._snapshot({**session.record(), "owner": "", "idempotency": []}, state)
