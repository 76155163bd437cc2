"""When the client repeats a failed request, and how long it waits first.

A request is repeated only when doing it twice cannot change the outcome. Each call declares which of the
three policies it falls under:

``IDEMPOTENT``
    Repeating is harmless: reads (GET), DELETE, tokenize/detokenize, completions that do not commit, and
    ingest, which always carries an ``Idempotency-Key`` so the server ingests a repeated upload only once.
    Retried after any transport failure (refused, reset, timed out) and after 429/503 answers.
``IF_UNSENT``
    Repeating could do the work twice (create, fork, import a session), so only failures that prove the
    server did nothing are retried: the connection could not be opened, or a 429/503 refusal.
``NEVER``
    Completions with ``commit=true`` append to the session; they are never repeated.

Streams are never repeated once the server has answered with a success status: the retry loop ends at the
response headers, and a stream that breaks later raises to the caller.

The wait honours the server's ``Retry-After`` (capped at :data:`MAX_RETRY_AFTER`); otherwise it backs off
exponentially with jitter.
"""

from __future__ import annotations

import random
from enum import Enum

import httpx

from clients.errors import parse_retry_after

RETRY_STATUSES = frozenset({429, 503})
INITIAL_BACKOFF = 0.5
MAX_BACKOFF = 8.0
MAX_RETRY_AFTER = 60.0

# Raised before any byte of the request reached the server.
UNSENT_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
)


class Retry(Enum):
    IDEMPOTENT = "idempotent"
    IF_UNSENT = "if_unsent"
    NEVER = "never"


def backoff(attempt: int, retry_after: str | None = None) -> float:
    """Seconds to wait before retry number ``attempt + 1``: the server's Retry-After when it sent one,
    else ``INITIAL_BACKOFF * 2**attempt`` (at most ``MAX_BACKOFF``) scaled by a random factor in [0.5, 1]."""
    hinted = parse_retry_after(retry_after)
    if hinted is not None:
        return min(hinted, MAX_RETRY_AFTER)
    return min(INITIAL_BACKOFF * 2**attempt, MAX_BACKOFF) * random.uniform(0.5, 1.0)


def delay_before_retry(
    policy: Retry, attempt: int, max_retries: int, outcome: httpx.Response | httpx.TransportError
) -> float | None:
    """Seconds to wait before repeating a request whose attempt number ``attempt`` (0-based) ended in
    ``outcome`` (an unsuccessful response, or the transport error raised instead), or None to give up."""
    if policy is Retry.NEVER or attempt >= max_retries:
        return None
    if isinstance(outcome, httpx.Response):
        if outcome.status_code not in RETRY_STATUSES:
            return None
        return backoff(attempt, outcome.headers.get("retry-after"))
    if policy is Retry.IF_UNSENT and not isinstance(outcome, UNSENT_ERRORS):
        return None
    return backoff(attempt)
