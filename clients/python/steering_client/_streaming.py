"""Streamed answers: server-sent events read as typed chunks, keeping the final `steering` block."""

from __future__ import annotations

import json
from typing import AsyncGenerator, AsyncIterator, Generator, Generic, Iterator, Optional, TypeVar

import httpx
from pydantic import ValidationError

from ._exceptions import APIResponseValidationError, stream_error, transport_error
from ._types import Chunk, Steering, Usage

ChunkT = TypeVar("ChunkT", bound=Chunk)
DONE = "[DONE]"


class EventDecoder:
    """Server-sent events, one line at a time: an event's `data` once the blank line ending it arrives."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> Optional[str]:
        if not line:
            data, self._data = self._data, []
            return "\n".join(data) if data else None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None  # comments (":…") and the fields event/id/retry carry nothing we use


class BaseStream(Generic[ChunkT]):
    """What the sync and async streams share (no I/O): decoding lines into chunks, and the `steering`/`usage` seen."""

    def __init__(self, response: httpx.Response, chunk_type: type[ChunkT]):
        self.response = response
        self._chunk_type = chunk_type
        self._events = EventDecoder()
        self._is_done = False
        self.steering: Optional[Steering] = None
        self.usage: Optional[Usage] = None

    def _chunk(self, line: str) -> Optional[ChunkT]:
        """The chunk a line completes, if any; raises the server's error event as an `APIError`."""
        data = self._events.feed(line)
        if data is None or self._is_done:
            return None
        if data == DONE:
            self._is_done = True
            return None
        try:
            payload = json.loads(data)
            if isinstance(payload, dict) and "error" in payload:
                raise stream_error(payload, self.response.request)
            chunk = self._chunk_type.model_validate(payload)
        except (json.JSONDecodeError, ValidationError) as error:
            raise APIResponseValidationError(response=self.response, body=data, message=str(error)) from error
        if chunk.steering is not None:
            self.steering = chunk.steering
        if chunk.usage is not None:
            self.usage = chunk.usage
        return chunk


class Stream(BaseStream[ChunkT]):
    """Iterate for typed chunks; after the end, `.steering` (and `.usage`). Closing early closes the connection."""

    def __init__(self, response: httpx.Response, chunk_type: type[ChunkT]):
        super().__init__(response, chunk_type)
        self._iterator: Generator[ChunkT, None, None] = self._read()

    def __iter__(self) -> Iterator[ChunkT]:
        return self

    def __next__(self) -> ChunkT:
        return next(self._iterator)

    def _read(self) -> Generator[ChunkT, None, None]:
        try:
            for line in self.response.iter_lines():
                chunk = self._chunk(line)
                if chunk is not None:
                    yield chunk
        except httpx.TransportError as error:
            raise transport_error(error, self.response.request) from error
        finally:
            self.response.close()

    def close(self) -> None:
        self._iterator.close()
        self.response.close()

    def __enter__(self) -> Stream[ChunkT]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncStream(BaseStream[ChunkT]):
    """`async for` typed chunks; after the end, `.steering` (and `.usage`). `aclose()` early closes the connection."""

    def __init__(self, response: httpx.Response, chunk_type: type[ChunkT]):
        super().__init__(response, chunk_type)
        self._iterator: AsyncGenerator[ChunkT, None] = self._read()

    def __aiter__(self) -> AsyncIterator[ChunkT]:
        return self

    async def __anext__(self) -> ChunkT:
        return await self._iterator.__anext__()

    async def _read(self) -> AsyncGenerator[ChunkT, None]:
        try:
            async for line in self.response.aiter_lines():
                chunk = self._chunk(line)
                if chunk is not None:
                    yield chunk
        except httpx.TransportError as error:
            raise transport_error(error, self.response.request) from error
        finally:
            await self.response.aclose()

    async def aclose(self) -> None:
        await self._iterator.aclose()
        await self.response.aclose()

    async def __aenter__(self) -> AsyncStream[ChunkT]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
