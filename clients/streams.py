"""Streaming generation results: text pieces as they arrive, then the usage and finish reason."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, Self

import httpx

from clients.types import Usage, parse


class GenerationStream:
    """What streaming text results share: turning chunks into text pieces while keeping the finish reason
    and the usage (sent by the server in a last chunk with no choices)."""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.finish_reason: str | None = None

    def _piece(self, chunk: Mapping[str, Any]) -> str:
        if chunk.get("usage"):
            self.usage = parse(Usage.from_dict, chunk["usage"], "usage")
        choices = chunk.get("choices") or []
        if not choices:
            return ""
        choice = choices[0]
        self.finish_reason = choice.get("finish_reason") or self.finish_reason
        text = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
        return text or ""


class TextStream(GenerationStream):
    """The text pieces of a streaming completion, in order, as the server generates them.

    Iterate it once. When iteration ends, ``usage`` (token counts) and ``finish_reason`` are set. Use it as a
    context manager, or call :meth:`close`, to drop the connection when stopping early.
    """

    def __init__(self, response: httpx.Response, payloads: Iterator[dict[str, Any]]) -> None:
        super().__init__()
        self._response = response
        self._pieces = self._generate(payloads)

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def _generate(self, payloads: Iterator[dict[str, Any]]) -> Iterator[str]:
        try:
            for payload in payloads:
                if piece := self._piece(payload):
                    yield piece
        finally:
            self.close()

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncTextStream(GenerationStream):
    """The asynchronous :class:`TextStream`: ``async for piece in stream``, then ``stream.usage``."""

    def __init__(self, response: httpx.Response, payloads: AsyncIterator[dict[str, Any]]) -> None:
        super().__init__()
        self._response = response
        self._pieces = self._generate(payloads)

    def __aiter__(self) -> AsyncIterator[str]:
        return self._pieces

    async def _generate(self, payloads: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
        try:
            async for payload in payloads:
                if piece := self._piece(payload):
                    yield piece
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        await self._response.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
