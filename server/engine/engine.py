"""The engine: one model worker thread and the async operations the HTTP layer calls.

The worker loop is schedule -> execute -> commit:

    schedule  run the quick calls that arrived (create, delete, import, job submissions), then take the next
              ready job. A job is ready when it is at the head of its session's queue (reading jobs leave the
              queue once they hold their copy of the state) or has no session. Interactive jobs (generation,
              fork, export) go first: after each slice of bulk work (ingest), every interactive job that was
              waiting gets a slice; ingests share the rest round robin. So a question waits for at most one
              ingest block, however many sessions are ingesting, and every ingest still advances each round.
    execute   `job.step()` for one time slice: at least one unit (one block of an ingest or a prompt, or one
              sampled token), more units while the slice lasts. An interactive slice lasts as long as the
              last bulk slice took (at least `time_slice_seconds`): a question's prompt and first tokens fit
              in one slice, and interactive and bulk work alternate with equal time.
    commit    the job commits into its session (an ingest after every block, a committed generation at its
              end) and saves the snapshot when an operation completes; then the job goes to the back of the
              ready queue, or retires and hands its session to the next job in line.

A cancelled job stops at the next unit boundary; an exception in a job ends that job only. Every model call
happens on the worker thread under `torch.inference_mode()`; the event loop only submits and awaits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from model import FamRuntime, FamState, SamplingParams
from model.config import MODES
from server.engine.chat import ChatFormat, Turn
from server.engine.config import EngineConfig
from server.engine.documents import (
    TokenizedDocument,
    chunking_is_exact,
    extract,
    text_document,
    tokenize_pages,
)
from server.engine.errors import (
    Cancelled,
    ContextLengthExceeded,
    EngineError,
    EngineFailure,
    InvalidRequest,
    QueueFull,
    SessionNotFound,
    ShuttingDown,
    TooManySessions,
)
from server.engine.jobs import ExportJob, ForkJob, GenerateJob, IngestJob, Job
from server.engine.store import Session, SessionStore, new_session_id

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    tokens_ingested: int = 0  # tokens committed into sessions by ingests
    tokens_generated: int = 0  # sampled tokens


@dataclass(frozen=True)
class _Call:
    fn: Callable[[], Any]
    future: concurrent.futures.Future


def default_mode(rt: FamRuntime) -> str:
    """The adapter's mode when one is loaded. Without one, `sink`: untrained FAM weights collapse to chance-level
    next-token loss after ~12 blocks on the default model (docs/untrained_fam.md)."""
    return rt.fam_config.mode if rt.adapter is not None else "sink"


class Engine:
    def __init__(self, rt: FamRuntime, config: EngineConfig):
        self.rt, self.config = rt, config
        self.store = SessionStore(rt, config.data_dir, config.secret, config.memory_budget_bytes)
        self.chat = ChatFormat(rt.chat_text, rt.decode([rt.tokenizer.eos_token_id]))
        self.default_mode = config.default_mode or default_mode(rt)
        self.stats = EngineStats()
        self._tokenizer_lock = threading.Lock()  # one tokenizer, used from the worker and helper threads
        self._exact_chunks = chunking_is_exact(self.encode_document)
        self._cv = threading.Condition()
        self._inbox: deque[Job | _Call] = deque()  # from the event loop to the worker (under _cv)
        self._unfinished = 0  # submitted jobs not yet retired (under _cv)
        self._stopping = False
        self._ready: deque[Job] = deque()  # interactive jobs, round robin (worker thread only)
        self._bulk: deque[Job] = deque()  # ingests, round robin (worker thread only)
        self._owed = 0  # interactive slices due before the next bulk slice
        self._bulk_seconds = 0.0  # how long the last bulk slice took
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fam-model-worker", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Fail what is queued, stop running jobs at their next unit (saving their sessions), end the worker."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    @property
    def model_name(self) -> str:
        """The loaded model's name: what `/v1/models` lists and every answer names."""
        return self.rt.name

    # ---------------------------------------------------------------------------------------------- text

    def encode(self, text: str) -> list[int]:
        """Prompt text (special tokens such as <|im_start|> are read as such: chat templates need that)."""
        with self._tokenizer_lock:
            return self.rt.encode(text)

    def encode_document(self, text: str) -> list[int]:
        """Document text: special-token strings in a document are text, never control tokens."""
        with self._tokenizer_lock:
            return list(self.rt.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))

    async def tokenize(self, text: str) -> list[int]:
        return await asyncio.to_thread(self.encode, text)

    def decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.rt.decode(ids)

    async def detokenize(self, ids: list[int]) -> str:
        self.check_token_ids(ids, "tokens")
        return await asyncio.to_thread(self.decode, ids)

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.rt.module.arch.vocab_size
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param=param)

    async def prepare_file(self, data: bytes, content_type: str | None, filename: str | None) -> TokenizedDocument:
        """Extract (PDF or text) and tokenise an uploaded file, off the event loop and off the model worker."""
        doc = await asyncio.to_thread(extract, data, content_type, filename, self.config.max_pdf_pages)
        return await asyncio.to_thread(tokenize_pages, doc.pages, self.encode_document,
                                       exact_chunks=self._exact_chunks, paged=doc.kind == "pdf")

    async def prepare_text(self, text: str) -> TokenizedDocument:
        return await asyncio.to_thread(tokenize_pages, text_document(text).pages, self.encode_document,
                                       exact_chunks=self._exact_chunks, paged=False)

    # ---------------------------------------------------------------------------------------------- sessions

    def session_info(self, s: Session) -> dict[str, Any]:
        return {"id": s.id, "object": "session", "mode": s.mode, "model": self.rt.name, "tokens": s.tokens,
                "state_bytes": s.state_bytes, "created": s.created, "metadata": s.metadata}

    def get_session(self, owner: str, session_id: str) -> dict[str, Any]:
        return self.session_info(self.store.get(session_id, owner))

    def list_sessions(self, owner: str) -> list[dict[str, Any]]:
        return [self.session_info(s) for s in self.store.list(owner)]

    async def create_session(self, owner: str, mode: str | None, metadata: dict[str, Any]) -> dict[str, Any]:
        mode = mode or self.default_mode
        if mode not in MODES:
            raise InvalidRequest(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}", param="mode")

        def create() -> dict[str, Any]:
            self.check_session_room()
            s = Session(id=new_session_id(), owner=owner, mode=mode, created=int(time.time()), metadata=metadata)
            s.set_state(self.rt.new_state(mode=mode))
            self.store.add(s)
            return self.session_info(s)

        return await self._call(create)

    async def delete_session(self, owner: str, session_id: str) -> None:
        """Jobs waiting on the session fail with session_not_found when their turn comes; a running ingest
        stops at its next block."""
        await self._call(lambda: self.store.remove(self.store.get(session_id, owner)))

    async def import_snapshot(self, owner: str, data: bytes) -> dict[str, Any]:
        def load() -> dict[str, Any]:
            state, record = self.store.unpack(data)
            self.check_session_room()
            s = Session(id=new_session_id(), owner=owner, mode=state.cfg.mode, created=int(time.time()),
                        metadata=dict(record.get("metadata") or {}), turn=Turn(record.get("turn", Turn.NONE)))
            s.set_state(state)
            self.store.add(s)
            return self.session_info(s)

        return await self._call(load)

    def fork(self, owner: str, session_id: str) -> ForkJob:
        return self._submit(ForkJob(self.store.get(session_id, owner), owner))

    def export(self, owner: str, session_id: str) -> ExportJob:
        return self._submit(ExportJob(self.store.get(session_id, owner)))

    # ---------------------------------------------------------------------------------------------- work

    def ingest(self, owner: str, session_id: str, doc: TokenizedDocument, idempotency_key: str | None) -> IngestJob:
        return self._submit(IngestJob(self.store.get(session_id, owner), doc, idempotency_key))

    def generate(self, owner: str, params: SamplingParams, *, session_id: str | None = None, commit: bool = False,
                 messages: list[dict[str, str]] | None = None, prompt_ids: list[int] | None = None) -> GenerateJob:
        """A chat (messages) or a completion (prompt_ids) against a session, or against an empty state."""
        if params.max_tokens > self.config.max_tokens:
            raise InvalidRequest(f"max_tokens is {params.max_tokens}; this server allows at most "
                                 f"{self.config.max_tokens}", param="max_tokens")
        if prompt_ids is not None:
            self.check_token_ids(prompt_ids, "prompt")
        session = self.store.get(session_id, owner) if session_id is not None else None
        if commit and session is None:
            raise InvalidRequest("commit needs a session_id", param="commit")
        return self._submit(GenerateJob(session, params, commit=commit, messages=messages, prompt_ids=prompt_ids,
                                        mode=self.default_mode))

    # ---------------------------------------------------------------------------------------------- helpers for jobs

    def check_context(self, state: FamState, n_new: int) -> int | None:
        """full mode: refuse to grow past the model's context; returns the tokens left after `n_new`
        (None in the other modes, which have no limit)."""
        if state.cfg.evicts:
            return None
        ctx, have = self.rt.module.arch.max_position_embeddings, int(state.n_tokens[0])
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

    def metrics(self) -> dict[str, int]:
        resident = self.store.resident()
        with self._cv:
            queued = self._unfinished
        return {"sessions": self.store.count(), "sessions_resident": len(resident),
                "state_bytes_resident": sum(s.state_bytes for s in resident), "queue_depth": queued,
                "tokens_ingested": self.stats.tokens_ingested, "tokens_generated": self.stats.tokens_generated}

    # ---------------------------------------------------------------------------------------------- submission

    def _submit(self, job: Job) -> Job:
        with self._cv:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if self._unfinished >= self.config.max_queue:
                raise QueueFull(f"the server has {self._unfinished} requests in progress (limit "
                                f"{self.config.max_queue}); retry later", retry_after=self.config.queue_retry_after)
            self._unfinished += 1
            self._inbox.append(job)
            self._cv.notify()
        return job

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run a quick operation on the worker thread, ahead of the next slice."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            self._inbox.append(_Call(fn, future))
            self._cv.notify()
        return await asyncio.wrap_future(future)

    # ---------------------------------------------------------------------------------------------- worker thread

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._inbox or self._ready or self._bulk or self._stopping):
                        self._cv.wait()
                    if self._stopping:
                        break
                    inbox = list(self._inbox)
                    self._inbox.clear()
                for item in inbox:
                    self._accept(item)
                job = self._next_job()
                if job is not None:
                    self._slice(job)
                self.store.enforce_budget()
            self._shut_down()

    def _accept(self, item: Job | _Call) -> None:
        if isinstance(item, _Call):
            if not item.future.set_running_or_notify_cancel():
                return
            try:
                item.future.set_result(item.fn())
            except EngineError as e:
                item.future.set_exception(e)
            except Exception as e:  # a bug or a model failure: reported to this caller, the worker goes on
                log.exception("engine call failed")
                item.future.set_exception(EngineFailure(f"{type(e).__name__}: {e}"))
            return
        if item.session is None:
            self._make_ready(item)
            return
        item.session.queue.append(item)
        if len(item.session.queue) == 1:
            self._make_ready(item)

    def _make_ready(self, job: Job) -> None:
        (self._bulk if job.bulk else self._ready).append(job)

    def _next_job(self) -> Job | None:
        if self._ready and (self._owed > 0 or not self._bulk):
            self._owed -= 1
            return self._ready.popleft()
        if self._bulk:
            self._owed = len(self._ready)
            return self._bulk.popleft()
        return None

    def _slice(self, job: Job) -> None:
        start = time.monotonic()
        deadline = start + max(self.config.time_slice_seconds, 0.0 if job.bulk else self._bulk_seconds)
        try:
            if job.cancelled:
                raise Cancelled("the request was cancelled")
            if not job.started:
                job.start(self)
                if job.session is not None and not job.mutating:
                    self._release(job)  # a reader holds its own copy of the state from here on
            while not job.finished:
                if job.cancelled:
                    raise Cancelled("the request was cancelled")
                if job.mutating and job.session is not None and job.session.deleted:
                    raise SessionNotFound(job.session.id)
                job.step(self)
                if time.monotonic() >= deadline:
                    break
        except EngineError as e:
            self._end_with_error(job, e)
        except Exception as e:  # a model exception: this request fails, the worker and other sessions go on
            log.exception("job failed")
            self._end_with_error(job, EngineFailure(f"{type(e).__name__}: {e}"))
        if job.bulk:
            self._bulk_seconds = time.monotonic() - start
        if job.finished:
            self._retire(job)
        else:
            self._make_ready(job)

    def _end_with_error(self, job: Job, error: EngineError) -> None:
        try:
            job.stop(self, error)
        except EngineError as e:  # saving what the job had committed failed too
            log.error("could not save the session after a failed job: %s", e)
            job.stop(self, error, save=False)

    def _release(self, job: Job) -> None:
        q = job.session.queue if job.session is not None else None
        if q and q[0] is job:
            q.popleft()
            if q:
                self._make_ready(q[0])

    def _retire(self, job: Job) -> None:
        self._release(job)
        with self._cv:
            self._unfinished -= 1
        job.publish_end()

    def _shut_down(self) -> None:
        with self._cv:
            inbox = list(self._inbox)
            self._inbox.clear()
        gone = ShuttingDown("the server is shutting down")
        for item in inbox:
            if isinstance(item, _Call):
                item.future.set_exception(gone)
            else:
                item.stop(self, gone, save=False)
                item.publish_end()
        ready = [*self._ready, *self._bulk]
        waiting = [j for s in self.store.all() for j in s.queue if j not in ready]
        for job in [*ready, *waiting]:
            self._end_with_error(job, gone)
            job.publish_end()
        self._ready.clear()
        self._bulk.clear()
