"""The session store's contract, one suite over both backends (the local data dir and a real Redis), then what only
a shared store has: leases, epochs and the compare-and-set commit, with two replicas in one process."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from model import FamRuntime
from server.engine.errors import LeaseLost, SessionNotFound, StoreFull
from server.engine.redis_store import RedisBackend
from server.engine.store import LocalBackend, Session, SessionStore, new_session_id

SECRET = b"store-test"


def words(rt: FamRuntime, n: int, offset: int = 0) -> list[int]:
    base = rt.encode(" alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu")
    return [base[(i + offset) % len(base)] for i in range(n)]


def grown(rt: FamRuntime, state, n: int, offset: int = 0):
    with torch.inference_mode():
        return rt.ingest(state, words(rt, n, offset))[0]


def same_state(a, b) -> bool:
    tensors = lambda s: [*s.k, *s.v, s.fam, s.base, s.n_tokens]
    return (a.n_block, a.n_sinks) == (b.n_block, b.n_sinks) and all(
        torch.equal(x, y) for x, y in zip(tensors(a), tensors(b), strict=True))


class Stores:
    """Builds stores over one backend's storage: `open()` is another server (another replica over Redis; the
    next server over the same directory for the local backend)."""

    def __init__(self, kind: str, rt: FamRuntime, where: Path | str, lease_seconds: float = 5.0):
        self.kind, self.rt, self.where, self.lease_seconds = kind, rt, where, lease_seconds
        self.opened: list[SessionStore] = []

    def open(self) -> SessionStore:
        if self.kind == "local":
            backend = LocalBackend(Path(self.where))
        else:
            backend = RedisBackend(str(self.where), self.lease_seconds, check_config=False)
        store = SessionStore(self.rt, backend, SECRET, 2**30)
        self.opened.append(store)
        return store

    def close(self) -> None:
        for s in self.opened:
            s.close()


@pytest.fixture(params=["local", "redis"])
def stores(request, tmp_path, tiny_runtime):
    where = tmp_path / "sessions" if request.param == "local" else request.getfixturevalue("redis_url")
    s = Stores(request.param, tiny_runtime, where)
    yield s
    s.close()


def new_session(store: SessionStore, owner: str = "alice", **meta) -> Session:
    s = Session(id=new_session_id(), owner=owner, mode="fam", created=int(time.time()), metadata=meta)
    s.set_state(store.rt.new_state(mode="fam"))
    store.add(s)
    return s


def commit(store: SessionStore, s: Session, state) -> None:
    assert store.acquire(s)
    try:
        s.set_state(state)
        store.persist(s)
    finally:
        store.release(s)


# ------------------------------------------------------------------------------------------------- the contract


def test_create_commit_load(stores):
    a = stores.open()
    s = new_session(a, topic="storms")
    state = grown(a.rt, a.load(s), 40)
    commit(a, s, state)
    b = stores.open()
    seen = b.get(s.id, "alice")
    assert (seen.tokens, seen.metadata, seen.mode) == (40, {"topic": "storms"}, "fam")
    assert same_state(b.load(seen), state)


def test_each_commit_moves_the_head(stores):
    a = stores.open()
    s = new_session(a)
    states = []
    for i in range(3):
        states.append(grown(a.rt, a.load(s), 8, offset=i))
        commit(a, s, states[-1])
    b = stores.open()
    assert same_state(b.load(b.get(s.id, "alice")), states[-1])
    assert b.get(s.id, "alice").tokens == 24


def test_fork_is_independent(stores):
    a = stores.open()
    src = new_session(a)
    commit(a, src, grown(a.rt, a.load(src), 20))
    fork = Session(id=new_session_id(), owner="alice", mode=src.mode, created=src.created, metadata={"fork": 1})
    fork.set_state(a.load(src))
    a.add(fork)
    commit(a, fork, grown(a.rt, a.load(fork), 5))
    a.remove(src)
    b = stores.open()
    with pytest.raises(SessionNotFound):
        b.get(src.id, "alice")
    assert b.get(fork.id, "alice").tokens == 25


def test_delete(stores):
    a = stores.open()
    s = new_session(a)
    a.remove(s)
    with pytest.raises(SessionNotFound):
        a.get(s.id, "alice")
    b = stores.open()
    with pytest.raises(SessionNotFound):
        b.get(s.id, "alice")
    assert b.list("alice") == [] and b.count() == 0


def test_list_by_owner(stores):
    a = stores.open()
    mine = [new_session(a, "alice", n=i).id for i in range(3)]
    theirs = new_session(a, "bob").id
    b = stores.open()
    assert sorted(x.id for x in b.list("alice")) == sorted(mine)
    assert [x.id for x in b.list("bob")] == [theirs]
    assert b.count() == 4
    with pytest.raises(SessionNotFound):
        b.get(theirs, "alice")  # another owner's session does not exist for alice


# ------------------------------------------------------------------------------------------------- Redis only


@pytest.fixture
def replicas(redis_url, tiny_runtime):
    s = Stores("redis", tiny_runtime, redis_url, lease_seconds=0.6)
    yield s
    s.close()


def test_one_lease_at_a_time_and_epochs_increase(replicas):
    a, b = replicas.open(), replicas.open()
    s = new_session(a)
    assert a.acquire(s)
    sb = b.get(s.id, "alice")
    assert not b.acquire(sb)  # held by a
    time.sleep(1.0)  # a's renewer keeps it past the lease time
    assert not b.acquire(sb)
    epoch = s.lease.epoch
    a.release(s)
    assert b.acquire(sb) and sb.lease.epoch == epoch + 1


def test_a_replica_that_lost_its_lease_cannot_overwrite_a_newer_state(replicas):
    a, b = replicas.open(), replicas.open()
    s = new_session(a)
    assert a.acquire(s)
    a.backend._closing.set()  # a is paused: it stops renewing, its lease expires
    time.sleep(0.8)
    sb = b.get(s.id, "alice")
    assert b.acquire(sb)
    newer = grown(b.rt, b.load(sb), 12)
    sb.set_state(newer)
    b.persist(sb)
    s.set_state(grown(a.rt, a.load(s), 30))  # a wakes up and commits what it computed
    with pytest.raises(LeaseLost):
        a.persist(s)
    c = replicas.open()
    assert same_state(c.load(c.get(s.id, "alice")), newer)


def test_two_commits_from_the_same_epoch_exactly_one_wins(replicas):
    """Two replicas hold the same lease (same epoch: a replica and its clone resumed from one pause) and commit
    different states at once: one commit wins, the other gets LeaseLost, the head is exactly the winner's."""
    a, b = replicas.open(), replicas.open()
    s = new_session(a)
    assert a.acquire(s)
    sb = b.get(s.id, "alice")
    b.refresh(sb)
    sb.lease = s.lease  # the clone
    states = {"a": grown(a.rt, a.load(s), 16), "b": grown(b.rt, b.load(sb), 24, offset=5)}
    s.set_state(states["a"])
    sb.set_state(states["b"])
    barrier, outcome = threading.Barrier(2), {}

    def go(name, store, session):
        barrier.wait()
        try:
            store.persist(session)
            outcome[name] = "won"
        except LeaseLost:
            outcome[name] = "lost"

    threads = [threading.Thread(target=go, args=args) for args in (("a", a, s), ("b", b, sb))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcome.values()) == ["lost", "won"]
    winner = next(k for k, v in outcome.items() if v == "won")
    c = replicas.open()
    seen = c.get(s.id, "alice")
    assert seen.tokens == int(states[winner].n_tokens[0])
    assert same_state(c.load(seen), states[winner])
    assert c.backend.head(s.id).version == 1


def test_delete_from_another_replica_stops_the_holder(replicas):
    a, b = replicas.open(), replicas.open()
    s = new_session(a)
    assert a.acquire(s)
    b.remove(b.get(s.id, "alice"))
    s.set_state(grown(a.rt, a.load(s), 8))
    with pytest.raises(SessionNotFound):
        a.persist(s)


def test_a_reader_sees_the_newest_commit(replicas):
    a, b = replicas.open(), replicas.open()
    s = new_session(a)
    sb = b.get(s.id, "alice")
    assert int(b.load(sb).n_tokens[0]) == 0  # b caches the empty state
    newer = grown(a.rt, a.load(s), 10)
    commit(a, s, newer)
    assert b.current(s.id, "alice").tokens == 10
    assert same_state(b.load(sb), newer)  # the cache is keyed by the head's version


def test_a_full_redis_refuses_clearly_and_keeps_what_it_has(redis_factory, tiny_runtime):
    stores = Stores("redis", tiny_runtime, redis_factory(maxmemory="2mb").url)
    try:
        a = stores.open()
        kept = []
        with pytest.raises(StoreFull, match="full"):
            for _ in range(10_000):
                kept.append(new_session(a))
        assert kept, "the first session already did not fit"
        b = stores.open()
        assert b.count() == len(kept)
        assert same_state(b.load(b.get(kept[0].id, "alice")), a.rt.new_state(mode="fam"))
        for s in kept[1:len(kept) // 2]:  # room again (Redis refuses writes while above maxmemory)
            a.remove(s)
        new_session(a)
    finally:
        stores.close()


def test_a_redis_that_evicts_or_is_unreachable_is_refused(redis_factory, caplog):
    from server.engine.errors import StoreUnavailable

    with pytest.raises(RuntimeError, match="noeviction"):
        RedisBackend(redis_factory(**{"maxmemory-policy": "allkeys-lru"}).url, 1.0)
    RedisBackend(redis_factory().url, 1.0).close()  # noeviction: fine, but no persistence is worth a warning
    assert "no persistence" in caplog.text
    gone = redis_factory()
    gone.stop()
    with pytest.raises(StoreUnavailable, match="cannot be reached"):
        RedisBackend(gone.url, 1.0)
