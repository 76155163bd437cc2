"""OpenAI-compatible `/v1/completions` and `/v1/chat/completions`, with the `session_id` / `commit` extensions.

Without a session the prompt is ingested block by block into a temporary state, so a prompt of any length is
accepted (in `full` mode up to the model's context). With a session the answer continues the session's state:
on a copy, or, with `"commit": true`, appended to the session (see `server.engine.chat` for how chat messages
join an ingested document).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Request

from server.deps import EngineDep, OwnerDep, sse_response, wait_for
from server.engine import Echoed, Failed, Finished, GenerationResult, Job, TextDelta, TokenLogprob
from server.errors import error_body, from_exception
from server.protocol import ChatRequest, CompletionRequest

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post("/completions")
async def completions(req: CompletionRequest, request: Request, engine: EngineDep, owner: OwnerDep) -> Any:
    prompt = req.prompt_text_or_ids()
    ids = await engine.tokenize(prompt) if isinstance(prompt, str) else prompt
    job = engine.generate(owner, req.sampling_params(), session_id=req.session_id, commit=req.commit, prompt_ids=ids,
                          logprobs=req.logprobs, echo=bool(req.echo))
    reply = Reply("cmpl", "text_completion", engine.model_name, chat=False, logprobs=req.logprobs)
    return await _respond(reply, job, request, req.stream, req.include_usage)


@router.post("/chat/completions")
async def chat_completions(req: ChatRequest, request: Request, engine: EngineDep, owner: OwnerDep) -> Any:
    job = engine.generate(owner, req.sampling_params(), session_id=req.session_id, commit=req.commit,
                          messages=req.template_messages(), logprobs=req.logprobs_count())
    reply = Reply("chatcmpl", "chat.completion", engine.model_name, chat=True, logprobs=req.logprobs_count())
    return await _respond(reply, job, request, req.stream, req.include_usage)


class Reply:
    """Builds the response objects of one request (all chunks share id and created). With logprobs, a completion
    carries OpenAI's legacy `{tokens, token_logprobs, top_logprobs, text_offset}` (offsets into the returned
    text, which starts with the prompt under echo), a chat `{content: [{token, logprob, bytes, top_logprobs}]}`."""

    def __init__(self, id_prefix: str, object_name: str, model: str, chat: bool, logprobs: int | None = None):
        self.id, self.object, self.model, self.chat = f"{id_prefix}-{uuid.uuid4().hex}", object_name, model, chat
        self.created = int(time.time())
        self.logprobs = logprobs
        self._offset = 0  # characters of the returned text so far (completion logprobs' text_offset)

    def _envelope(self, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices}

    @staticmethod
    def usage(r: GenerationResult) -> dict[str, Any]:
        return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                "total_tokens": r.prompt_tokens + r.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": r.cached_tokens}}

    def logprobs_of(self, tokens: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        if self.chat:
            return {"content": [{**_chat_entry(t.text, t.logprob),
                                 "top_logprobs": [_chat_entry(a, lp) for a, lp in t.top]} for t in tokens],
                    "refusal": None}
        offsets = []
        for t in tokens:
            offsets.append(self._offset)
            self._offset += len(t.text)
        # the sampled token's own logprob is always among the alternatives (OpenAI: up to logprobs + 1 of them)
        top = [None if t.logprob is None else {**dict(t.top), t.text: t.logprob} for t in tokens]
        return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": top, "text_offset": offsets}

    def complete(self, r: GenerationResult) -> dict[str, Any]:
        tokens = [*(r.prompt_logprobs or ()), *(r.logprobs or ())]
        choice: dict[str, Any] = {"index": 0, "finish_reason": r.finish_reason, "logprobs": self.logprobs_of(tokens)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": r.text}
        else:
            choice["text"] = (r.prompt_text or "") + r.text
        return {**self._envelope(self.object, [choice]), "usage": self.usage(r)}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False,
              tokens: Sequence[TokenLogprob] = ()) -> dict[str, Any]:
        logprobs = self.logprobs_of(tokens) if tokens else None
        choice: dict[str, Any] = {"index": 0, "logprobs": logprobs, "finish_reason": finish_reason}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice["delta"] = delta
            return self._envelope("chat.completion.chunk", [choice])
        choice["text"] = text or ""
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, r: GenerationResult) -> dict[str, Any]:
        name = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(name, []), "usage": self.usage(r)}


def _chat_entry(text: str, logprob: float | None) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


async def _respond(reply: Reply, job: Job, request: Request, stream: bool | None, include_usage: bool) -> Any:
    if stream:
        return sse_response(_chunks(reply, job, include_usage), job)
    return reply.complete(await wait_for(request, job))


async def _chunks(reply: Reply, job: Job, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
    """Chunks as OpenAI streams them: with include_usage every chunk has `usage: null` and a last chunk with
    empty choices carries the usage. Under echo the prompt comes first, in a chunk of its own."""
    extra = {"usage": None} if include_usage else {}
    if reply.chat:
        yield {**reply.chunk(None, first=True), **extra}
    async for event in job.events():
        if isinstance(event, TextDelta):
            yield {**reply.chunk(event.text, tokens=event.logprobs), **extra}
        elif isinstance(event, Echoed):
            yield {**reply.chunk(event.text, tokens=event.logprobs or ()), **extra}
        elif isinstance(event, Finished):
            yield {**reply.chunk(None, event.result.finish_reason), **extra}
            if include_usage:
                yield reply.usage_chunk(event.result)
        elif isinstance(event, Failed):
            code, message, param, _ = from_exception(event.error)
            yield error_body(code, message, param)
