"""Jobs: what a request asks of the engine. A job plans its model work and commits the result; it never calls the
model (the executor does, for all jobs of a step at once) and it sees the engine only through a `JobContext`.

The worker thread drives a job: `start` once it may touch its session (see `server.engine.scheduler`), then per
engine step `plan(tokens)` -> `Work` and `commit(output)`. A session's state changes only in `commit` (and in
`start` for jobs without model work: fork, export, a replayed ingest). Every method runs on the worker thread,
except `cancel` and the async `events`/`result`, which run on the event loop; events cross over with
`loop.call_soon_threadsafe`.

An ingest works on its own copy of the state and commits it into the session at every block boundary and at its
end, so a cancelled or failed ingest leaves the session at a block boundary. A committed generation commits once,
at its end. A reading job holds the value it started from (states are values: that is the copy).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from model import FamState, SamplingParams
from model.generate import Generation, TokenLogprob
from server.engine.chat import ChatFormat, Turn
from server.engine.config import EngineConfig
from server.engine.documents import TokenizedDocument
from server.engine.errors import (
    ContextLengthExceeded,
    EngineError,
    IdempotencyKeyReused,
    InvalidRequest,
    SessionNotFound,
    TooManySessions,
)
from server.engine.store import Session, SessionInfo, SessionStore, new_session_id
from server.engine.work import Output, Work


@dataclass(frozen=True)
class Progress:
    tokens_done: int
    tokens_total: int
    pages_done: int | None  # None for text documents, which have no pages
    pages_total: int | None


@dataclass(frozen=True)
class TextDelta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens behind `text` (when logprobs were asked for)


@dataclass(frozen=True)
class Echoed:
    """The prompt, once it is read (echo): its text and, with logprobs, its tokens (the first has logprob None)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] | None


@dataclass(frozen=True)
class Finished:
    result: Any


@dataclass(frozen=True)
class Failed:
    error: EngineError


Event = Progress | TextDelta | Echoed | Finished | Failed


@dataclass(frozen=True)
class GenerationResult:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int  # the session's tokens plus this request's prompt
    completion_tokens: int
    cached_tokens: int  # the session's tokens (already ingested, not recomputed)
    logprobs: tuple[TokenLogprob, ...] | None = None  # per completion token, when asked for
    prompt_text: str | None = None  # echo: the prompt
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # echo with logprobs: the prompt's tokens (the first
    # has logprob None: nothing before it is scored)


@dataclass
class EngineStats:
    tokens_ingested: int = 0  # tokens committed into sessions by ingests
    tokens_generated: int = 0  # sampled tokens


class JobContext:
    """What jobs may use of the engine: the session store, text conversion, the chat format and the limits."""

    def __init__(self, *, config: EngineConfig, store: SessionStore, chat: ChatFormat, model_name: str,
                 context_limit: int, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str],
                 new_state: Callable[[str], FamState], eos_ids: set[int]):
        self.config, self.store, self.chat, self.model_name = config, store, chat, model_name
        self.context_limit, self.encode, self.decode, self.new_state = context_limit, encode, decode, new_state
        self.eos_ids = eos_ids
        self.stats = EngineStats()

    def info(self, s: Session) -> SessionInfo:
        return s.info(self.model_name)

    def check_context(self, state: FamState, n_new: int) -> int | None:
        """full mode: refuse to grow past the model's context; returns the tokens left after `n_new`
        (None in the other modes, which have no limit)."""
        if state.cfg.evicts:
            return None
        ctx, have = self.context_limit, int(state.n_tokens[0])
        if have + n_new > ctx:
            raise ContextLengthExceeded(f"this session is in full mode, limited to the model's context of {ctx} "
                                        f"tokens: it holds {have} and this request needs {n_new} more")
        return ctx - have - n_new

    def check_session_room(self) -> None:
        if self.store.count() >= self.config.max_sessions:
            raise TooManySessions(f"this server holds its maximum of {self.config.max_sessions} sessions; "
                                  "delete one first")

    def remember_key(self, s: Session, key: str, record: dict[str, Any]) -> None:
        s.idempotency[key] = record
        while len(s.idempotency) > self.config.max_idempotency_keys:
            s.idempotency.popitem(last=False)


class Job:
    mutating = False  # changes its session: holds the head of the session's queue until it ends
    bulk = False  # long background work (ingest): gets the step budget's rest (see `server.engine.scheduler`)

    def __init__(self, session: Session | None):
        self.session = session
        self.started = self.finished = False
        self._final: Finished | Failed | None = None
        self.cancelled = False  # set by the event loop; the worker stops the job before its next step
        self._loop = asyncio.get_running_loop()  # jobs are made on the event loop that awaits them
        self._events: asyncio.Queue[Event] = asyncio.Queue()

    @property
    def session_id(self) -> str | None:
        return self.session.id if self.session is not None else None

    # ---------------------------------------------------------------------------------------------- worker side

    def start(self, ctx: JobContext) -> None:
        """Runs once, when the job may touch its session."""
        self.started = True

    def demand(self) -> int:
        """Tokens the job could feed to the model now (at most to the end of its state's block)."""
        return 0

    def plan(self, n: int) -> Work:
        raise NotImplementedError

    def commit(self, ctx: JobContext, out: Output) -> None:
        raise NotImplementedError

    def stop(self, ctx: JobContext, error: EngineError, save: bool = True) -> None:
        """End the job with an error. Whatever it already committed stays (and is saved)."""
        s = self.session
        if save and self.mutating and s is not None and s.dirty and not s.deleted:
            ctx.store.persist(s)
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

    def _session_state(self, ctx: JobContext) -> FamState:
        s = self.session
        assert s is not None
        if s.deleted:
            raise SessionNotFound(s.id)
        return ctx.store.load(s)

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


def _room(state: FamState) -> int:
    return state.cfg.block_size - state.n_block


class IngestJob(Job):
    """Append a tokenized document to a session. Progress counts the document's tokens (the few tokens that open
    a user turn before it are not part of them) and is reported at every commit.

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
        self.pos = 0  # tokens of `seq` in `state`
        self.committed = 0  # tokens of `seq` in the session
        self.n_prefix = 0
        self.doc_base = 0  # document tokens ingested by an earlier attempt with the same key
        self.replayed = False
        self.state: FamState | None = None  # the session's state plus seq[:pos]
        self._saved_at = time.monotonic()

    def start(self, ctx: JobContext) -> None:
        super().start(ctx)
        s = self.session
        assert s is not None
        state = self._session_state(ctx)
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
            prefix = ctx.encode(ctx.chat.ingest_prefix(s.turn))
        self.n_prefix = len(prefix)
        self.seq = prefix + self.doc.ids[self.doc_base:]
        ctx.check_context(state, len(self.seq))
        if self.key and record is None:
            ctx.remember_key(s, self.key, {"digest": self.digest, "status": "partial", "doc_tokens_done": 0})
        self.state = state
        if not self.seq:
            self._commit_to_session(ctx)

    def demand(self) -> int:
        assert self.state is not None
        return min(len(self.seq) - self.pos, _room(self.state))

    def plan(self, n: int) -> Work:
        assert self.state is not None and 0 < n <= self.demand()
        return Work(self.state, self.seq[self.pos:self.pos + n])

    def commit(self, ctx: JobContext, out: Output) -> None:
        self.pos += int(out.state.n_tokens[0] - self.state.n_tokens[0])
        self.state = out.state
        if out.state.n_block == 0 or self.pos == len(self.seq):
            self._commit_to_session(ctx)

    def _commit_to_session(self, ctx: JobContext) -> None:
        s = self.session
        assert s is not None and self.state is not None
        if s.deleted:
            raise SessionNotFound(s.id)
        s.set_state(self.state)
        if self.n_prefix and self.pos:
            s.turn = Turn.USER
        ctx.stats.tokens_ingested += self.pos - self.committed
        self.committed = self.pos
        doc_done = self.doc_base + max(0, self.pos - self.n_prefix)
        if self.key:
            s.idempotency[self.key]["doc_tokens_done"] = doc_done
        paged = self.doc.paged
        self.post(Progress(tokens_done=doc_done, tokens_total=len(self.doc.ids),
                           pages_done=self.doc.pages_done(doc_done) if paged else None,
                           pages_total=len(self.doc.page_ends) if paged else None))
        if self.pos == len(self.seq):
            s.turn = Turn.USER
            result = ctx.info(s)
            if self.key:
                s.idempotency[self.key].update(status="done", result=asdict(result))
            ctx.store.persist(s)
            self.finish(result)
        elif time.monotonic() - self._saved_at >= ctx.config.checkpoint_seconds:
            ctx.store.persist(s)
            self._saved_at = time.monotonic()


class GenerateJob(Job):
    """Sample an answer. On a session it starts from the session's state: without commit on that value (the
    session does not change), with commit the final state (prompt, answer and end-of-turn token) becomes the
    session's. Without a session it starts from an empty state in `mode`.

    `logprobs` (None: off) returns each sampled token's logprob with that many alternatives; `echo` returns the
    prompt's tokens too (with their logprobs when `logprobs` is set)."""

    def __init__(self, session: Session | None, params: SamplingParams, *, commit: bool,
                 messages: list[dict[str, str]] | None = None, prompt_ids: list[int] | None = None,
                 mode: str | None = None, logprobs: int | None = None, echo: bool = False):
        super().__init__(session)
        assert (messages is None) != (prompt_ids is None), "a chat (messages) or a completion (prompt_ids)"
        self.params, self.commit_turn, self.messages, self.prompt_ids, self.mode = (params, commit, messages,
                                                                                    prompt_ids, mode)
        self.n_logprobs, self.echo = logprobs, echo
        self.mutating = commit and session is not None
        self.gen: Generation | None = None
        self.state: FamState | None = None
        self.cached = 0
        self._unsent: list[TokenLogprob] = []  # logprobs of tokens whose text is held back
        self._logprobs_seen = 0

    def start(self, ctx: JobContext) -> None:
        super().start(ctx)
        turn = Turn.NONE
        if self.session is not None:
            state, turn = self._session_state(ctx), self.session.turn
        else:
            state = ctx.new_state(self.mode)
        self.cached = int(state.n_tokens[0])
        prompt = self.prompt_ids if self.messages is None else ctx.encode(ctx.chat.chat_prompt(turn, self.messages))
        if not prompt:
            raise InvalidRequest("the prompt is empty", param="prompt")
        params = self.params
        left = ctx.check_context(state, len(prompt) + 1)  # full mode: the prompt and at least one answer token
        if left is not None and left + 1 < params.max_tokens:
            # the answer stops at the model's context (its last token, or the end-of-turn token after an earlier
            # one, is ingested only by a commit: at most max_tokens tokens follow the prompt)
            params = replace(params, max_tokens=left + 1)
        self.state = state
        self.gen = Generation(prompt, params, ctx.decode, ctx.eos_ids, logprobs=self.n_logprobs,
                              prompt_logprobs=self.echo and self.n_logprobs is not None)

    def demand(self) -> int:
        g, state = self.gen, self.state
        assert g is not None and state is not None
        if g.done or g.prompt_done:
            return 1
        return min(g.prompt_left, _room(state))

    def plan(self, n: int) -> Work:
        g, state = self.gen, self.state
        assert g is not None and state is not None and 0 < n <= self.demand()
        if g.done:
            assert self.mutating and g.pending is not None
            return Work(state, [g.pending])
        toks = g.next_tokens(n)
        return Work(state, toks, g.logits_wanted(len(toks)))  # type: ignore[arg-type]

    def commit(self, ctx: JobContext, out: Output) -> None:
        g, before = self.gen, self.state
        assert g is not None and before is not None
        self.state = out.state
        if g.done:  # the last sampled token is in: the turn is complete
            self._end_turn(ctx)
            return
        was_prompt = not g.prompt_done
        piece = g.accept(int(out.state.n_tokens[0] - before.n_tokens[0]), out.logits)
        if not g.prompt_done:
            return
        if g.pending is not None:  # accept sampled a token
            ctx.stats.tokens_generated += 1
        if was_prompt and self.echo:
            self.post(Echoed(ctx.decode(g.prompt_ids), tuple(g.prompt_logprobs) if g.want_prompt_logprobs else None))
        self._unsent += g.logprobs[self._logprobs_seen:]
        self._logprobs_seen = len(g.logprobs)
        if piece or (g.done and self._unsent):
            self.post(TextDelta(piece, tuple(self._unsent)))
            self._unsent = []
        if g.done and not (self.mutating and g.pending is not None):
            self._end_turn(ctx)

    def _end_turn(self, ctx: JobContext) -> None:
        g = self.gen
        assert g is not None and self.state is not None
        if self.mutating:
            s = self.session
            assert s is not None
            if s.deleted:
                raise SessionNotFound(s.id)
            if self.messages is not None:  # a completion's raw text leaves the turn as it was
                eos = int(self.state.n_tokens[0]) - self.cached == len(g.prompt_ids) + len(g.completion_ids) + 1
                s.turn = Turn.ANSWERED if eos else Turn.ANSWERING
            s.set_state(self.state)
            ctx.store.persist(s)
        self.finish(GenerationResult(text=g.text, finish_reason=g.finish_reason or "stop",
                                     prompt_tokens=self.cached + len(g.prompt_ids),
                                     completion_tokens=len(g.completion_ids), cached_tokens=self.cached,
                                     logprobs=tuple(g.logprobs) if self.n_logprobs is not None else None,
                                     prompt_text=ctx.decode(g.prompt_ids) if self.echo else None,
                                     prompt_logprobs=tuple(g.prompt_logprobs) if g.want_prompt_logprobs else None))


class ForkJob(Job):
    """A new session holding the same state (shared tensors: states are never mutated)."""

    def __init__(self, session: Session, owner: str):
        super().__init__(session)
        self.owner = owner

    def start(self, ctx: JobContext) -> None:
        super().start(ctx)
        src = self.session
        assert src is not None
        state = self._session_state(ctx)
        ctx.check_session_room()
        fork = Session(id=new_session_id(), owner=self.owner, mode=src.mode, created=int(time.time()),
                       metadata=dict(src.metadata), turn=src.turn)
        fork.set_state(state)
        ctx.store.add(fork)
        self.finish(ctx.info(fork))


class ExportJob(Job):
    """The session's snapshot bytes, as of every operation submitted before this one."""

    def start(self, ctx: JobContext) -> None:
        super().start(ctx)
        assert self.session is not None
        self.finish(ctx.store.export(self.session, self._session_state(ctx)))
