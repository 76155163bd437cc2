"""The engine's configuration: limits, storage and scheduling knobs (built from `server.settings`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EngineConfig:
    data_dir: Path  # snapshots live in data_dir/sessions (unless store_url is set)
    secret: bytes  # HMAC-SHA256 key that signs every snapshot (on disk and exported)
    default_mode: str | None = None  # mode of new sessions and of session-less requests; None = engine.DEFAULT_MODE
    max_sessions: int = 1000  # resident + spilled
    max_queue: int = 64  # unfinished jobs (running or waiting) before new work is refused
    max_tokens: int = 4096  # cap on one request's max_tokens
    max_pdf_pages: int = 2000
    memory_budget_bytes: int = 2 * 2**30  # sum of resident states' nbytes; idle sessions above it spill to disk
    checkpoint_seconds: float = 60.0  # a long ingest saves its session at least this often
    # One engine step is one batched model pass (see server.engine.scheduler): generations first, at most
    # `step_tokens` tokens between them (each decoding session feeds one), then one ingest slice: while generations
    # run and for `bulk_linger_seconds` after one ran, as many tokens as `bulk_seconds_busy` of ingest work (at
    # the cost of a row the engine measures), else at most `step_tokens` (a block at the default).
    step_tokens: int = 256
    bulk_seconds_busy: float = 0.3
    bulk_linger_seconds: float = 2.0
    max_logprobs: int = 20  # alternatives per token that logprobs / top_logprobs may ask for
    max_idempotency_keys: int = 256  # remembered per session (oldest forgotten first)
    queue_retry_after: int = 2  # seconds, sent with queue_full
    # None: sessions live in data_dir; "redis://host:port/db": in that Redis, shared with other replicas
    store_url: str | None = None
    lease_seconds: float = 10.0  # a replica's lease on a session it changes lasts this long unless renewed
    lease_wait_seconds: float = 30.0  # a change waits this long for another replica's lease, then session_busy
