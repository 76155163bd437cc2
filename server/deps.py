"""Route helpers: the engine and owner dependencies, waiting on a job while watching the client, and SSE."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Request
from sse_starlette.sse import EventSourceResponse

from server.engine import Cancelled, Engine, Job
from server.errors import APIError

DISCONNECT_POLL_SECONDS = 0.25
LOADING_RETRY_AFTER = "5"


def get_engine(request: Request) -> Engine:
    engine = request.app.state.engine
    if engine is None:
        failed = request.app.state.load_error
        message = f"the model failed to load: {failed}" if failed else "the model is still loading; retry shortly"
        raise APIError("model_loading", message, headers={"Retry-After": LOADING_RETRY_AFTER})
    return engine


def get_owner(request: Request) -> str:
    return getattr(request.state, "owner", "")


EngineDep = Annotated[Engine, Depends(get_engine)]
OwnerDep = Annotated[str, Depends(get_owner)]


async def wait_for(request: Request, job: Job) -> Any:
    """The job's result; if the client disconnects first, cancel the job (it stops at the next unit)."""
    result = asyncio.ensure_future(job.result())
    try:
        while True:
            done, _ = await asyncio.wait({result}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return result.result()
            if await request.is_disconnected():
                job.cancel()
                raise Cancelled("the client disconnected")
    finally:
        if not result.done():
            result.cancel()


def sse_response(events: AsyncIterator[dict[str, Any]], job: Job) -> EventSourceResponse:
    """`data: {json}` per event, then `data: [DONE]`. If the client goes away the job is cancelled."""

    async def frames() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield json.dumps(event, ensure_ascii=False)
            yield "[DONE]"
        finally:
            job.cancel()  # no effect on a finished job

    return EventSourceResponse(frames(), sep="\n")
