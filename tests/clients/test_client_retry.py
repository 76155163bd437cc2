"""The retry policy as a pure decision: which outcomes are repeated, and after how long."""

from __future__ import annotations

import httpx
import pytest

from clients.retry import INITIAL_BACKOFF, MAX_BACKOFF, MAX_RETRY_AFTER, Retry, backoff, delay_before_retry


def answer(status: int, retry_after: str | None = None) -> httpx.Response:
    return httpx.Response(status, headers={"Retry-After": retry_after} if retry_after else {})


@pytest.mark.parametrize("policy", [Retry.IDEMPOTENT, Retry.IF_UNSENT])
def test_429_and_503_are_retried_after_the_server_s_retry_after(policy: Retry) -> None:
    assert delay_before_retry(policy, 0, 2, answer(429, "1.5")) == 1.5
    assert delay_before_retry(policy, 1, 2, answer(503, "0")) == 0.0


@pytest.mark.parametrize("status", [400, 404, 409, 413, 422, 500, 502])
def test_other_failures_are_not_retried(status: int) -> None:
    assert delay_before_retry(Retry.IDEMPOTENT, 0, 2, answer(status)) is None


def test_never_and_exhausted_budget_give_up() -> None:
    assert delay_before_retry(Retry.NEVER, 0, 5, answer(503)) is None
    assert delay_before_retry(Retry.NEVER, 0, 5, httpx.ConnectError("refused")) is None
    assert delay_before_retry(Retry.IDEMPOTENT, 2, 2, answer(429, "1")) is None
    assert delay_before_retry(Retry.IDEMPOTENT, 0, 0, answer(429, "1")) is None


def test_if_unsent_retries_only_failures_before_the_request_was_sent() -> None:
    for unsent in (httpx.ConnectError("refused"), httpx.ConnectTimeout("slow"), httpx.PoolTimeout("busy")):
        assert delay_before_retry(Retry.IF_UNSENT, 0, 2, unsent) is not None
    for maybe_sent in (
        httpx.ReadTimeout("slow"),
        httpx.RemoteProtocolError("reset"),
        httpx.WriteError("pipe"),
    ):
        assert delay_before_retry(Retry.IF_UNSENT, 0, 2, maybe_sent) is None
        assert delay_before_retry(Retry.IDEMPOTENT, 0, 2, maybe_sent) is not None


def test_backoff_without_a_hint_grows_exponentially_with_jitter_and_a_cap() -> None:
    for attempt in range(6):
        ceiling = min(INITIAL_BACKOFF * 2**attempt, MAX_BACKOFF)
        waits = [backoff(attempt) for _ in range(50)]
        assert all(ceiling / 2 <= wait <= ceiling for wait in waits)
        assert len(set(waits)) > 1


def test_retry_after_is_capped() -> None:
    assert backoff(0, str(10 * MAX_RETRY_AFTER)) == MAX_RETRY_AFTER
