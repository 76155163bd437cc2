"""Jobs: the units the worker schedules. A job starts when it reaches the head of its session's queue, then
advances one unit per `step` (a block of tokens, or one sampled token) and reports events to its requester.

Every job method below runs on the worker thread, except `cancel` and the async `events`/`result`, which run on
the event loop. Events cross over with `loop.call_soon_threadsafe`.

A mutating job (ingest, committed generation) keeps the head of its session's queue until it ends, so work on
one session never interleaves; an ingest commits its state after every block, a committed generation commits
once at the end. A reading job (generation without commit, fork, export) takes the session's state when it
reaches the head (states are values: that is the copy) and leaves the queue at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from model import FamState, Generation, SamplingParams
from server.engine.chat import Turn
from server.engine.documents import TokenizedDocument
from server.engine.errors import (
    EngineError,
    IdempotencyKeyReused,
    InvalidRequest,
    SessionNotFound,
)
from server.engine.store import Session, SessionInfo, new_session_id

if TYPE_CHECKING:
    from server.engine.engine import Engine


@dataclass(frozen=True)
class Progress:
    tokens_done: int
    tokens_total: int
    pages_done: int | None  # None for text documents, which have no pages
    pages_total: int | None


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    result: Any


@dataclass(frozen=True)
class Failed:
    error: EngineError


Event = Progress | TextDelta | Finished | Failed


@dataclass(frozen=True)
class GenerationResult:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int  # the session's tokens plus this request's prompt
    completion_tokens: int
    cached_tokens: int  # the session's tokens (already ingested, not recomputed)


class Job:
    mutating = False
    bulk = False  # long background work (ingest): scheduled after interactive jobs

    def __init__(self, session: Session | None):
        self.session = session
        self.started = self.finished = False
        self._final: Finished | Failed | None = None
        self.cancelled = False  # set by the event loop; the worker stops the job at the next unit
        self.submitted = time.monotonic()
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Event] = asyncio.Queue()

    # ---------------------------------------------------------------------------------------------- worker side

    def start(self, eng: Engine) -> None:
        """Runs once, when the job may touch its session."""
        self.started = True

    def step(self, eng: Engine) -> None:
        raise NotImplementedError

    def stop(self, eng: Engine, error: EngineError, save: bool = True) -> None:
        """End the job with an error. Whatever it already committed stays (and is saved)."""
        s = self.session
        if save and self.mutating and s is not None and s.dirty and not s.deleted:
            eng.store.persist(s)
        self._end(Failed(error))

    def finish(self, result: Any) -> None:
        self._end(Finished(result))

    def post(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            pass

    def _end(self, event: Finished | Failed) -> None:
        """The worker publishes the final event once it has retired the job (`publish_end`), so a client that
        reacts to it at once never finds its own job still counted against the queue limit."""
        self.finished = True
        self._final = event

    def publish_end(self) -> None:
        self.post(self._final)

    def _session_state(self, eng: Engine) -> FamState:
        s = self.session
        assert s is not None
        if s.deleted:
            raise SessionNotFound(s.id)
        return eng.store.load(s)

    # ---------------------------------------------------------------------------------------------- loop side

    def cancel(self) -> None:
        self.cancelled = True

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, Finished | Failed):
                return

    async def result(self) -> Any:
        async for event in self.events():
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Finished):
                return event.result
        raise AssertionError("a job's events end with Finished or Failed")


class IngestJob(Job):
    """Append a tokenized document to a session, one block per step. Progress counts the document's tokens
    (the few tokens that open a user turn before it are not part of them).

    With an Idempotency-Key the session remembers the key, the document's digest and how much of it is in
    (updated with every commit and saved with the session). A repeat of a completed key gets the stored
    result; a repeat of a key whose ingest was cut short (cancelled, or the server killed after a checkpoint)
    resumes where it stopped; the same key with another document is refused.
    """

    mutating = True
    bulk = True

    def __init__(self, session: Session, doc: TokenizedDocument, key: str | None):
        super().__init__(session)
        self.doc, self.key = doc, key
        self.digest = doc.digest
        self.seq: list[int] = []
        self.pos = 0
        self.n_prefix = 0
        self.doc_base = 0  # document tokens ingested by an earlier attempt with the same key
        self.replayed = False
        self._saved_at = time.monotonic()

    def start(self, eng: Engine) -> None:
        super().start(eng)
        s = self.session
        assert s is not None
        state = self._session_state(eng)
        record = s.idempotency.get(self.key) if self.key else None
        if record is not None:
            if record["digest"] != self.digest:
                raise IdempotencyKeyReused(f"Idempotency-Key {self.key!r} was used on this session for another "
                                           "document", param="Idempotency-Key")
            if record["status"] == "done":
                self.replayed = True
                self.finish(SessionInfo.from_record(record["result"]))
                return
            self.doc_base = record["doc_tokens_done"]
            prefix = []
        else:
            prefix = eng.encode(eng.chat.ingest_prefix(s.turn))
        self.n_prefix = len(prefix)
        self.seq = prefix + self.doc.ids[self.doc_base:]
        eng.check_context(state, len(self.seq))
        if self.key and record is None:
            eng.remember_key(s, self.key, {"digest": self.digest, "status": "partial", "doc_tokens_done": 0})

    def step(self, eng: Engine) -> None:
        s = self.session
        assert s is not None and s.state is not None
        state, n, _ = eng.rt.ingest_block(s.state, self.seq[self.pos:])
        self.pos += n
        s.set_state(state)  # commit
        if self.n_prefix:
            s.turn = Turn.USER
        eng.stats.tokens_ingested += n
        doc_done = self.doc_base + max(0, self.pos - self.n_prefix)
        if self.key:
            s.idempotency[self.key]["doc_tokens_done"] = doc_done
        done = self.pos == len(self.seq)
        paged = self.doc.paged
        self.post(Progress(tokens_done=doc_done, tokens_total=len(self.doc.ids),
                           pages_done=self.doc.pages_done(doc_done) if paged else None,
                           pages_total=len(self.doc.page_ends) if paged else None))
        if done:
            s.turn = Turn.USER
            result = eng.session_info(s)
            if self.key:
                s.idempotency[self.key].update(status="done", result=asdict(result))
            eng.store.persist(s)
            self.finish(result)
        elif time.monotonic() - self._saved_at >= eng.config.checkpoint_seconds:
            eng.store.persist(s)
            self._saved_at = time.monotonic()


class GenerateJob(Job):
    """Sample an answer. On a session it starts from the session's state: without commit on that value (the
    session does not change), with commit the final state (prompt, answer and end-of-turn token) becomes the
    session's. Without a session it starts from an empty state in `mode`."""

    def __init__(self, session: Session | None, params: SamplingParams, *, commit: bool,
                 messages: list[dict[str, str]] | None = None, prompt_ids: list[int] | None = None,
                 mode: str | None = None):
        super().__init__(session)
        assert (messages is None) != (prompt_ids is None), "a chat (messages) or a completion (prompt_ids)"
        self.params, self.commit, self.messages, self.prompt_ids, self.mode = params, commit, messages, prompt_ids, mode
        self.mutating = commit and session is not None
        self.gen: Generation | None = None
        self.cached = 0
        self._turn = Turn.NONE

    def start(self, eng: Engine) -> None:
        super().start(eng)
        if self.session is not None:
            state, self._turn = self._session_state(eng), self.session.turn
        else:
            state = eng.rt.new_state(mode=self.mode)
        self.cached = int(state.n_tokens[0])
        prompt = self.prompt_ids if self.messages is None else eng.encode(eng.chat.chat_prompt(self._turn,
                                                                                               self.messages))
        if not prompt:
            raise InvalidRequest("the prompt is empty", param="prompt")
        params = self.params
        left = eng.check_context(state, len(prompt) + 1)  # full mode: the prompt and at least one answer token
        if left is not None and left + 1 < params.max_tokens:
            # the answer stops at the model's context (its last token, or the end-of-turn token after an earlier
            # one, is ingested only by a commit: at most max_tokens tokens follow the prompt)
            params = replace(params, max_tokens=left + 1)
        self.gen = Generation(eng.rt, state, prompt, params)

    def step(self, eng: Engine) -> None:
        g = self.gen
        assert g is not None
        was_prompt = not g.prompt_done
        piece = g.step()
        if not was_prompt:
            eng.stats.tokens_generated += 1
        if piece:
            self.post(TextDelta(piece))
        if not g.done:
            return
        if self.mutating:
            s = self.session
            assert s is not None
            if s.deleted:
                raise SessionNotFound(s.id)
            final = g.final_state()
            if self.messages is not None:  # a completion's raw text leaves the turn as it was
                eos = int(final.n_tokens[0]) - self.cached == len(g.prompt_ids) + len(g.completion_ids) + 1
                s.turn = Turn.ANSWERED if eos else Turn.ANSWERING
            s.set_state(final)
            eng.store.persist(s)
        self.finish(GenerationResult(text=g.text, finish_reason=g.finish_reason or "stop",
                                     prompt_tokens=self.cached + len(g.prompt_ids),
                                     completion_tokens=len(g.completion_ids), cached_tokens=self.cached))


class ForkJob(Job):
    """A new session holding the same state (shared tensors: states are never mutated)."""

    def __init__(self, session: Session, owner: str):
        super().__init__(session)
        self.owner = owner

    def start(self, eng: Engine) -> None:
        super().start(eng)
        src = self.session
        assert src is not None
        state = self._session_state(eng)
        eng.check_session_room()
        fork = Session(id=new_session_id(), owner=self.owner, mode=src.mode, created=int(time.time()),
                       metadata=dict(src.metadata), turn=src.turn)
        fork.set_state(state)
        eng.store.add(fork)
        self.finish(eng.session_info(fork))


class ExportJob(Job):
    """The session's snapshot bytes, as of every operation submitted before this one."""

    def start(self, eng: Engine) -> None:
        super().start(eng)
        assert self.session is not None
        self.finish(eng.store.export(self.session, self._session_state(eng)))
