"""OpenAI-compatible `/v1/completions` and `/v1/chat/completions`, with the `session_id` / `commit` extensions.

Without a session the prompt is ingested block by block into a temporary state, so a prompt of any length is
accepted (in `full` mode up to the model's context). With a session the answer continues the session's state:
on a copy, or, with `"commit": true`, appended to the session (see `server.engine.chat` for how chat messages
join an ingested document).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from server.deps import EngineDep, OwnerDep, sse_response, wait_for
from server.engine import Failed, Finished, GenerationResult, Job, TextDelta
from server.errors import error_body, from_exception
from server.protocol import ChatRequest, CompletionRequest

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post("/completions")
async def completions(req: CompletionRequest, request: Request, engine: EngineDep, owner: OwnerDep) -> Any:
    prompt = req.prompt_text_or_ids()
    ids = await engine.tokenize(prompt) if isinstance(prompt, str) else prompt
    job = engine.generate(owner, req.sampling_params(), session_id=req.session_id, commit=req.commit, prompt_ids=ids)
    return await _respond(Reply("cmpl", "text_completion", engine.model_name, chat=False), job, request, req.stream,
                          req.include_usage)


@router.post("/chat/completions")
async def chat_completions(req: ChatRequest, request: Request, engine: EngineDep, owner: OwnerDep) -> Any:
    job = engine.generate(owner, req.sampling_params(), session_id=req.session_id, commit=req.commit,
                          messages=req.template_messages())
    return await _respond(Reply("chatcmpl", "chat.completion", engine.model_name, chat=True), job, request, req.stream,
                          req.include_usage)


class Reply:
    """Builds the response objects of one request (all chunks share id and created)."""

    def __init__(self, id_prefix: str, object_name: str, model: str, chat: bool):
        self.id, self.object, self.model, self.chat = f"{id_prefix}-{uuid.uuid4().hex}", object_name, model, chat
        self.created = int(time.time())

    def _envelope(self, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices}

    @staticmethod
    def usage(r: GenerationResult) -> dict[str, Any]:
        return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                "total_tokens": r.prompt_tokens + r.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": r.cached_tokens}}

    def complete(self, r: GenerationResult) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": r.finish_reason, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": r.text}
        else:
            choice["text"] = r.text
        return {**self._envelope(self.object, [choice]), "usage": self.usage(r)}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
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


async def _respond(reply: Reply, job: Job, request: Request, stream: bool | None, include_usage: bool) -> Any:
    if stream:
        return sse_response(_chunks(reply, job, include_usage), job)
    return reply.complete(await wait_for(request, job))


async def _chunks(reply: Reply, job: Job, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
    """Chunks as OpenAI streams them: with include_usage every chunk has `usage: null` and a last chunk with
    empty choices carries the usage."""
    extra = {"usage": None} if include_usage else {}
    if reply.chat:
        yield {**reply.chunk(None, first=True), **extra}
    async for event in job.events():
        if isinstance(event, TextDelta):
            yield {**reply.chunk(event.text), **extra}
        elif isinstance(event, Finished):
            yield {**reply.chunk(None, event.result.finish_reason), **extra}
            if include_usage:
                yield reply.usage_chunk(event.result)
        elif isinstance(event, Failed):
            code, message, param, _ = from_exception(event.error)
            yield error_body(code, message, param)
