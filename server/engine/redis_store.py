"""Sessions in Redis, shared by every replica that points at it (`--store redis://host:port/db`), through redis-py.

Keys, per session (the `{id}` hash tag keeps a session's keys in one slot):

    fam:{id}:head     hash: owner, rec (the session record, JSON), version (commits so far), epoch (leases granted
                      so far), blob (the key of the current snapshot)
    fam:{id}:blob:<n> the signed snapshot bytes (`server.engine.store`), one key per commit
    fam:{id}:lease    "<replica>:<epoch>" while a replica may change the session; expires after the lease time
                      unless its holder renews it
    fam:owner:<owner> set of the ids an owner (API key hash) has;  fam:sessions  set of every id

A commit writes the new snapshot under a fresh key first (with an expiry, so a replica that dies in between leaves
no garbage), then one Lua script checks that the committer's lease is the session's current one (same replica,
same epoch) and that the head is still the version the change started from, and moves the head to the new key,
deleting the old snapshot. A snapshot key is never rewritten, so a reader that reads the head and then the
snapshot it names never sees a half-written state, and a replica that lost its lease (paused past it, partitioned)
cannot overwrite a state committed after it.

Redis must keep every session: over a Redis whose `maxmemory-policy` evicts keys the engine does not start
(`/health` says why), and a write refused for memory (noeviction at maxmemory) is a `StoreFull` error for that
request, with every committed session intact. Not for Redis Cluster: the owner and session sets are single keys.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
import redis.exceptions

from server.engine.errors import LeaseLost, SessionNotFound, StoreFull, StoreUnavailable
from server.engine.store import Head, Lease

log = logging.getLogger(__name__)

PREFIX = "fam:"
ORPHAN_MS = 3_600_000  # a snapshot written but never committed (its writer died) expires after an hour
EVICTING = ("allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru", "volatile-lfu", "volatile-random",
            "volatile-ttl")

# KEYS: head, blob, owner set, all set   ARGV: id, owner, record
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[1], 'blob') == KEYS[2] then return 1 end  -- a retried create that had succeeded
  return 0
end
if redis.call('EXISTS', KEYS[2]) == 0 then return -3 end
redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'rec', ARGV[3], 'version', 0, 'epoch', 0, 'blob', KEYS[2])
redis.call('PERSIST', KEYS[2])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
return 1
"""

# KEYS: head, lease   ARGV: replica, lease ms   -> epoch, 0 (held by another), -1 (no session)
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('SET', KEYS[2], ARGV[1] .. ':' .. epoch, 'PX', ARGV[2])
return epoch
"""

# KEYS: lease   ARGV: token, lease ms
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: lease   ARGV: token
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: head, lease, new blob   ARGV: token, epoch, record, base version   -> new version, -1 (no session),
# -2 (lease lost, or the head moved since `base version`), -3 (the new snapshot is missing)
_COMMIT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('GET', KEYS[2]) ~= ARGV[1] or redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[2] then return -2 end
if redis.call('HGET', KEYS[1], 'version') ~= ARGV[4] then return -2 end
if redis.call('EXISTS', KEYS[3]) == 0 then return -3 end
local old = redis.call('HGET', KEYS[1], 'blob')
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'rec', ARGV[3], 'blob', KEYS[3])
redis.call('PERSIST', KEYS[3])
if old and old ~= KEYS[3] then redis.call('DEL', old) end
return version
"""

# KEYS: head, lease, owner set, all set   ARGV: id
_DELETE = """
local blob = redis.call('HGET', KEYS[1], 'blob')
if blob then redis.call('DEL', blob) end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('SREM', KEYS[4], ARGV[1])
return 1
"""


def _key(session_id: str, part: str) -> str:
    return f"{PREFIX}{{{session_id}}}:{part}"


def _owner_key(owner: str) -> str:
    return f"{PREFIX}owner:{owner}"


ALL_KEY = f"{PREFIX}sessions"


@contextmanager
def _errors(what: str) -> Iterator[None]:
    """redis-py's exceptions -> the engine's: a full Redis is StoreFull, an unreachable one StoreUnavailable."""
    try:
        yield
    except redis.exceptions.OutOfMemoryError as e:
        raise StoreFull(f"the session store (Redis) is full, so {what} was refused; nothing saved before is lost. "
                        "Delete sessions, or give Redis more memory (maxmemory)") from e
    except redis.exceptions.ResponseError as e:
        if "OOM" in str(e):  # a write inside a script refused for memory
            raise StoreFull(f"the session store (Redis) is full, so {what} was refused; nothing saved before is "
                            "lost. Delete sessions, or give Redis more memory (maxmemory)") from e
        raise
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
        raise StoreUnavailable(f"the session store (Redis) cannot be reached ({e}); {what} did not happen") from e


class RedisBackend:
    """A `server.engine.store.Backend` in Redis. Leases last `lease_seconds` and are renewed by a thread every
    third of that while held; a lease whose renewal finds another holder (or none) is marked lost."""

    shared = True

    def __init__(self, url: str, lease_seconds: float, *, check_config: bool = True):
        self.client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self.description = f"Redis at {self.client.connection_pool.connection_kwargs.get('host', url)}"
        self.replica = uuid.uuid4().hex[:16]  # this process: lease tokens name it
        self.lease_ms = max(1, int(lease_seconds * 1000))
        self._create, self._acquire, self._renew, self._release, self._commit, self._delete = (
            self.client.register_script(s) for s in (_CREATE, _ACQUIRE, _RENEW, _RELEASE, _COMMIT, _DELETE))
        with _errors("the start-up check"):
            self.client.ping()
            if check_config:
                self._check_config()
        self._held: dict[str, Lease] = {}  # session id -> lease (under _lock)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._renewer = threading.Thread(target=self._renew_loop, name="fam-lease-renewer", daemon=True)
        self._renewer.start()

    def _check_config(self) -> None:
        try:
            policy = self.client.config_get("maxmemory-policy").get("maxmemory-policy")
            persistence = self.client.config_get("appendonly").get("appendonly"), self.client.config_get("save")
        except redis.exceptions.ResponseError as e:  # CONFIG disabled (managed Redis): the operator's word
            log.warning("cannot read the Redis configuration (%s): make sure maxmemory-policy is noeviction", e)
            return
        if policy in EVICTING:
            raise RuntimeError(f"Redis evicts keys (maxmemory-policy {policy}): it would drop sessions silently. "
                               "Set maxmemory-policy noeviction (docker/compose.cluster.yaml does)")
        appendonly, save = persistence
        if appendonly != "yes" and not save.get("save"):
            log.warning("Redis has no persistence (appendonly no, no save points): a Redis restart loses every "
                        "session")

    # ---------------------------------------------------------------------------------------------- reads

    def head(self, session_id: str) -> Head | None:
        with _errors("reading the session"):
            rec, version = self.client.hmget(_key(session_id, "head"), "rec", "version")
        return None if rec is None else Head(json.loads(rec), int(version))

    def heads(self, owner: str) -> list[Head]:
        with _errors("listing sessions"):
            ids = sorted(m.decode() for m in self.client.smembers(_owner_key(owner)))
            pipe = self.client.pipeline(transaction=False)
            for sid in ids:
                pipe.hmget(_key(sid, "head"), "rec", "version")
            rows = pipe.execute()
        return [Head(json.loads(rec), int(version)) for rec, version in rows if rec is not None]

    def count(self) -> int:
        with _errors("counting sessions"):
            return int(self.client.scard(ALL_KEY))

    def load(self, session_id: str) -> tuple[Head, bytes]:
        """The head, then the snapshot it names. A snapshot key is written once and never changed, so the pair is
        consistent; if a commit deleted that snapshot in between, the head is read again. (Not one Lua script:
        copying the snapshot through Lua makes a load several times slower.)"""
        with _errors("loading the session"):
            while True:
                rec, version, key = self.client.hmget(_key(session_id, "head"), "rec", "version", "blob")
                if rec is None:
                    raise SessionNotFound(session_id)
                blob = self.client.get(key)
                if blob is not None:
                    return Head(json.loads(rec), int(version)), blob

    # ---------------------------------------------------------------------------------------------- writes

    def _put_blob(self, session_id: str, blob: bytes, what: str) -> str:
        key = _key(session_id, f"blob:{uuid.uuid4().hex[:12]}")
        with _errors(what):
            self.client.set(key, blob, px=ORPHAN_MS)
        return key

    def create(self, record: dict[str, Any], blob: bytes) -> Head:
        sid = record["id"]
        key = self._put_blob(sid, blob, "creating the session")
        with _errors("creating the session"):
            done = self._create(keys=[_key(sid, "head"), key, _owner_key(record["owner"]), ALL_KEY],
                                args=[sid, record["owner"], json.dumps(record)])
        if done != 1:
            self._drop(key)
            raise RuntimeError(f"session id {sid} exists already" if done == 0 else "the snapshot vanished")
        return Head(record, 0)

    def commit(self, lease: Lease, base: int, record: dict[str, Any], blob: bytes) -> Head:
        sid = lease.session_id
        if lease.lost:
            raise LeaseLost(sid)
        key = self._put_blob(sid, blob, "saving the session")
        with _errors("saving the session"):
            version = self._commit(keys=[_key(sid, "head"), _key(sid, "lease"), key],
                                   args=[lease.token, lease.epoch, json.dumps(record), base])
        if version < 0:
            self._drop(key)
            if version == -1:
                raise SessionNotFound(sid)
            lease.lost = True
            raise LeaseLost(sid)
        return Head(record, int(version))

    def delete(self, session_id: str) -> None:
        head = self.head(session_id)
        if head is None:
            return
        with _errors("deleting the session"):
            self._delete(keys=[_key(session_id, "head"), _key(session_id, "lease"),
                               _owner_key(head.record["owner"]), ALL_KEY], args=[session_id])

    def _drop(self, key: str) -> None:
        try:
            self.client.delete(key)
        except redis.exceptions.RedisError:
            pass  # it expires on its own

    # ---------------------------------------------------------------------------------------------- leases

    def acquire(self, session_id: str) -> Lease | None:
        with _errors("taking the session's lease"):
            epoch = int(self._acquire(keys=[_key(session_id, "head"), _key(session_id, "lease")],
                                      args=[self.replica, self.lease_ms]))
        if epoch < 0:
            raise SessionNotFound(session_id)
        if epoch == 0:
            return None
        lease = Lease(session_id, epoch, f"{self.replica}:{epoch}")
        with self._lock:
            self._held[session_id] = lease
        return lease

    def release(self, lease: Lease) -> None:
        with self._lock:
            if self._held.get(lease.session_id) is lease:
                del self._held[lease.session_id]
        if not lease.lost:
            with _errors("releasing the session's lease"):
                self._release(keys=[_key(lease.session_id, "lease")], args=[lease.token])

    def _renew_loop(self) -> None:
        while not self._closing.wait(self.lease_ms / 3000):
            with self._lock:
                held = list(self._held.values())
            for lease in held:
                try:
                    ok = self._renew(keys=[_key(lease.session_id, "lease")], args=[lease.token, self.lease_ms])
                except redis.exceptions.RedisError as e:  # retried next round; the commit's check is what counts
                    log.warning("could not renew the lease of session %s: %s", lease.session_id, e)
                    continue
                if not ok:
                    log.warning("lost the lease of session %s", lease.session_id)
                    lease.lost = True
                    with self._lock:
                        self._held.pop(lease.session_id, None)

    def close(self) -> None:
        self._closing.set()
        self._renewer.join(timeout=5)
        self.client.close()
