"""What the engine refuses, and why. Each error has a stable string `code` (the API's error code); the HTTP
layer maps codes to statuses in one table (`server.errors`), so nothing here knows about HTTP."""

from __future__ import annotations


class EngineError(Exception):
    code = "server_error"
    retry_after: int | None = None  # seconds: the request may be repeated after that long (sent as Retry-After)

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


class InvalidRequest(EngineError):
    """The request is well-formed but asks for something impossible (bad value, unknown role, empty text)."""

    code = "invalid_value"


class ContextLengthExceeded(InvalidRequest):
    """`full` mode only: the session would grow past the model's context."""

    code = "context_length_exceeded"


class IdempotencyKeyReused(InvalidRequest):
    """An Idempotency-Key already used on this session for a different document."""

    code = "idempotency_key_reused"


class SessionNotFound(EngineError):
    code = "session_not_found"

    def __init__(self, session_id: str):
        super().__init__(f"no session {session_id!r}", param="session_id")


class TooManySessions(EngineError):
    code = "too_many_sessions"


class QueueFull(EngineError):
    code = "queue_full"

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class SessionBusy(EngineError):
    """Another replica holds the session's lease (it is working on the session) for longer than this one waits."""

    code = "session_busy"

    def __init__(self, message: str, retry_after: int):
        super().__init__(message, param="session_id")
        self.retry_after = retry_after


class LeaseLost(EngineError):
    """This replica lost the session's lease while it worked (paused past the lease, or partitioned from the
    store): what it had not committed is dropped, the session is as of its last commit. Retry the request."""

    code = "lease_lost"

    def __init__(self, session_id: str, retry_after: int = 1):
        super().__init__(f"this server lost the lease of session {session_id} while working on it (another server "
                         "took the session over, or this one was paused or cut off from the store); its last change "
                         "was not saved, the session is as of its last commit. Retry the request",
                         param="session_id")
        self.retry_after = retry_after


class StoreUnavailable(EngineError):
    """The session store (Redis) cannot be reached."""

    code = "store_unavailable"

    def __init__(self, message: str, retry_after: int = 2):
        super().__init__(message)
        self.retry_after = retry_after


class StoreFull(EngineError):
    """The session store refused a write because it is out of memory (Redis at maxmemory with noeviction):
    nothing committed before is lost; free room (delete sessions) or give the store more memory."""

    code = "store_full"


class DocumentTooLarge(EngineError):
    code = "payload_too_large"


class PdfEncrypted(EngineError):
    code = "pdf_encrypted"


class PdfInvalid(EngineError):
    code = "pdf_invalid"


class PdfNoText(EngineError):
    code = "pdf_no_text"


class InvalidSnapshot(EngineError):
    """Not a snapshot, tampered with, signed by another server, or saved under another model/configuration."""

    code = "invalid_snapshot"


class ShuttingDown(EngineError):
    code = "shutting_down"


class Cancelled(EngineError):
    """The request was cancelled (its client went away) before it finished."""

    code = "cancelled"


class EngineFailure(EngineError):
    """An unexpected failure inside the engine (a model exception, a corrupted file on disk, a full disk):
    reported to the one request it happened in."""

    code = "server_error"
