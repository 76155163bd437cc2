"""The engine: one model worker thread and the async operations the HTTP layer calls.

The worker loop is schedule -> execute -> commit, one batched model pass per step:

    schedule  run the quick calls that arrived (create, delete, import), queue the submitted jobs and start those
              at the head of their session's queue; then `Scheduler.schedule` picks the step's jobs and how many
              tokens each feeds (every generating session one token, prompts a chunk, one ingest a slice: see
              `server.engine.scheduler` for the exact rule and its fairness bound).
    execute   each picked job plans a `Work` (state, tokens, which logits); the `Executor` runs them all in one
              pass (`FamRuntime.forward_many`) and is the only code that calls the model.
    commit    each job commits its `Output`: samples, posts events, and (at block boundaries, or at its end)
              writes the new state into its session and saves the snapshot. Finished jobs retire and hand
              their session to the next job in line.

A cancelled job stops before its next step; an exception in a job ends that job only. Every model call happens on
the worker thread under `torch.inference_mode()`; the event loop only submits and awaits.
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

from model import FamRuntime, SamplingParams
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
    EngineError,
    EngineFailure,
    InvalidRequest,
    LeaseLost,
    QueueFull,
    SessionBusy,
    SessionNotFound,
    ShuttingDown,
)
from server.engine.executor import Executor
from server.engine.jobs import ExportJob, ForkJob, GenerateJob, IngestJob, Job, JobContext
from server.engine.scheduler import Scheduler
from server.engine.store import Session, SessionInfo, SessionStore, new_session_id, open_backend
from server.engine.work import Work

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Call:
    fn: Callable[[], Any]
    future: concurrent.futures.Future


LEASE_POLL_SECONDS = 0.05  # how often a job waiting for another replica's lease on its session asks again

# The mode of new sessions when the server is not told one: the loaded adapter's `default_mode`, the mode its depth
# test showed it holds to (the bundled adapter: `fam`, never more than 1 point below sink to 1M tokens), else `sink`:
# untrained FAM collapses after ~12 blocks (docs/untrained_fam.md). A session asked for in any mode gets it.
DEFAULT_MODE = "sink"


class Engine:
    def __init__(self, rt: FamRuntime, config: EngineConfig):
        self.rt, self.config = rt, config
        backend = open_backend(config.data_dir, config.store_url, config.lease_seconds)
        self.store = SessionStore(rt, backend, config.secret, config.memory_budget_bytes)
        self.chat = ChatFormat(rt.chat_text, rt.decode([rt.tokenizer.eos_token_id]))
        self.default_mode = config.default_mode or (rt.adapter.default_mode if rt.adapter else DEFAULT_MODE)
        self._tokenizer_lock = threading.Lock()  # one tokenizer, used from the worker and helper threads
        self._exact_chunks = chunking_is_exact(self.encode_document)
        self.ctx = JobContext(config=config, store=self.store, chat=self.chat, model_name=rt.name,
                              context_limit=rt.module.arch.max_position_embeddings, encode=self.encode,
                              decode=self.decode, new_state=lambda mode: rt.new_state(mode=mode),
                              eos_ids=rt.eos_token_ids)
        self.stats = self.ctx.stats
        # worker thread only
        self.scheduler = Scheduler(config.step_tokens, config.bulk_seconds_busy, config.bulk_linger_seconds)
        self.executor = Executor(rt)
        self._cv = threading.Condition()
        self._inbox: deque[Job | _Call] = deque()  # from the event loop to the worker (under _cv)
        self._unfinished = 0  # submitted jobs not yet retired (under _cv)
        self._awaiting_lease: dict[Job, float] = {}  # job -> when it gives up (worker thread only)
        self._stopping = False
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

    def session_info(self, s: Session) -> SessionInfo:
        return s.info(self.rt.name)

    def get_session(self, owner: str, session_id: str) -> SessionInfo:
        return self.session_info(self.store.current(session_id, owner))

    def list_sessions(self, owner: str) -> list[SessionInfo]:
        return [self.session_info(s) for s in self.store.list(owner)]

    async def create_session(self, owner: str, mode: str | None, metadata: dict[str, Any]) -> SessionInfo:
        mode = mode or self.default_mode
        if mode not in MODES:
            raise InvalidRequest(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}", param="mode")

        def create() -> SessionInfo:
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

    async def import_snapshot(self, owner: str, data: bytes) -> SessionInfo:
        def load() -> SessionInfo:
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
                 messages: list[dict[str, str]] | None = None, prompt_ids: list[int] | None = None,
                 logprobs: int | None = None, echo: bool = False) -> GenerateJob:
        """A chat (messages) or a completion (prompt_ids) against a session, or against an empty state.
        `logprobs`: return each sampled token's logprob and that many alternatives; `echo` (completions): return
        the prompt too, with its tokens' logprobs when `logprobs` is set."""
        if params.max_tokens > self.config.max_tokens:
            raise InvalidRequest(f"max_tokens is {params.max_tokens}; this server allows at most "
                                 f"{self.config.max_tokens}", param="max_tokens")
        if params.max_tokens == 0 and not echo:
            raise InvalidRequest("max_tokens=0 returns nothing without echo", param="max_tokens")
        if logprobs is not None and not 0 <= logprobs <= self.config.max_logprobs:
            raise InvalidRequest(f"logprobs takes 0..{self.config.max_logprobs} alternatives", param="logprobs")
        if prompt_ids is not None:
            self.check_token_ids(prompt_ids, "prompt")
        session = self.store.get(session_id, owner) if session_id is not None else None
        if commit and session is None:
            raise InvalidRequest("commit needs a session_id", param="commit")
        return self._submit(GenerateJob(session, params, commit=commit, messages=messages, prompt_ids=prompt_ids,
                                        mode=self.default_mode, logprobs=logprobs, echo=echo))

    def check_session_room(self) -> None:
        self.ctx.check_session_room()

    def metrics(self) -> dict[str, int]:
        resident = self.store.resident()
        with self._cv:
            queued = self._unfinished
        return {"sessions": self.store.count(), "sessions_resident": len(resident),
                "state_bytes_resident": sum(s.state_bytes for s in resident), "queue_depth": queued,
                "tokens_ingested": self.stats.tokens_ingested, "tokens_generated": self.stats.tokens_generated,
                "ingest_busy_tokens": self.scheduler.busy_tokens()}

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
                    while not (self._inbox or self.scheduler.has_work() or self._stopping):
                        if not self._cv.wait(LEASE_POLL_SECONDS if self._awaiting_lease else None):
                            break  # time to ask for the leases again
                    if self._stopping:
                        break
                    inbox = list(self._inbox)
                    self._inbox.clear()
                for job in list(self._awaiting_lease):
                    self._start(job)
                for item in inbox:
                    self._accept(item)
                self._step()
                self.store.enforce_budget(self.scheduler.idle)
                if not self.scheduler.has_work():
                    self.executor.release()  # the decode buffers are not kept while the worker waits
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
        if self.scheduler.submit(item):
            self._start(item)

    def _start(self, job: Job) -> None:
        """The job may touch its session now (a job that changes it first takes its lease)."""
        try:
            self._check(job)
            if not self._leased(job):
                return  # another replica holds the session: asked again every LEASE_POLL_SECONDS
            job.start(self.ctx)
        except Exception as e:
            self._fail(job, e)
            return
        if job.finished:
            self._retire(job)
            return
        if job.session is not None and not job.mutating:
            self._release(job)  # a reader holds its own copy of the state from here on
        self.scheduler.run(job)

    def _leased(self, job: Job) -> bool:
        """Whether the job may start: it reads, or it holds its session's lease now. Gives up (session_busy)
        after `lease_wait_seconds`."""
        s = job.session
        if not job.mutating or s is None:
            return True
        if self.store.acquire(s):
            self._awaiting_lease.pop(job, None)
            return True
        wait = self.config.lease_wait_seconds
        give_up = self._awaiting_lease.setdefault(job, time.monotonic() + wait)
        if time.monotonic() < give_up:
            return False
        del self._awaiting_lease[job]
        raise SessionBusy(f"another server has been working on session {s.id} for more than {wait:g} s (it holds "
                          "the session's lease); retry later", retry_after=max(1, round(self.config.lease_seconds)))

    def _check(self, job: Job) -> None:
        if job.cancelled:
            raise Cancelled("the request was cancelled")
        s = job.session
        if job.mutating and s is not None:
            if s.deleted:
                raise SessionNotFound(s.id)
            if self.store.lease_lost(s):
                raise LeaseLost(s.id)

    def _step(self) -> None:
        planned: list[tuple[Job, Work]] = []
        for job, n in self.scheduler.schedule():
            try:
                self._check(job)
                planned.append((job, job.plan(n)))
            except Exception as e:
                self._fail(job, e)
        if not planned:
            return
        start = time.monotonic()
        outputs = self.executor.run([w for _, w in planned])
        self.scheduler.observe(sum(len(w.tokens) for _, w in planned),
                               sum(len(w.tokens) for job, w in planned if job.bulk), time.monotonic() - start)
        for (job, _), out in zip(planned, outputs, strict=True):
            try:
                if isinstance(out, Exception):
                    raise out
                job.commit(self.ctx, out)
            except Exception as e:
                self._fail(job, e)
                continue
            if job.finished:
                self._retire(job)

    def _fail(self, job: Job, error: Exception) -> None:
        if not isinstance(error, EngineError):  # a model exception: this request fails, the worker goes on
            log.error("job failed", exc_info=error)
            error = EngineFailure(f"{type(error).__name__}: {error}")
        try:
            job.stop(self.ctx, error)
        except EngineError as e:  # saving what the job had committed failed too
            log.error("could not save the session after a failed job: %s", e)
            job.stop(self.ctx, error, save=False)
        self._retire(job)

    def _release(self, job: Job) -> None:
        nxt = self.scheduler.release(job)
        if nxt is not None:
            self._start(nxt)  # type: ignore[arg-type]

    def _retire(self, job: Job) -> None:
        self.scheduler.remove(job)
        self._awaiting_lease.pop(job, None)
        if job.mutating and job.session is not None:
            self.store.release(job.session)
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
                item.stop(self.ctx, gone, save=False)
                item.publish_end()
        for job in list(self.scheduler.jobs()):
            try:
                job.stop(self.ctx, gone)  # type: ignore[attr-defined]
            except EngineError as e:
                log.error("could not save the session at shutdown: %s", e)
                job.stop(self.ctx, gone, save=False)  # type: ignore[attr-defined]
            job.publish_end()  # type: ignore[attr-defined]
        self.store.close()  # gives this server's leases back
