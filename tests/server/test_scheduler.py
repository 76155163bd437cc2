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
    sched = Scheduler(step_tokens=8, bulk_seconds_busy=0.2)
    sched.observe(rows=8, bulk_rows=8, seconds=0.8)  # a row costs 0.1 s: the busy slice is 2 tokens
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
    """After interactive work, bulk slices stay at the busy size for `linger_seconds`, so the next question
    of a conversation waits behind a small slice, not a whole block; then the ingest gets whole steps again."""
    now = [0.0]
    sched = Scheduler(step_tokens=8, bulk_seconds_busy=0.2, linger_seconds=1.5, clock=lambda: now[0])
    sched.observe(rows=8, bulk_rows=8, seconds=0.8)
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
    sched = Scheduler(step_tokens=4, bulk_seconds_busy=0.1)
    sched.observe(rows=4, bulk_rows=4, seconds=0.4)  # a busy slice of 1 token
    for name in ("P", "R", "S"):
        sched.run(FakeJob(name, [3]))
    sched.run(FakeJob("I", [10], bulk=True))
    assert step(sched) == [("P", 3), ("R", 1)]
    assert step(sched) == [("S", 3), ("R", 1)]
    assert step(sched) == [("R", 1), ("I", 1)]
    assert step(sched) == [("I", 4)]


def test_work_on_one_session_runs_in_submission_order():
    sched = Scheduler(step_tokens=8, bulk_seconds_busy=0.2)
    first, second = FakeJob("1", [5], session_id="s"), FakeJob("2", [5], session_id="s")
    elsewhere = FakeJob("3", [5], session_id="t")
    assert sched.submit(first) and not sched.submit(second) and sched.submit(elsewhere)
    assert not sched.idle("s") and sched.idle("u")
    assert sched.release(second) is None  # leaving from the middle of the queue frees nothing
    sched.submit(second)
    assert sched.release(first) is second  # the next in line may start
    assert sched.release(second) is None and sched.idle("s")
    assert sched.submit(FakeJob("4", [1])) is True  # no session: starts at once


def test_the_busy_slice_is_sized_in_time_from_passes_of_ingest_alone():
    """The slice is `bulk_seconds_busy` of ingest at the cost of a row measured on passes of ingest alone: the
    same setting gives a slow machine fewer tokens than a fast one. Passes with chats' rows, or short ones, do not
    count: a decoded row or the fixed costs of a pass would make every row look dear and the slice shrink."""
    sched = Scheduler(step_tokens=256, bulk_seconds_busy=0.2)
    assert sched.busy_tokens() == 64  # nothing measured yet: a quarter of a step
    sched.observe(rows=30, bulk_rows=0, seconds=0.5)  # a prompt's pass
    sched.observe(rows=65, bulk_rows=64, seconds=0.5)  # a decode row riding along with a slice
    sched.observe(rows=100, bulk_rows=100, seconds=0.5)  # a short pass (an ingest's last tokens): fixed costs
    assert sched.busy_tokens() == 64
    sched.observe(rows=256, bulk_rows=256, seconds=2.56)  # a slow machine: 10 ms a row
    assert sched.busy_tokens() == 20
    fast = Scheduler(step_tokens=256, bulk_seconds_busy=0.2)
    fast.observe(rows=256, bulk_rows=256, seconds=0.256)  # 1 ms a row: 200 tokens, short of a block
    assert fast.busy_tokens() == 200
    fast.observe(rows=128, bulk_rows=128, seconds=0.064)  # 0.5 ms a row now: 0.75 ms on the estimate, 266
    assert fast.busy_tokens() == 256  # tokens, but never more than a step


def test_a_busy_slice_takes_a_sliver_left_to_the_end_of_its_block():
    sched = Scheduler(step_tokens=256, bulk_seconds_busy=0.2)
    sched.observe(rows=256, bulk_rows=256, seconds=256 * 0.2 / 239)  # a busy slice of 239 tokens
    assert sched.busy_tokens() == 239
    sched.run(FakeJob("I", [256, 256], bulk=True))
    sched.run(FakeJob("Q", [1] * 3))
    assert step(sched) == [("Q", 1), ("I", 256)]  # 17 tokens left would be a pass of their own
    slow = Scheduler(step_tokens=256, bulk_seconds_busy=0.2)
    slow.observe(rows=256, bulk_rows=256, seconds=256 * 0.2 / 200)
    slow.run(FakeJob("I", [256], bulk=True))
    slow.run(FakeJob("Q", [1] * 3))
    assert [step(slow), step(slow)] == [[("Q", 1), ("I", 200)], [("Q", 1), ("I", 56)]]  # 56 is no sliver
