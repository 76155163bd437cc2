"""The engine without HTTP: scheduling across sessions, serialized work on one session, cancellation at block
boundaries, idempotent ingest, failures confined to one request, spilling to disk, full-mode limits."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from model import SamplingParams
from server.engine import Engine, EngineConfig, Failed, Progress, SessionInfo
from server.engine.chat import Turn
from server.engine.documents import TokenizedDocument
from server.engine.errors import (
    Cancelled,
    ContextLengthExceeded,
    EngineFailure,
    IdempotencyKeyReused,
    QueueFull,
    SessionNotFound,
    ShuttingDown,
)

BLOCK = 16
GREEDY = SamplingParams(max_tokens=4, temperature=0)
POISON = 29106  # " zebra": the flaky runtime below fails on blocks that contain it


def run(coro):
    return asyncio.run(coro)


def config(data_dir: Path, **kw) -> EngineConfig:
    return EngineConfig(data_dir=data_dir, secret=b"s", **kw)


def doc_of(ids: list[int]) -> TokenizedDocument:
    return TokenizedDocument(ids=list(ids), page_ends=[len(ids)])


def words(n_tokens: int, rt, offset: int = 0) -> list[int]:
    """A document of exactly n_tokens ids (ordinary word tokens, no poison)."""
    base = rt.encode(" alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu")
    return [base[(i + offset) % len(base)] for i in range(n_tokens)]


async def started(eng: Engine) -> Engine:
    eng.start()
    return eng


def next_token_logits(rt, state) -> torch.Tensor:
    with torch.inference_mode():
        return rt.ingest(state, rt.encode(" and"))[1]


async def session_state(eng: Engine, sid: str):
    data = await eng.export("", sid).result()
    return eng.store.unpack(data)[0]


def prefix_ids(eng: Engine) -> list[int]:
    return eng.encode(eng.chat.ingest_prefix(Turn.NONE))


def test_short_request_is_not_stalled_by_long_ingests(tmp_path, tiny_runtime):
    """Four sessions ingest 100 blocks each; a question in a fifth finishes after a handful of ingest blocks in
    all (plain round robin over the five jobs would take about four blocks per unit of the question)."""

    async def main():
        eng = await started(Engine(tiny_runtime, config(tmp_path)))
        readers = [(await eng.create_session("", None, {})).id for _ in range(4)]
        asker = (await eng.create_session("", None, {})).id
        ingests = [eng.ingest("", sid, doc_of(words(100 * BLOCK, tiny_runtime)), None) for sid in readers]
        question = eng.generate("", GREEDY, session_id=asker, messages=[{"role": "user", "content": "Hi"}])
        answer = await question.result()
        ingested_meanwhile = [eng.get_session("", sid).tokens for sid in readers]
        for job in ingests:
            job.cancel()
        await eng.stop()
        return answer, ingested_meanwhile, len(eng.encode(eng.chat.chat_prompt(Turn.NONE, [
            {"role": "user", "content": "Hi"}])))

    answer, meanwhile, prompt_tokens = run(main())
    units = -(-prompt_tokens // BLOCK) + GREEDY.max_tokens  # prompt blocks, then one slice per token
    assert answer.completion_tokens == GREEDY.max_tokens
    assert sum(m > 0 for m in meanwhile) >= 1
    assert sum(meanwhile) <= (units + 2) * BLOCK + 4 * 40  # about one ingest block per unit (+ turn openers)


def test_two_ingests_on_one_session_run_in_order(tmp_path, tiny_runtime):
    d1, d2 = words(3 * BLOCK + 5, tiny_runtime), words(2 * BLOCK + 3, tiny_runtime, offset=3)

    async def main():
        eng = await started(Engine(tiny_runtime, config(tmp_path)))
        sid = (await eng.create_session("", None, {})).id
        j1, j2 = eng.ingest("", sid, doc_of(d1), None), eng.ingest("", sid, doc_of(d2), None)
        r1, r2 = await asyncio.gather(j1.result(), j2.result())
        state = await session_state(eng, sid)
        pre = prefix_ids(eng)
        await eng.stop()
        return r1, r2, state, pre

    r1, r2, state, pre = run(main())
    assert r1.tokens == len(pre) + len(d1)
    assert r2.tokens == len(pre) + len(d1) + len(d2)
    with torch.inference_mode():
        reference, _ = tiny_runtime.ingest(tiny_runtime.new_state(mode=state.cfg.mode), pre + d1 + d2)
    torch.testing.assert_close(next_token_logits(tiny_runtime, state), next_token_logits(tiny_runtime, reference))


def test_cancelled_ingest_stops_at_a_block_boundary(tmp_path, tiny_runtime):
    doc = words(40 * BLOCK, tiny_runtime)

    async def main():
        eng = await started(Engine(tiny_runtime, config(tmp_path)))
        sid = (await eng.create_session("", None, {})).id
        job = eng.ingest("", sid, doc_of(doc), None)
        seen = 0
        async for event in job.events():
            seen += isinstance(event, Progress)
            if seen == 3:
                job.cancel()
        assert isinstance(event, Failed) and isinstance(event.error, Cancelled)
        tokens = eng.get_session("", sid).tokens
        state = await session_state(eng, sid)
        again = await eng.ingest("", sid, doc_of(words(5, tiny_runtime)), None).result()  # still usable
        await eng.stop()
        return tokens, state, again

    tokens, state, again = run(main())
    assert 3 * BLOCK <= tokens < 40 * BLOCK and tokens % BLOCK == 0
    assert state.n_block == 0 and int(state.n_tokens[0]) == tokens
    assert again.tokens == tokens + 5


def test_idempotency_key_replays_and_resumes(tmp_path, tiny_runtime):
    doc = words(20 * BLOCK + 7, tiny_runtime)

    async def main():
        eng = await started(Engine(tiny_runtime, config(tmp_path)))
        sid = (await eng.create_session("", None, {})).id
        # cut short after a few blocks...
        job = eng.ingest("", sid, doc_of(doc), "key-1")
        seen = 0
        async for event in job.events():
            seen += isinstance(event, Progress)
            if seen == 4:
                job.cancel()
        cut_at = eng.get_session("", sid).tokens
        # ...the retry with the same key resumes instead of starting over
        retry = eng.ingest("", sid, doc_of(doc), "key-1")
        first_progress = None
        async for event in retry.events():
            if isinstance(event, Progress) and first_progress is None:
                first_progress = event
            result = getattr(event, "result", None)
        # a third attempt replays the stored result
        replay = eng.ingest("", sid, doc_of(doc), "key-1")
        replayed = await replay.result()
        reused = eng.ingest("", sid, doc_of(doc[:-1]), "key-1")
        with pytest.raises(IdempotencyKeyReused):
            await reused.result()
        state = await session_state(eng, sid)
        pre = prefix_ids(eng)
        await eng.stop()
        return cut_at, first_progress, result, replay, replayed, state, pre

    cut_at, first_progress, result, replay, replayed, state, pre = run(main())
    total = len(pre) + len(doc)
    assert 0 < cut_at < total
    assert first_progress.tokens_done > cut_at - len(pre) and first_progress.tokens_total == len(doc)
    assert result.tokens == total  # nothing ingested twice
    assert replay.replayed and replayed == result
    with torch.inference_mode():
        reference, _ = tiny_runtime.ingest(tiny_runtime.new_state(mode=state.cfg.mode), pre + doc)
    torch.testing.assert_close(next_token_logits(tiny_runtime, state), next_token_logits(tiny_runtime, reference))


class FlakyRuntime:
    """The tiny runtime, except that a block containing POISON raises inside the model."""

    def __init__(self, rt):
        self._rt = rt

    def __getattr__(self, name):
        return getattr(self._rt, name)

    def forward_many(self, states, ids, decode=None):
        if any(POISON in chunk for chunk in ids):
            raise RuntimeError("simulated model failure")
        return self._rt.forward_many(states, ids, decode)


def test_model_exception_fails_only_its_request(tmp_path, tiny_runtime):
    good = words(3 * BLOCK, tiny_runtime)
    bad = words(2 * BLOCK, tiny_runtime) + [POISON] + words(BLOCK, tiny_runtime)

    async def main():
        eng = await started(Engine(FlakyRuntime(tiny_runtime), config(tmp_path)))
        a = (await eng.create_session("", None, {})).id
        b = (await eng.create_session("", None, {})).id
        failing, fine = eng.ingest("", a, doc_of(bad), None), eng.ingest("", b, doc_of(good), None)
        outcome = await asyncio.gather(failing.result(), fine.result(), return_exceptions=True)
        after = await eng.ingest("", a, doc_of(good), None).result()  # the worker and the session go on
        await eng.stop()
        return outcome, after

    (err, ok), after = run(main())
    assert isinstance(err, EngineFailure) and "simulated model failure" in err.message
    assert isinstance(ok, SessionInfo) and ok.tokens > 3 * BLOCK
    assert after.tokens > len(good)


def test_queue_limit(tmp_path, tiny_runtime):
    async def main():
        eng = await started(Engine(tiny_runtime, config(tmp_path, max_queue=1)))
        sid = (await eng.create_session("", None, {})).id
        first = eng.ingest("", sid, doc_of(words(30 * BLOCK, tiny_runtime)), None)
        with pytest.raises(QueueFull) as refused:
            eng.generate("", GREEDY, messages=[{"role": "user", "content": "x"}])
        first.cancel()
        with pytest.raises(Cancelled):
            await first.result()
        await eng.generate("", GREEDY, messages=[{"role": "user", "content": "x"}]).result()  # room again
        await eng.stop()
        return refused.value

    assert run(main()).retry_after > 0


def test_idle_sessions_spill_to_disk_and_come_back(tmp_path, tiny_runtime):
    question = [{"role": "user", "content": "What?"}]

    async def main():
        eng = await started(Engine(tiny_runtime, config(tmp_path)))
        sid = (await eng.create_session("", None, {})).id
        await eng.ingest("", sid, doc_of(words(2 * BLOCK + 3, tiny_runtime)), None).result()
        resident = await eng.generate("", GREEDY, session_id=sid, messages=question).result()
        await eng.stop()
        tight = await started(Engine(tiny_runtime, config(tmp_path, memory_budget_bytes=0)))
        spilled = await tight.generate("", GREEDY, session_id=sid, messages=question).result()
        await asyncio.sleep(0.05)
        metrics = tight.metrics()
        await tight.stop()
        return resident, spilled, metrics

    resident, spilled, metrics = run(main())
    assert spilled.text == resident.text and spilled.cached_tokens == resident.cached_tokens
    assert metrics["sessions"] == 1 and metrics["sessions_resident"] == 0


def test_full_mode_refuses_to_grow_past_the_context(tmp_path, tiny_runtime):
    ctx = tiny_runtime.module.arch.max_position_embeddings

    async def main():
        eng = await started(Engine(tiny_runtime, config(tmp_path)))
        sid = (await eng.create_session("", "full", {})).id
        with pytest.raises(ContextLengthExceeded, match=str(ctx)):
            await eng.ingest("", sid, doc_of(words(ctx + 1, tiny_runtime)), None).result()
        info = eng.get_session("", sid)
        await eng.stop()
        return info

    assert run(main()).tokens == 0  # refused before anything was ingested


def test_deleting_a_session_stops_its_ingest(tmp_path, tiny_runtime):
    async def main():
        eng = await started(Engine(tiny_runtime, config(tmp_path)))
        sid = (await eng.create_session("", None, {})).id
        job = eng.ingest("", sid, doc_of(words(60 * BLOCK, tiny_runtime)), None)
        await anext(job.events())
        await eng.delete_session("", sid)
        with pytest.raises(SessionNotFound):
            await job.result()
        await eng.stop()
        again = await started(Engine(tiny_runtime, config(tmp_path)))
        listed = again.list_sessions("")
        await again.stop()
        return listed

    assert run(main()) == []  # the snapshot is gone too: a restart does not bring it back
    assert not list((tmp_path / "sessions").glob("*.snap"))


def test_shutdown_ends_running_and_waiting_jobs_and_saves(tmp_path, tiny_runtime):
    async def main():
        eng = await started(Engine(tiny_runtime, config(tmp_path)))
        sid = (await eng.create_session("", None, {})).id
        running = eng.ingest("", sid, doc_of(words(200 * BLOCK, tiny_runtime)), None)
        waiting = eng.ingest("", sid, doc_of(words(BLOCK, tiny_runtime)), None)
        await anext(running.events())
        await eng.stop()
        outcomes = await asyncio.gather(running.result(), waiting.result(), return_exceptions=True)
        again = await started(Engine(tiny_runtime, config(tmp_path)))
        tokens = again.get_session("", sid).tokens
        await again.stop()
        return outcomes, tokens

    outcomes, tokens = run(main())
    assert all(isinstance(o, ShuttingDown) for o in outcomes), outcomes
    assert 0 < tokens < 200 * BLOCK and tokens % BLOCK == 0  # saved at the last committed block


def test_a_batched_step_equals_the_sessions_one_by_one(tiny_runtime):
    """The executor's one pass over works of several sessions (decoding at different fills of their block, one
    completing its block, a prompt chunk) gives each the state and logits it gets alone."""
    from server.engine.executor import Executor
    from server.engine.work import Work

    rt = tiny_runtime
    with torch.inference_mode():
        states = [rt.ingest(rt.new_state(mode=mode), words(n, rt))[0]
                  for n, mode in [(3 * BLOCK + 2, "fam"), (BLOCK - 1, "fam"), (7, "sink"), (20, "bswa")]]
        works = [Work(states[0], words(1, rt), "last"), Work(states[1], words(1, rt, 2), "last"),
                 Work(states[2], words(5, rt, 1), "all"), Work(states[3], words(3, rt, 4), "none")]
        outputs = Executor(rt).run(works)
        for w, out in zip(works, outputs, strict=True):
            ((alone, h),) = rt.forward_many([w.state], [w.tokens])
            reference, logits = rt.ingest(w.state, w.tokens)
            torch.testing.assert_close(out.state.fam, reference.fam, atol=1e-5, rtol=1e-4)
            for a, b in zip(out.state.k + out.state.v, reference.k + reference.v, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
            assert out.state.layout() == reference.layout()
            if w.logits == "last":
                torch.testing.assert_close(out.logits, logits[0], atol=1e-4, rtol=1e-4)
            elif w.logits == "all":
                torch.testing.assert_close(out.logits, rt.logits(h), atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(out.logits[-1], logits[0], atol=1e-4, rtol=1e-4)
            else:
                assert out.logits is None
    assert outputs[1].state.n_block == 0  # that one completed its block inside the batch


def test_concurrent_generations_decode_in_one_batch(tmp_path, tiny_runtime):
    """Four greedy chats on four sessions give the answers each gives alone, and their tokens were computed
    in shared passes (continuous batching)."""
    questions = [[{"role": "user", "content": q}] for q in ("Hi", "What is this?", "Go on", "Why?")]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

    async def main():
        eng = await started(Engine(tiny_runtime, config(tmp_path)))
        sids = []
        for i in range(4):
            sid = (await eng.create_session("", None, {})).id
            await eng.ingest("", sid, doc_of(words(BLOCK + 5 * i, tiny_runtime, i)), None).result()
            sids.append(sid)
        alone = [(await eng.generate("", params, session_id=sid, messages=q).result()).text
                 for sid, q in zip(sids, questions, strict=True)]
        sizes: list[int] = []
        run_works = eng.executor.run
        rows: list[int] = []  # the decode buffer's rows after each pass

        def counted(works):
            sizes.append(len(works))
            out = run_works(works)
            rows.append(len(eng.executor.decode.lengths))
            return out

        eng.executor.run = counted
        jobs = [eng.generate("", params, session_id=sid, messages=q) for sid, q in zip(sids, questions, strict=True)]
        together = [r.text for r in await asyncio.gather(*(j.result() for j in jobs))]
        for _ in range(100):  # the worker goes idle right after the last step
            if not eng.executor.decode.lengths:
                break
            await asyncio.sleep(0.02)
        released = not eng.executor.decode.lengths
        await eng.stop()
        return alone, together, sizes, rows, released

    alone, together, sizes, rows, released = run(main())
    assert together == alone
    assert rows.count(4) >= params.max_tokens - 2 and released  # decoded through the shared buffer, then freed
    assert max(sizes) == 4 and sizes.count(4) >= params.max_tokens - 1  # all four decode in the same steps
