"""The scheduler alone (no model, no torch): per-session queues and the exact plan of each engine step."""

from __future__ import annotations

from server.engine.scheduler import Scheduler


class FakeJob:
    """Feeds its `units` in order (a prompt, then one token per sampled token; or an ingest's blocks), each in
    one or more steps."""

    def __init__(self, name: str, units: list[int], bulk: bool = False, session_id: str | None = None):
        self.name, self.units, self.bulk, self.session_id = name, list(units), bulk, session_id

    def demand(self) -> int:
        return self.units[0]

    @property
    def left(self) -> int:
        return sum(self.units)

    def consume(self, n: int) -> None:
        self.units[0] -= n
        if not self.units[0]:
            self.units.pop(0)


def step(sched: Scheduler) -> list[tuple[str, int]]:
    """Plan one step and let every job consume what it got; finished jobs leave."""
    plan = sched.schedule()
    for job, n in plan:
        assert 0 < n <= job.demand()
        job.consume(n)
        if not job.units:
            sched.remove(job)
    return [(job.name, n) for job, n in plan]


def test_a_question_waits_behind_a_bounded_slice_of_ingest():
    sched = Scheduler(step_tokens=8, bulk_tokens_busy=2)
    for name in "AB":
        sched.run(FakeJob(name, [16] * 10, bulk=True))
    assert [step(sched), step(sched)] == [[("A", 8)], [("B", 8)]]  # alone, an ingest gets the whole step
    question = FakeJob("Q", [11, 1, 1, 1])  # an 11-token prompt, then three sampled tokens fed back
    sched.run(question)
    assert step(sched) == [("Q", 8)]  # a prompt's step carries no ingest
    assert step(sched) == [("Q", 3)]
    assert step(sched) == [("Q", 1), ("A", 2)]  # decoding: the ingests ride along, shrunk to 2 tokens
    sched.run(decoder := FakeJob("D", [1, 1]))  # a second generation joins the batch
    assert [step(sched), step(sched), step(sched)] == [
        [("Q", 1), ("D", 1), ("B", 2)],
        [("Q", 1), ("D", 1), ("A", 2)],  # both finish
        [("B", 6)],  # nothing interactive: an ingest gets the whole step again (here: the rest of its block)
    ]
    assert decoder.left == question.left == 0


def test_ingest_slices_stay_small_for_a_while_after_a_chat():
    """After interactive work, bulk slices stay at `bulk_tokens_busy` for `linger_seconds`, so the next question
    of a conversation waits behind a small slice, not a whole block; then the ingest gets whole steps again."""
    now = [0.0]
    sched = Scheduler(step_tokens=8, bulk_tokens_busy=2, linger_seconds=1.5, clock=lambda: now[0])
    sched.run(ingest := FakeJob("I", [64], bulk=True))
    assert step(sched) == [("I", 8)]
    sched.run(FakeJob("Q", [1]))
    assert step(sched) == [("Q", 1), ("I", 2)]
    now[0] = 1.0
    assert step(sched) == [("I", 2)]  # Q finished 1 s ago: still lingering
    now[0] = 1.6
    assert step(sched) == [("I", 8)]
    sched.run(FakeJob("R", [1]))  # a chat while no ingest waits starts the linger too
    sched.remove(ingest)
    assert step(sched) == [("R", 1)]
    sched.run(ingest)
    now[0] = 2.0
    assert step(sched) == [("I", 2)]


def test_prompts_beyond_the_budget_go_first_in_the_next_step():
    sched = Scheduler(step_tokens=4, bulk_tokens_busy=1)
    for name in ("P", "R", "S"):
        sched.run(FakeJob(name, [3]))
    sched.run(FakeJob("I", [10], bulk=True))
    assert step(sched) == [("P", 3), ("R", 1)]
    assert step(sched) == [("S", 3), ("R", 1)]
    assert step(sched) == [("R", 1), ("I", 1)]
    assert step(sched) == [("I", 4)]


def test_work_on_one_session_runs_in_submission_order():
    sched = Scheduler(step_tokens=8, bulk_tokens_busy=2)
    first, second = FakeJob("1", [5], session_id="s"), FakeJob("2", [5], session_id="s")
    elsewhere = FakeJob("3", [5], session_id="t")
    assert sched.submit(first) and not sched.submit(second) and sched.submit(elsewhere)
    assert not sched.idle("s") and sched.idle("u")
    assert sched.release(second) is None  # leaving from the middle of the queue frees nothing
    sched.submit(second)
    assert sched.release(first) is second  # the next in line may start
    assert sched.release(second) is None and sched.idle("s")
    assert sched.submit(FakeJob("4", [1])) is True  # no session: starts at once
