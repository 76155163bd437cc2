"""Python clients for the fam-server HTTP API: :class:`Client` (blocking) and :class:`AsyncClient`.

    with Client("http://127.0.0.1:8000") as fam:
        session = fam.create_session(mode="fam")
        fam.ingest_file(session.id, "report.pdf", progress=lambda p: print(p.tokens_done, p.tokens_total))
        question = [{"role": "user", "content": "Summarise it."}]
        print(fam.chat(question, session_id=session.id).text)
        for piece in fam.chat(question, session_id=session.id, stream=True):
            print(piece, end="", flush=True)

Both clients retry only what is safe to repeat (see :mod:`clients.retry`): reads and deletes, connection
failures that happened before the request was sent, and 429/503 refusals, waiting as the server's
Retry-After asks. Ingest is retried because every ingest call sends one Idempotency-Key, generated for that
call, on all its attempts; the server ingests a repeated key only once. Completions with ``commit=True`` are
never retried, and no stream is retried once the server has started answering.

Errors raise :class:`~clients.errors.FamError` subclasses, including errors sent inside a stream.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NoReturn, Self, Unpack, overload

import anyio
import httpx

from clients._common import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    Call,
    ClientBase,
    ProgressCallback,
    create_session_call,
    event_payload,
    generation_call,
    ingest_content_type,
    ingest_event,
    ingest_file_call,
    ingest_text_call,
    session_path,
)
from clients.errors import ProtocolError, error_from_response
from clients.retry import Retry, delay_before_retry
from clients.sse import aiter_sse, iter_sse
from clients.streams import AsyncTextStream, TextStream
from clients.types import Completion, Model, Sampling, Session, parse

Messages = Sequence[Mapping[str, Any]]
Timeout = float | httpx.Timeout | None


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"invalid JSON from {response.request.url}: {response.text[:200]!r}") from exc


def _sessions(body: Any) -> list[Session]:
    return parse(lambda data: [Session.from_dict(item) for item in data["data"]], body, "session list")


def _models(body: Any) -> list[Model]:
    return parse(lambda data: [Model.from_dict(item) for item in data["data"]], body, "model list")


def _is_json(response: httpx.Response) -> bool:
    """True for a plain JSON answer where a stream was asked for: how a server may answer a repeated
    Idempotency-Key (the stored session object) instead of replaying the stream."""
    return response.headers.get("content-type", "").startswith("application/json")


def _ingest_result(session: Session | None) -> Session:
    if session is None:
        raise ProtocolError("ingest stream ended without the final session object")
    return session


class Client(ClientBase):
    """Blocking client. ``transport`` is passed to httpx (e.g. ``httpx.MockTransport`` in tests)."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, max_retries)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self._headers(), timeout=timeout, transport=transport
        )

    # -- sessions

    def create_session(
        self, *, mode: str | None = None, metadata: Mapping[str, Any] | None = None
    ) -> Session:
        """Create an empty session; ``mode`` is "fam", "bswa", "sink" or "full" (server default if None)."""
        return parse(Session.from_dict, self._request(create_session_call(mode, metadata)), "session")

    def list_sessions(self) -> list[Session]:
        return _sessions(self._request(Call("GET", "/v1/sessions", Retry.IDEMPOTENT)))

    def get_session(self, session_id: str) -> Session:
        return parse(
            Session.from_dict,
            self._request(Call("GET", session_path(session_id), Retry.IDEMPOTENT)),
            "session",
        )

    def delete_session(self, session_id: str) -> bool:
        """Delete a session; returns the server's ``deleted`` flag."""
        body = self._request(Call("DELETE", session_path(session_id), Retry.IDEMPOTENT))
        return parse(lambda data: bool(data["deleted"]), body, "deletion")

    def fork_session(self, session_id: str) -> Session:
        """A new session starting from a copy of this one's state."""
        body = self._request(Call("POST", session_path(session_id, "fork"), Retry.IF_UNSENT))
        return parse(Session.from_dict, body, "session")

    def export_state(self, session_id: str) -> bytes:
        """The session's state as an opaque snapshot, for :meth:`import_state` here or on another server."""
        return self._send(Call("GET", session_path(session_id, "state"), Retry.IDEMPOTENT)).content

    def import_state(self, snapshot: bytes) -> Session:
        """A new session restored from :meth:`export_state` bytes."""
        call = Call(
            "POST",
            "/v1/sessions/import",
            Retry.IF_UNSENT,
            content=snapshot,
            headers={"Content-Type": "application/octet-stream"},
        )
        return parse(Session.from_dict, self._request(call), "session")

    # -- ingest

    def ingest_text(self, session_id: str, text: str, *, progress: ProgressCallback | None = None) -> Session:
        """Append ``text`` to the session; ``progress`` is called with each :class:`IngestProgress` event.
        Returns the updated session. Safe to retry: see :func:`clients._common.ingest_text_call`."""
        return self._ingest(ingest_text_call(session_id, text), progress)

    def ingest_file(
        self, session_id: str, path: str | os.PathLike[str], *, progress: ProgressCallback | None = None
    ) -> Session:
        """Upload a .pdf, .txt or .md file into the session (ValueError for other suffixes); as
        :meth:`ingest_text` otherwise. PDF progress events also count pages."""
        path = Path(path)
        content_type = ingest_content_type(path)
        return self._ingest(
            ingest_file_call(session_id, path.name, path.read_bytes(), content_type), progress
        )

    # -- generation

    @overload
    def complete(
        self,
        prompt: str,
        *,
        session_id: str | None = None,
        commit: bool = False,
        stream: Literal[False] = False,
        **sampling: Unpack[Sampling],
    ) -> Completion: ...

    @overload
    def complete(
        self,
        prompt: str,
        *,
        session_id: str | None = None,
        commit: bool = False,
        stream: Literal[True],
        **sampling: Unpack[Sampling],
    ) -> TextStream: ...

    def complete(
        self,
        prompt: str,
        *,
        session_id: str | None = None,
        commit: bool = False,
        stream: bool = False,
        **sampling: Unpack[Sampling],
    ) -> Completion | TextStream:
        """A text completion of ``prompt``, continuing the session's document when ``session_id`` is given;
        ``commit=True`` appends prompt and answer to the session (never retried). ``sampling`` takes model,
        max_tokens, temperature, top_p, stop and seed; the model defaults to the server's first model."""
        body = {"prompt": prompt}
        return self._generate("/v1/completions", body, session_id, commit, stream, sampling)

    @overload
    def chat(
        self,
        messages: Messages,
        *,
        session_id: str | None = None,
        commit: bool = False,
        stream: Literal[False] = False,
        **sampling: Unpack[Sampling],
    ) -> Completion: ...

    @overload
    def chat(
        self,
        messages: Messages,
        *,
        session_id: str | None = None,
        commit: bool = False,
        stream: Literal[True],
        **sampling: Unpack[Sampling],
    ) -> TextStream: ...

    def chat(
        self,
        messages: Messages,
        *,
        session_id: str | None = None,
        commit: bool = False,
        stream: bool = False,
        **sampling: Unpack[Sampling],
    ) -> Completion | TextStream:
        """A chat completion of ``messages`` (``[{"role": "user", "content": ...}]``); as :meth:`complete`."""
        body = {"messages": [dict(message) for message in messages]}
        return self._generate("/v1/chat/completions", body, session_id, commit, stream, sampling)

    # -- utilities

    def models(self) -> list[Model]:
        return _models(self._request(Call("GET", "/v1/models", Retry.IDEMPOTENT)))

    def tokenize(self, text: str) -> list[int]:
        body = self._request(Call("POST", "/tokenize", Retry.IDEMPOTENT, json={"text": text}))
        return parse(lambda data: list(data["tokens"]), body, "tokenization")

    def detokenize(self, tokens: Sequence[int]) -> str:
        body = self._request(Call("POST", "/detokenize", Retry.IDEMPOTENT, json={"tokens": list(tokens)}))
        return parse(lambda data: str(data["text"]), body, "detokenization")

    def health(self) -> dict[str, Any]:
        """The health body (``{"status": "ok", ...}``). A probe: not retried, so a server still loading the
        model raises :class:`~clients.errors.ServiceUnavailableError` at once."""
        return parse(dict, self._request(Call("GET", "/health", Retry.NEVER)), "health")

    def metrics(self) -> str:
        """The Prometheus metrics text."""
        return self._send(Call("GET", "/metrics", Retry.IDEMPOTENT)).text

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- plumbing

    def _send(self, call: Call, *, stream: bool = False) -> httpx.Response:
        """Send ``call``, retrying as its policy allows; returns a successful response or raises."""
        attempt = 0
        while True:
            try:
                response = self._http.send(call.build(self._http), stream=stream)
            except httpx.TransportError as exc:
                delay = delay_before_retry(call.retry, attempt, self.max_retries, exc)
                if delay is None:
                    raise self._transport_error(exc) from exc
            else:
                if response.is_success:
                    return response
                delay = delay_before_retry(call.retry, attempt, self.max_retries, response)
                if delay is None:
                    self._raise_for(response)
                response.close()
            time.sleep(delay)
            attempt += 1

    def _raise_for(self, response: httpx.Response) -> NoReturn:
        try:
            response.read()
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from exc
        finally:
            response.close()
        raise error_from_response(response)

    def _request(self, call: Call) -> Any:
        return _json(self._send(call))

    def _payloads(self, response: httpx.Response) -> Iterator[dict[str, Any]]:
        """The JSON payloads of an SSE response up to ``[DONE]``; error events raise."""
        try:
            for event in iter_sse(response.iter_bytes()):
                payload = event_payload(event)
                if payload is None:
                    return
                yield payload
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from exc
        raise ProtocolError("stream ended before data: [DONE]")

    def _ingest(self, call: Call, progress: ProgressCallback | None) -> Session:
        session = None
        response = self._send(call, stream=True)
        try:
            if _is_json(response):
                response.read()
                return parse(Session.from_dict, _json(response), "session")
            for payload in self._payloads(response):
                session = ingest_event(payload, progress) or session
        finally:
            response.close()
        return _ingest_result(session)

    def _generate(
        self,
        path: str,
        body: Mapping[str, Any],
        session_id: str | None,
        commit: bool,
        stream: bool,
        sampling: Sampling,
    ) -> Completion | TextStream:
        model = sampling.get("model") or self._default_model()
        call = generation_call(
            path, body, model=model, session_id=session_id, commit=commit, stream=stream, sampling=sampling
        )
        if not stream:
            return parse(Completion.from_dict, self._request(call), "completion")
        response = self._send(call, stream=True)
        return TextStream(response, self._payloads(response))

    def _default_model(self) -> str:
        if self._model is None:
            models = self.models()
            if not models:
                raise ProtocolError("the server lists no models")
            self._model = models[0].id
        return self._model


class AsyncClient(ClientBase):
    """The asynchronous :class:`Client`: the same methods, as coroutines; streaming calls return an
    :class:`AsyncTextStream`. ``transport`` is passed to httpx (e.g. ``httpx.ASGITransport(app)``)."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, max_retries)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers(), timeout=timeout, transport=transport
        )

    # -- sessions

    async def create_session(
        self, *, mode: str | None = None, metadata: Mapping[str, Any] | None = None
    ) -> Session:
        return parse(Session.from_dict, await self._request(create_session_call(mode, metadata)), "session")

    async def list_sessions(self) -> list[Session]:
        return _sessions(await self._request(Call("GET", "/v1/sessions", Retry.IDEMPOTENT)))

    async def get_session(self, session_id: str) -> Session:
        body = await self._request(Call("GET", session_path(session_id), Retry.IDEMPOTENT))
        return parse(Session.from_dict, body, "session")

    async def delete_session(self, session_id: str) -> bool:
        body = await self._request(Call("DELETE", session_path(session_id), Retry.IDEMPOTENT))
        return parse(lambda data: bool(data["deleted"]), body, "deletion")

    async def fork_session(self, session_id: str) -> Session:
        body = await self._request(Call("POST", session_path(session_id, "fork"), Retry.IF_UNSENT))
        return parse(Session.from_dict, body, "session")

    async def export_state(self, session_id: str) -> bytes:
        response = await self._send(Call("GET", session_path(session_id, "state"), Retry.IDEMPOTENT))
        return response.content

    async def import_state(self, snapshot: bytes) -> Session:
        call = Call(
            "POST",
            "/v1/sessions/import",
            Retry.IF_UNSENT,
            content=snapshot,
            headers={"Content-Type": "application/octet-stream"},
        )
        return parse(Session.from_dict, await self._request(call), "session")

    # -- ingest

    async def ingest_text(
        self, session_id: str, text: str, *, progress: ProgressCallback | None = None
    ) -> Session:
        """As :meth:`Client.ingest_text`; ``progress`` is a plain (non-async) callable."""
        return await self._ingest(ingest_text_call(session_id, text), progress)

    async def ingest_file(
        self, session_id: str, path: str | os.PathLike[str], *, progress: ProgressCallback | None = None
    ) -> Session:
        path = Path(path)
        content_type = ingest_content_type(path)
        data = await anyio.Path(path).read_bytes()
        return await self._ingest(ingest_file_call(session_id, path.name, data, content_type), progress)

    # -- generation

    @overload
    async def complete(
        self,
        prompt: str,
        *,
        session_id: str | None = None,
        commit: bool = False,
        stream: Literal[False] = False,
        **sampling: Unpack[Sampling],
    ) -> Completion: ...

    @overload
    async def complete(
        self,
        prompt: str,
        *,
        session_id: str | None = None,
        commit: bool = False,
        stream: Literal[True],
        **sampling: Unpack[Sampling],
    ) -> AsyncTextStream: ...

    async def complete(
        self,
        prompt: str,
        *,
        session_id: str | None = None,
        commit: bool = False,
        stream: bool = False,
        **sampling: Unpack[Sampling],
    ) -> Completion | AsyncTextStream:
        body = {"prompt": prompt}
        return await self._generate("/v1/completions", body, session_id, commit, stream, sampling)

    @overload
    async def chat(
        self,
        messages: Messages,
        *,
        session_id: str | None = None,
        commit: bool = False,
        stream: Literal[False] = False,
        **sampling: Unpack[Sampling],
    ) -> Completion: ...

    @overload
    async def chat(
        self,
        messages: Messages,
        *,
        session_id: str | None = None,
        commit: bool = False,
        stream: Literal[True],
        **sampling: Unpack[Sampling],
    ) -> AsyncTextStream: ...

    async def chat(
        self,
        messages: Messages,
        *,
        session_id: str | None = None,
        commit: bool = False,
        stream: bool = False,
        **sampling: Unpack[Sampling],
    ) -> Completion | AsyncTextStream:
        body = {"messages": [dict(message) for message in messages]}
        return await self._generate("/v1/chat/completions", body, session_id, commit, stream, sampling)

    # -- utilities

    async def models(self) -> list[Model]:
        return _models(await self._request(Call("GET", "/v1/models", Retry.IDEMPOTENT)))

    async def tokenize(self, text: str) -> list[int]:
        body = await self._request(Call("POST", "/tokenize", Retry.IDEMPOTENT, json={"text": text}))
        return parse(lambda data: list(data["tokens"]), body, "tokenization")

    async def detokenize(self, tokens: Sequence[int]) -> str:
        body = await self._request(
            Call("POST", "/detokenize", Retry.IDEMPOTENT, json={"tokens": list(tokens)})
        )
        return parse(lambda data: str(data["text"]), body, "detokenization")

    async def health(self) -> dict[str, Any]:
        return parse(dict, await self._request(Call("GET", "/health", Retry.NEVER)), "health")

    async def metrics(self) -> str:
        return (await self._send(Call("GET", "/metrics", Retry.IDEMPOTENT))).text

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- plumbing

    async def _send(self, call: Call, *, stream: bool = False) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.send(call.build(self._http), stream=stream)
            except httpx.TransportError as exc:
                delay = delay_before_retry(call.retry, attempt, self.max_retries, exc)
                if delay is None:
                    raise self._transport_error(exc) from exc
            else:
                if response.is_success:
                    return response
                delay = delay_before_retry(call.retry, attempt, self.max_retries, response)
                if delay is None:
                    await self._raise_for(response)
                await response.aclose()
            await anyio.sleep(delay)
            attempt += 1

    async def _raise_for(self, response: httpx.Response) -> NoReturn:
        try:
            await response.aread()
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from exc
        finally:
            await response.aclose()
        raise error_from_response(response)

    async def _request(self, call: Call) -> Any:
        return _json(await self._send(call))

    async def _payloads(self, response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
        try:
            async for event in aiter_sse(response.aiter_bytes()):
                payload = event_payload(event)
                if payload is None:
                    return
                yield payload
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from exc
        raise ProtocolError("stream ended before data: [DONE]")

    async def _ingest(self, call: Call, progress: ProgressCallback | None) -> Session:
        session = None
        response = await self._send(call, stream=True)
        try:
            if _is_json(response):
                await response.aread()
                return parse(Session.from_dict, _json(response), "session")
            async for payload in self._payloads(response):
                session = ingest_event(payload, progress) or session
        finally:
            await response.aclose()
        return _ingest_result(session)

    async def _generate(
        self,
        path: str,
        body: Mapping[str, Any],
        session_id: str | None,
        commit: bool,
        stream: bool,
        sampling: Sampling,
    ) -> Completion | AsyncTextStream:
        model = sampling.get("model") or await self._default_model()
        call = generation_call(
            path, body, model=model, session_id=session_id, commit=commit, stream=stream, sampling=sampling
        )
        if not stream:
            return parse(Completion.from_dict, await self._request(call), "completion")
        response = await self._send(call, stream=True)
        return AsyncTextStream(response, self._payloads(response))

    async def _default_model(self) -> str:
        if self._model is None:
            models = await self.models()
            if not models:
                raise ProtocolError("the server lists no models")
            self._model = models[0].id
        return self._model
