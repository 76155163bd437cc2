"""Server-sent events (SSE) decoding: the one parser every streaming call in the client goes through.

The wire format (WHATWG HTML, "Server-sent events") is line based. Lines end in ``\\r\\n``, ``\\n`` or
``\\r``; each line is ``field: value``; a blank line dispatches the event built so far:

    : ping                      <- comment, ignored (servers send these as keep-alives)
    event: progress             <- event type, "message" when absent
    id: 7
    data: {"tokens_done": 10,   <- several data lines are joined with "\\n"
    data:  "tokens_total": 99}
                                <- blank line: dispatch

Only those three line endings split lines. ``str.splitlines`` (and so ``httpx.Response.iter_lines``) also
splits on U+2028, U+0085 and friends, which a JSON encoder run with ``ensure_ascii=False`` leaves raw inside
strings, so the decoder does its own splitting on the raw bytes.

One deliberate deviation from the spec: an event still pending when the stream ends (the server closed
without the final blank line) is dispatched rather than dropped. Callers that need to know whether a stream
was complete should look for their own terminator, as the client does with ``data: [DONE]``.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass

_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One dispatched event. ``id`` is the last event id seen on the stream so far, as the spec defines it;
    ``retry`` is the reconnection time (ms) sent in this event's block, if any."""

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Incremental decoder. Feed it raw chunks with :meth:`feed` (any split, even inside a UTF-8 character
    or between ``\\r`` and ``\\n``), or already-split lines with :meth:`decode_line`; call :meth:`close` at
    the end of the stream."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._buffer = ""
        self._first_line = True
        self._data: list[str] = []
        self._event = ""
        self._retry: int | None = None
        self._last_id: str | None = None

    def feed(self, chunk: bytes | str) -> list[ServerSentEvent]:
        """Decode a chunk of the stream; returns the events it completed (often none)."""
        self._buffer += self._utf8.decode(chunk) if isinstance(chunk, bytes) else chunk
        return self._decode_lines(final=False)

    def close(self) -> list[ServerSentEvent]:
        """End of stream: decode what is buffered, including an event that lacks its final blank line."""
        self._buffer += self._utf8.decode(b"", final=True)
        events = self._decode_lines(final=True)
        if self._buffer:
            events += self._maybe(self.decode_line(self._buffer))
            self._buffer = ""
        return events + self._maybe(self._dispatch())

    def decode_line(self, line: str | bytes) -> ServerSentEvent | None:
        """Process one line (a trailing line ending is allowed); returns an event when the line is blank."""
        if isinstance(line, bytes):
            line = line.decode("utf-8")
        line = line[:-2] if line.endswith("\r\n") else line.removesuffix("\n").removesuffix("\r")
        if self._first_line:
            self._first_line = False
            line = line.removeprefix("\ufeff")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self._last_id = value
        elif field == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        return None

    def _decode_lines(self, *, final: bool) -> list[ServerSentEvent]:
        events: list[ServerSentEvent] = []
        start = 0
        for end in _LINE_END.finditer(self._buffer):
            if end.group() == "\r" and end.end() == len(self._buffer) and not final:
                break  # may be the first half of a "\r\n" split across chunks
            events += self._maybe(self.decode_line(self._buffer[start : end.start()]))
            start = end.end()
        self._buffer = self._buffer[start:]
        return events

    def _dispatch(self) -> ServerSentEvent | None:
        event = None
        if self._data:
            data = "\n".join(self._data)
            event = ServerSentEvent(data, self._event or "message", self._last_id, self._retry)
        self._data, self._event, self._retry = [], "", None
        return event

    @staticmethod
    def _maybe(event: ServerSentEvent | None) -> list[ServerSentEvent]:
        return [event] if event is not None else []


def iter_sse(chunks: Iterable[bytes | str]) -> Iterator[ServerSentEvent]:
    """Events from a synchronous stream of raw chunks (e.g. ``httpx.Response.iter_bytes()``)."""
    decoder = SSEDecoder()
    for chunk in chunks:
        yield from decoder.feed(chunk)
    yield from decoder.close()


async def aiter_sse(chunks: AsyncIterable[bytes | str]) -> AsyncIterator[ServerSentEvent]:
    """Events from an asynchronous stream of raw chunks (e.g. ``httpx.Response.aiter_bytes()``)."""
    decoder = SSEDecoder()
    async for chunk in chunks:
        for event in decoder.feed(chunk):
            yield event
    for event in decoder.close():
        yield event
