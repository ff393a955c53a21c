"""Answers that outlive the request handler: server-sent events, and the watch for a client that
left before its answer was ready."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel

from steering_server.errors import error_body
from steering_server.protocol import ErrorResponse

logger = logging.getLogger("steer.server")
T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client left; nobody reads it
DISCONNECT_POLL_SECONDS = 0.25


async def sse(chunks: AsyncIterator[BaseModel], *, on_end: Callable[[Exception | None], None],
              on_abandoned: Callable[[], None]) -> AsyncIterator[str]:
    """Server-sent events: one `data:` line per chunk, an error event if generation fails, `[DONE]`.

    The HTTP status (200) goes out with the first event, so a stream's own outcome is reported
    when it ends: `on_end(None)`, `on_end(error)` with the error its event carries, or
    `on_abandoned()` when the client leaves.
    """
    try:
        async for chunk in chunks:
            yield f"data: {chunk.model_dump_json()}\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        on_abandoned()
        raise
    except Exception as error:
        status, body = error_body(error)
        if status == 500:
            logger.exception("stream failed")
        on_end(error)
        yield f"data: {ErrorResponse(error=body).model_dump_json()}\n\n"
    else:
        on_end(None)
    yield "data: [DONE]\n\n"


async def until_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Run `work`; if the client leaves first, cancel it (aborting its engine requests): None."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return None
