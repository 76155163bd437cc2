"""The client's result types, built from the server's JSON.

Each ``from_dict`` reads the fields the API guarantees and ignores any others, so a newer server that adds
fields still works; a missing or mistyped guaranteed field raises :class:`ProtocolError`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict, TypeVar

from clients.errors import ProtocolError

T = TypeVar("T")


def parse(build: Callable[[Mapping[str, Any]], T], data: Any, what: str) -> T:
    """``build(data)``, turning a malformed body into a :class:`ProtocolError` naming ``what``."""
    if not isinstance(data, Mapping):
        raise ProtocolError(f"expected a JSON object for {what}, got {type(data).__name__}")
    try:
        return build(data)
    except (KeyError, TypeError, IndexError) as exc:
        raise ProtocolError(f"malformed {what} from server: {exc!r}") from exc


class Sampling(TypedDict, total=False):
    """Generation options forwarded unchanged to the OpenAI-compatible endpoints."""

    model: str
    max_tokens: int
    temperature: float
    top_p: float
    stop: str | list[str]
    seed: int


@dataclass(frozen=True)
class Session:
    """A server-side document session: its FAM memory state plus bookkeeping."""

    id: str
    mode: str
    model: str
    tokens: int
    state_bytes: int
    created: int
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Session:
        return cls(
            id=data["id"],
            mode=data["mode"],
            model=data["model"],
            tokens=data["tokens"],
            state_bytes=data["state_bytes"],
            created=data["created"],
            metadata=dict(data.get("metadata") or {}),
        )


@dataclass(frozen=True)
class IngestProgress:
    """One progress event of a streaming ingest; page counts are None for plain text."""

    tokens_done: int
    tokens_total: int
    pages_done: int | None = None
    pages_total: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IngestProgress:
        return cls(data["tokens_done"], data["tokens_total"], data.get("pages_done"), data.get("pages_total"))


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Usage:
        return cls(data["prompt_tokens"], data["completion_tokens"], data["total_tokens"])


@dataclass(frozen=True)
class Completion:
    """The result of a non-streaming ``complete`` or ``chat`` call (the first and only choice)."""

    id: str
    model: str
    text: str
    finish_reason: str | None
    usage: Usage | None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Completion:
        choice = data["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        usage = data.get("usage")
        return cls(
            id=data["id"],
            model=data["model"],
            text=text or "",
            finish_reason=choice.get("finish_reason"),
            usage=Usage.from_dict(usage) if usage else None,
        )


@dataclass(frozen=True)
class Model:
    id: str
    owned_by: str | None = None
    created: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Model:
        return cls(data["id"], data.get("owned_by"), data.get("created"))
