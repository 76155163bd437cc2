"""ASGI middleware that runs before routing: API-key authentication and the request body limit.

Both answer in the API's error shape and run before FastAPI reads the body, so an unauthenticated or
oversized request is refused before anything else looks at it.
"""

from __future__ import annotations

import hmac
from hashlib import sha256

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_response

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


def owner_of(api_key: str) -> str:
    """Sessions belong to the hash of the key that created them (the key itself is never stored)."""
    return sha256(api_key.encode()).hexdigest()


class AuthMiddleware:
    """With keys configured, /v1/* and the tokenizer routes need `Authorization: Bearer <key>`; the key's
    hash becomes `request.state.owner`. Without keys every request's owner is ""."""

    def __init__(self, app: ASGIApp, api_keys: list[str]):
        self.app = app
        self.owners = [owner_of(k) for k in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            owner = ""
            path = scope["path"]
            if self.owners and (path == "/v1" or path.startswith(PROTECTED_PREFIXES)):
                owner = self._owner(dict(scope["headers"]).get(b"authorization", b""))
                if owner is None:
                    response = error_response("unauthorized", "a valid API key is required "
                                              "(Authorization: Bearer <key>)",
                                              headers={"WWW-Authenticate": "Bearer"})
                    await response(scope, receive, send)
                    return
            scope.setdefault("state", {})["owner"] = owner
        await self.app(scope, receive, send)

    def _owner(self, header: bytes) -> str | None:
        scheme, _, key = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        candidate = owner_of(key.strip())
        found = None
        for owner in self.owners:  # compare against every key: the time taken does not tell which matched
            if hmac.compare_digest(owner, candidate):
                found = owner
        return found


def too_large(limit: int) -> str:
    return f"the request body is larger than this server accepts ({limit} bytes, FAM_MAX_BODY_BYTES)"


class PayloadTooLarge(HTTPException):
    """Raised while the body is read; FastAPI passes HTTPExceptions from body parsing through unchanged."""

    def __init__(self, limit: int):
        super().__init__(413, too_large(limit))


class BodyLimitMiddleware:
    """Refuse bodies over `max_bytes`: at once when Content-Length says so, else when the stream passes it."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await error_response("invalid_body", "invalid Content-Length header")(scope, receive, send)
                return
            if int(declared) > self.max_bytes:
                await error_response("payload_too_large", too_large(self.max_bytes))(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise PayloadTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)
