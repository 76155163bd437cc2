"""The SSE parser: framing, fields, line endings, chunking, end of stream, sync and async sources."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from clients.sse import ServerSentEvent, SSEDecoder, aiter_sse, iter_sse


def events(text: str | bytes) -> list[ServerSentEvent]:
    return list(iter_sse([text]))


def test_one_event_per_blank_line() -> None:
    got = events("data: one\n\ndata: two\n\n")
    assert got == [ServerSentEvent("one"), ServerSentEvent("two")]


def test_multi_line_data_is_joined_with_newlines() -> None:
    got = events('data: {"a":\ndata:  1}\ndata:\n\n')
    assert [e.data for e in got] == ['{"a":\n 1}\n']


def test_only_one_space_after_the_colon_is_removed() -> None:
    assert events("data:x\n\ndata:  x\n\n") == [ServerSentEvent("x"), ServerSentEvent(" x")]


def test_comments_and_pings_are_ignored() -> None:
    got = events(": ping - 2026-01-01 00:00:00\n\n:\ndata: real\n: inside an event\n\n")
    assert got == [ServerSentEvent("real")]


def test_blank_lines_without_data_dispatch_nothing_and_reset_the_event_type() -> None:
    got = events("\n\nevent: progress\n\ndata: x\n\n")
    assert got == [ServerSentEvent("x", event="message")]


def test_event_id_and_retry_fields() -> None:
    got = events("event: progress\nid: 7\nretry: 1500\ndata: a\n\ndata: b\n\nid\ndata: c\n\n")
    assert got == [
        ServerSentEvent("a", event="progress", id="7", retry=1500),
        ServerSentEvent("b", event="message", id="7", retry=None),  # the last id persists, retry does not
        ServerSentEvent("c", id=""),  # a bare "id" resets it
    ]


def test_invalid_retry_and_id_with_nul_are_ignored() -> None:
    got = events("id: 1\n\nretry: soon\nid: x\0y\ndata: a\n\n")
    assert got == [ServerSentEvent("a", id="1", retry=None)]


def test_unknown_fields_and_field_without_colon() -> None:
    got = events("foo: bar\ndata\n\n")
    assert got == [ServerSentEvent("")]


def test_crlf_and_cr_line_endings() -> None:
    assert events("data: a\r\ndata: b\r\n\r\n") == [ServerSentEvent("a\nb")]
    assert events("data: a\rdata: b\r\r") == [ServerSentEvent("a\nb")]


def test_any_chunking_gives_the_same_events() -> None:
    raw = 'data: {"text": "héllo ✓"}\r\n\r\n: ping\r\ndata: [DONE]\r\n\r\n'.encode()
    expected = events(raw)
    assert [e.data for e in expected] == ['{"text": "héllo ✓"}', "[DONE]"]
    # byte by byte splits UTF-8 characters and every "\r\n" pair across chunks
    assert list(iter_sse(raw[i : i + 1] for i in range(len(raw)))) == expected
    assert list(iter_sse([raw[:5], raw[5:18], raw[18:19], raw[19:]])) == expected


def test_a_cr_ending_a_chunk_waits_for_the_next_chunk_to_show_whether_lf_follows() -> None:
    decoder = SSEDecoder()
    assert decoder.feed("data: a\r") == []
    assert decoder.feed("\r") == []  # "data: a" is a line now; the blank line may still be "\r\n"
    assert decoder.feed("\ndata: b\r\r") == [ServerSentEvent("a")]
    assert decoder.close() == [ServerSentEvent("b")]


def test_unicode_line_separators_inside_data_do_not_split_lines() -> None:
    payload = json.dumps({"content": "a\u2028b\u0085c\x0cd"}, ensure_ascii=False)
    (event,) = events(f"data: {payload}\n\n".encode())
    assert json.loads(event.data)["content"] == "a\u2028b\u0085c\x0cd"


def test_missing_trailing_blank_line_still_dispatches_at_end_of_stream() -> None:
    assert events("data: a\n\ndata: [DONE]\n") == [ServerSentEvent("a"), ServerSentEvent("[DONE]")]
    assert events("data: [DONE]") == [ServerSentEvent("[DONE]")]


def test_done_and_error_events_are_plain_data() -> None:
    body = 'data: {"error": {"message": "boom", "code": "server_error"}}\n\ndata: [DONE]\n\n'
    first, done = events(body)
    assert json.loads(first.data)["error"]["code"] == "server_error"
    assert done.data == "[DONE]"


def test_named_error_event_keeps_its_type() -> None:
    (event,) = events('event: error\ndata: {"error": {"code": "x"}}\n\n')
    assert event.event == "error"


def test_byte_order_mark_is_dropped_from_the_first_line_only() -> None:
    assert events("\ufeffdata: a\n\n") == [ServerSentEvent("a")]
    # later, "\ufeffdata" is just an unknown field name
    assert events("data: a\n\n\ufeffdata: b\n\n") == [ServerSentEvent("a")]


def test_decode_line_accepts_pre_split_lines_with_or_without_endings() -> None:
    decoder = SSEDecoder()
    lines = [b"data: a\r\n", "data: b", "", ": ping\n", "data: c\n", b"\n"]
    results = [decoder.decode_line(line) for line in lines]
    assert results == [None, None, ServerSentEvent("a\nb"), None, None, ServerSentEvent("c")]


def test_async_source() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for chunk in (b"data: he", b"llo\n", b"\nda", b"ta: [DONE]\n\n"):
            yield chunk

    async def collect() -> list[ServerSentEvent]:
        return [event async for event in aiter_sse(chunks())]

    assert asyncio.run(collect()) == [ServerSentEvent("hello"), ServerSentEvent("[DONE]")]
