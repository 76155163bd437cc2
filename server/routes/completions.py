"""OpenAI-compatible `/v1/completions` and `/v1/chat/completions`, with the `session_id` / `commit` extensions.

Without a session the prompt is ingested block by block into a temporary state, so a prompt of any length is
accepted (in `full` mode up to the model's context). With a session the answer continues the session's state:
on a copy, or, with `"commit": true`, appended to the session (see `server.engine.chat` for how chat messages
join an ingested document).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from server import openapi
from server.deps import EngineDep, OwnerDep, sse_response, wait_for
from server.engine import Echoed, Failed, Finished, Job, TextDelta
from server.errors import error_body, from_exception
from server.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    Completion,
    CompletionChunk,
    CompletionRequest,
    Reply,
    stream_item,
)

router = APIRouter(prefix="/v1", tags=["openai"], responses=openapi.ERRORS)
STREAM_NOTE = "with `stream`: one chunk per event, then `[DONE]`; an error after the start is sent as an event"


@router.post("/completions", response_model=Completion,
             responses={200: {"content": openapi.sse(CompletionChunk, description=STREAM_NOTE)}})
async def completions(req: CompletionRequest, request: Request, engine: EngineDep, owner: OwnerDep) -> Any:
    prompt = req.prompt_text_or_ids()
    ids = await engine.tokenize(prompt) if isinstance(prompt, str) else prompt
    job = engine.generate(owner, req.sampling_params(), session_id=req.session_id, commit=req.commit, prompt_ids=ids,
                          logprobs=req.logprobs, echo=bool(req.echo))
    reply = Reply(engine.model_name, chat=False, include_usage=req.include_usage, logprobs=req.logprobs)
    return await _respond(reply, job, request, req.stream)


@router.post("/chat/completions", response_model=ChatCompletion,
             responses={200: {"content": openapi.sse(ChatCompletionChunk, description=STREAM_NOTE)}})
async def chat_completions(req: ChatRequest, request: Request, engine: EngineDep, owner: OwnerDep) -> Any:
    job = engine.generate(owner, req.sampling_params(), session_id=req.session_id, commit=req.commit,
                          messages=req.template_messages(), logprobs=req.logprobs_count())
    reply = Reply(engine.model_name, chat=True, include_usage=req.include_usage, logprobs=req.logprobs_count())
    return await _respond(reply, job, request, req.stream)


async def _respond(reply: Reply, job: Job, request: Request, stream: bool | None) -> Any:
    if stream:
        return sse_response(_chunks(reply, job), job)
    return reply.complete(await wait_for(request, job))


async def _chunks(reply: Reply, job: Job) -> AsyncIterator[dict[str, Any]]:
    """Chunks as OpenAI streams them: with include_usage every chunk has `usage: null` and a last chunk with
    empty choices carries the usage. Under echo the prompt comes first, in a chunk of its own."""
    if reply.chat:
        yield stream_item(reply.chunk(None, first=True))
    async for event in job.events():
        if isinstance(event, TextDelta):
            yield stream_item(reply.chunk(event.text, tokens=event.logprobs))
        elif isinstance(event, Echoed):
            yield stream_item(reply.chunk(event.text, tokens=event.logprobs or ()))
        elif isinstance(event, Finished):
            yield stream_item(reply.chunk(None, event.result.finish_reason))
            if reply.include_usage:
                yield stream_item(reply.usage_chunk(event.result))
        elif isinstance(event, Failed):
            code, message, param, _ = from_exception(event.error)
            yield error_body(code, message, param)
