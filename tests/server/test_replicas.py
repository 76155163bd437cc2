"""Two engines over one Redis, in one process: any replica serves any session, changes to one session queue behind
the replica that holds its lease, and a retried Idempotency-Key replays or resumes on another replica."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from server.engine import Engine, EngineConfig, Failed, Progress
from server.engine.errors import SessionBusy, SessionNotFound
from tests.server.test_engine import doc_of, next_token_logits, prefix_ids, session_state, started, words

BLOCK = 16  # tiny_runtime's block size


def replica(rt, tmp_path: Path, redis_url: str, name: str, **kw) -> Engine:
    cfg = EngineConfig(data_dir=tmp_path / name, secret=b"shared", store_url=redis_url, checkpoint_seconds=0.01,
                       lease_seconds=1.0, **kw)
    return Engine(rt, cfg)


def reference_logits(rt, ids: list[int]):
    with torch.inference_mode():
        state, _ = rt.ingest(rt.new_state(mode="sink"), ids)
    return next_token_logits(rt, state)


def test_any_replica_serves_any_session(tmp_path, tiny_runtime, redis_url):
    doc = words(3 * BLOCK + 5, tiny_runtime)

    async def main():
        a = await started(replica(tiny_runtime, tmp_path, redis_url, "a"))
        b = await started(replica(tiny_runtime, tmp_path, redis_url, "b"))
        sid = (await a.create_session("", None, {"by": "a"})).id
        await b.ingest("", sid, doc_of(doc), None).result()
        seen = a.get_session("", sid), [s.id for s in a.list_sessions("")]
        fork = await a.fork("", sid).result()
        on_b = await session_state(b, fork.id)
        await b.delete_session("", sid)
        with pytest.raises(SessionNotFound):
            a.get_session("", sid)
        pre = prefix_ids(a)
        await a.stop()
        await b.stop()
        return seen, fork, on_b, pre

    (info, listed), fork, state, pre = asyncio.run(main())
    assert info.tokens == len(pre) + len(doc) and info.metadata == {"by": "a"} and listed == [info.id]
    assert fork.tokens == info.tokens
    torch.testing.assert_close(next_token_logits(tiny_runtime, state), reference_logits(tiny_runtime, pre + doc))


def test_changes_from_two_replicas_queue_behind_the_lease(tmp_path, tiny_runtime, redis_url):
    d1, d2 = words(30 * BLOCK, tiny_runtime), words(2 * BLOCK + 3, tiny_runtime, offset=3)

    async def main():
        a = await started(replica(tiny_runtime, tmp_path, redis_url, "a"))
        b = await started(replica(tiny_runtime, tmp_path, redis_url, "b"))
        sid = (await a.create_session("", None, {})).id
        first = a.ingest("", sid, doc_of(d1), None)
        async for event in first.events():  # a holds the lease now
            if isinstance(event, Progress):
                break
        second = b.ingest("", sid, doc_of(d2), None)
        r2 = await second.result()
        r1 = await first.result()
        state = await session_state(a, sid)
        pre = prefix_ids(a)
        await a.stop()
        await b.stop()
        return r1, r2, state, pre

    r1, r2, state, pre = asyncio.run(main())
    assert r1.tokens == len(pre) + len(d1) and r2.tokens == r1.tokens + len(d2)  # b ran after a, on a's result
    torch.testing.assert_close(next_token_logits(tiny_runtime, state), reference_logits(tiny_runtime, pre + d1 + d2))


def test_a_change_that_waits_too_long_is_refused_as_busy(tmp_path, tiny_runtime, redis_url):
    async def main():
        a = await started(replica(tiny_runtime, tmp_path, redis_url, "a"))
        b = await started(replica(tiny_runtime, tmp_path, redis_url, "b", lease_wait_seconds=0.2))
        sid = (await a.create_session("", None, {})).id
        first = a.ingest("", sid, doc_of(words(400 * BLOCK, tiny_runtime)), None)
        async for event in first.events():
            if isinstance(event, Progress):
                break
        with pytest.raises(SessionBusy) as busy:
            await b.ingest("", sid, doc_of(words(5, tiny_runtime)), None).result()
        first.cancel()
        events = [event async for event in first.events()]
        assert isinstance(events[-1], Failed)
        before = b.get_session("", sid).tokens
        after = await b.ingest("", sid, doc_of(words(5, tiny_runtime)), None).result()  # the lease is free again
        await a.stop()
        await b.stop()
        return busy.value, before, after

    busy, before, after = asyncio.run(main())
    assert busy.retry_after >= 1 and "another server" in busy.message
    assert before > 0 and after.tokens >= before + 5


def test_a_retried_key_resumes_on_another_replica(tmp_path, tiny_runtime, redis_url):
    doc = words(20 * BLOCK + 7, tiny_runtime)

    async def main():
        a = await started(replica(tiny_runtime, tmp_path, redis_url, "a"))
        b = await started(replica(tiny_runtime, tmp_path, redis_url, "b"))
        sid = (await a.create_session("", None, {})).id
        job = a.ingest("", sid, doc_of(doc), "key-1")
        seen = 0
        async for event in job.events():
            seen += isinstance(event, Progress)
            if seen == 4:
                job.cancel()
        cut_at = b.get_session("", sid).tokens
        retry = b.ingest("", sid, doc_of(doc), "key-1")
        first = None
        async for event in retry.events():
            first = first or (event if isinstance(event, Progress) else None)
        result = event.result
        replay = a.ingest("", sid, doc_of(doc), "key-1")  # and back on a: the stored result
        replayed = await replay.result()
        state = await session_state(a, sid)
        pre = prefix_ids(a)
        await a.stop()
        await b.stop()
        return cut_at, first, result, replay, replayed, state, pre

    cut_at, first, result, replay, replayed, state, pre = asyncio.run(main())
    assert 0 < cut_at < len(pre) + len(doc)
    assert first.tokens_done > cut_at - len(pre)  # b resumed where a's last commit left the session
    assert result.tokens == len(pre) + len(doc)  # nothing twice
    assert replay.replayed and replayed == result
    torch.testing.assert_close(next_token_logits(tiny_runtime, state), reference_logits(tiny_runtime, pre + doc))
