"""The scheduler: per-session queues, and which jobs advance by how many tokens in each engine step.

Work on one session runs in submission order: a job may start when it reaches the head of its session's queue
(jobs without a session start at once). A reading job (generation without commit, fork, export) leaves the queue
as soon as it holds its copy of the state; a mutating one (ingest, committed generation) keeps the head until it
ends.

A step is one batched model pass, planned here from the jobs' demands (`Job.demand()`: the tokens a job could feed
now, at most to the end of its current block):

- every interactive job (generation), in round-robin order, gets its demand while `step_tokens` lasts: a decoding
  job asks for one token, so every generating session advances one token per step (continuous batching); a prompt
  asks for a chunk. When the budget runs out, the jobs left over go first in the next step.
- then one bulk job (ingest), round robin, gets a busy slice if any interactive job was planned in this step or
  in the last `linger_seconds`, else at most `step_tokens`; but nothing in a step that carries a prompt (an
  interactive demand of more than one token), so a question's first token waits for no ingest.

The busy slice is sized in time, not tokens: as many tokens as `bulk_seconds_busy` of ingest work, at the cost
of a row measured on whole-block passes of ingest alone (`observe`). The same token count is a short pass on a
fast machine and a long one on a slow one: 256 tokens take ~0.18 s in bf16 on 2 AMX cores and ~0.55 s in float32
on 2 AVX2 cores, so no fixed count keeps both a question's wait and the ingest's share (README: engine
benchmark).

So a question's prompt waits for no ingest and its tokens behind about `bulk_seconds_busy` of ingest per step, and
an ingest advances in every step without a prompt (only prompts arriving in every step would hold it back). A
question arriving while no interactive work runs waits for the step in flight: a whole block of ingest after a
quiet spell, but only a busy slice while chats come and go (the linger).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol


class Schedulable(Protocol):
    @property
    def session_id(self) -> str | None: ...

    bulk: bool

    def demand(self) -> int: ...


# Weight of the latest pass in the running estimate of an ingest row's cost (`Scheduler.observe`).
ROW_COST_WEIGHT = 0.5


class Scheduler:
    def __init__(self, step_tokens: int, bulk_seconds_busy: float, linger_seconds: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        assert step_tokens >= 1 and bulk_seconds_busy > 0 and linger_seconds >= 0
        self.step_tokens, self.bulk_seconds_busy = step_tokens, bulk_seconds_busy
        self.linger_seconds, self._clock = linger_seconds, clock
        self._row_seconds: float | None = None  # an ingest row's cost, from passes of ingest alone (observe)
        self._busy_until = float("-inf")  # bulk slices stay small until then (the last interactive step + linger)
        self._queues: dict[str, deque[Schedulable]] = {}
        self._interactive: deque[Schedulable] = deque()  # started jobs with model work, round robin
        self._bulk: deque[Schedulable] = deque()

    # ---------------------------------------------------------------------------------------------- queues

    def submit(self, job: Schedulable) -> bool:
        """Queue a job; True when it may start now."""
        if job.session_id is None:
            return True
        q = self._queues.setdefault(job.session_id, deque())
        q.append(job)
        return len(q) == 1

    def release(self, job: Schedulable) -> Schedulable | None:
        """The job leaves its session's queue; returns the job that now heads the queue and may start."""
        q = self._queues.get(job.session_id) if job.session_id is not None else None
        if not q or job not in q:
            return None
        head = q[0] is job
        q.remove(job)
        if not q:
            del self._queues[job.session_id]
            return None
        return q[0] if head else None

    def run(self, job: Schedulable) -> None:
        """A started job with model work to do joins the steps."""
        (self._bulk if job.bulk else self._interactive).append(job)

    def remove(self, job: Schedulable) -> None:
        for runnable in (self._interactive, self._bulk):
            if job in runnable:
                runnable.remove(job)

    def idle(self, session_id: str) -> bool:
        """No job waits on or works on the session."""
        return session_id not in self._queues

    def has_work(self) -> bool:
        return bool(self._interactive or self._bulk)

    def jobs(self) -> Iterator[Schedulable]:
        """Every job the scheduler knows (running or queued), each once."""
        seen: set[int] = set()
        for job in [*self._interactive, *self._bulk, *(j for q in self._queues.values() for j in q)]:
            if id(job) not in seen:
                seen.add(id(job))
                yield job

    # ---------------------------------------------------------------------------------------------- steps

    def observe(self, rows: int, bulk_rows: int, seconds: float) -> None:
        """A pass of `rows` rows, `bulk_rows` of them ingest, took `seconds`. Passes of ingest alone, of at least
        half a step (whole blocks, as an ingest runs unloaded), update the cost of a row the busy slice is sized
        by. The others say little about it: a pass with a decoded row costs that row's weight reads whatever its
        other rows, and in a short pass the fixed costs weigh (on 2 AMX cores in bf16, passes of 60-200 rows came
        to 1.0-1.7 ms a row against 0.65 for whole blocks)."""
        if bulk_rows != rows or rows < max(1, self.step_tokens // 2) or seconds <= 0:
            return
        cost = seconds / rows
        old = self._row_seconds
        self._row_seconds = cost if old is None else old + ROW_COST_WEIGHT * (cost - old)

    def busy_tokens(self) -> int:
        """Ingest tokens of a step while chats run: `bulk_seconds_busy` of ingest work at the observed cost of a
        row, at most `step_tokens`; a quarter of a step before any pass of ingest alone was observed. The chats'
        rows in the same pass come on top, and a slice that would leave less than a quarter of itself to the end
        of its block takes that rest too (`schedule`): 239 tokens of a 256-token block left 17 for a pass of their
        own, and the ingest kept 0.59x its rate under chats where whole blocks kept 0.78-0.83x (2 AMX cores)."""
        if self._row_seconds is None:
            return max(1, self.step_tokens // 4)
        return max(1, min(self.step_tokens, int(self.bulk_seconds_busy / self._row_seconds)))

    def schedule(self) -> list[tuple[Schedulable, int]]:
        """The next step: (job, tokens) pairs, at most one per job."""
        plan: list[tuple[Schedulable, int]] = []
        budget = self.step_tokens
        for job in self._interactive:
            if budget == 0:
                break
            n = min(job.demand(), budget)
            plan.append((job, n))
            budget -= n
        self._interactive.rotate(-len(plan))  # the jobs left out go first next time
        if plan:
            self._busy_until = self._clock() + self.linger_seconds
        if self._bulk and not any(n > 1 for _, n in plan):  # a prompt's step carries no ingest: its first token
            busy = bool(plan) or self._clock() < self._busy_until
            job = self._bulk[0]
            want, n = job.demand(), self.busy_tokens() if busy else self.step_tokens
            if busy and want - n < n // 4:  # the sliver left to the end of the block would cost a pass of its own
                n = want
            plan.append((job, min(want, n)))
            self._bulk.rotate(-1)
        return plan
