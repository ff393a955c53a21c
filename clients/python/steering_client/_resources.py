"""What a client offers: `chat.completions`, `completions`, and `models` (also called `policies`).

Every option is keyword-only. A field left out (or given as None) is not sent, so the server's
default applies; the standard fields (`max_tokens`, `temperature`, …) pass through as given,
and `extra_body` adds to or overrides anything in the JSON body.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Iterable, Literal, Optional, TypeVar, Union, overload

from ._streaming import AsyncStream, ChunkT, Stream
from ._types import ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk, PolicyList

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._client import AsyncSteeringClient, SteeringClient, Timeout
    from ._params import ChatFields, ChatMessage, CompletionFields, Prompt, SteeringParams

ResponseT = TypeVar("ResponseT", ChatCompletion, Completion)


@dataclass(frozen=True)
class Endpoint(Generic[ResponseT, ChunkT]):
    """A generation endpoint: its path, its answer's type and its streamed chunks' type."""

    path: str
    response_type: type[ResponseT]
    chunk_type: type[ChunkT]


CHAT = Endpoint("/chat/completions", ChatCompletion, ChatCompletionChunk)
COMPLETIONS = Endpoint("/completions", Completion, CompletionChunk)


def generation_body(
    model: str, steering: Optional[SteeringParams], stream: bool, extra_body: Optional[dict[str, Any]],
    fields: dict[str, Any], **prompt: Any,
) -> dict[str, Any]:
    """The JSON body of a generation: what was given and nothing else, then `extra_body` on top."""
    body = {"model": model, **prompt, **{name: value for name, value in fields.items() if value is not None}}
    if steering is not None:
        body["steering"] = dict(steering)
    if stream:
        body["stream"] = True
    return {**body, **(extra_body or {})}


class ChatCompletions:
    def __init__(self, client: SteeringClient):
        self._client = client

    @overload
    def create(
        self, *, model: str, messages: Iterable[ChatMessage], steering: Optional[SteeringParams] = None,
        stream: Literal[False] = False, timeout: Optional[Timeout] = None, max_retries: Optional[int] = None,
        extra_body: Optional[dict[str, Any]] = None, **fields: Unpack[ChatFields],
    ) -> ChatCompletion: ...

    @overload
    def create(
        self, *, model: str, messages: Iterable[ChatMessage], steering: Optional[SteeringParams] = None,
        stream: Literal[True], timeout: Optional[Timeout] = None, max_retries: Optional[int] = None,
        extra_body: Optional[dict[str, Any]] = None, **fields: Unpack[ChatFields],
    ) -> Stream[ChatCompletionChunk]: ...

    def create(
        self, *, model: str, messages: Iterable[ChatMessage], steering: Optional[SteeringParams] = None,
        stream: bool = False, timeout: Optional[Timeout] = None, max_retries: Optional[int] = None,
        extra_body: Optional[dict[str, Any]] = None, **fields: Any,
    ) -> Union[ChatCompletion, Stream[ChatCompletionChunk]]:
        """Answer `messages` under the policy `model`; with `stream=True`, a `Stream` of chunks."""
        body = generation_body(model, steering, stream, extra_body, fields, messages=list(messages))
        return self._client._generate(CHAT, body, timeout=timeout, max_retries=max_retries)


class Chat:
    def __init__(self, client: SteeringClient):
        self.completions = ChatCompletions(client)


class Completions:
    def __init__(self, client: SteeringClient):
        self._client = client

    @overload
    def create(
        self, *, model: str, prompt: Prompt, steering: Optional[SteeringParams] = None,
        stream: Literal[False] = False, timeout: Optional[Timeout] = None, max_retries: Optional[int] = None,
        extra_body: Optional[dict[str, Any]] = None, **fields: Unpack[CompletionFields],
    ) -> Completion: ...

    @overload
    def create(
        self, *, model: str, prompt: Prompt, steering: Optional[SteeringParams] = None,
        stream: Literal[True], timeout: Optional[Timeout] = None, max_retries: Optional[int] = None,
        extra_body: Optional[dict[str, Any]] = None, **fields: Unpack[CompletionFields],
    ) -> Stream[CompletionChunk]: ...

    def create(
        self, *, model: str, prompt: Prompt, steering: Optional[SteeringParams] = None,
        stream: bool = False, timeout: Optional[Timeout] = None, max_retries: Optional[int] = None,
        extra_body: Optional[dict[str, Any]] = None, **fields: Any,
    ) -> Union[Completion, Stream[CompletionChunk]]:
        """Complete `prompt` (a text, token ids, or a list of either) under the policy `model`."""
        body = generation_body(model, steering, stream, extra_body, fields, prompt=prompt)
        return self._client._generate(COMPLETIONS, body, timeout=timeout, max_retries=max_retries)


class Models:
    def __init__(self, client: SteeringClient):
        self._client = client

    def list(self, *, timeout: Optional[Timeout] = None, max_retries: Optional[int] = None) -> PolicyList:
        """The policies served, each with its base, expert pairs, default alphas and `max_alpha`."""
        return self._client._get("/models", PolicyList, timeout=timeout, max_retries=max_retries)


class AsyncChatCompletions:
    def __init__(self, client: AsyncSteeringClient):
        self._client = client

    @overload
    async def create(
        self, *, model: str, messages: Iterable[ChatMessage], steering: Optional[SteeringParams] = None,
        stream: Literal[False] = False, timeout: Optional[Timeout] = None, max_retries: Optional[int] = None,
        extra_body: Optional[dict[str, Any]] = None, **fields: Unpack[ChatFields],
    ) -> ChatCompletion: ...

    @overload
    async def create(
        self, *, model: str, messages: Iterable[ChatMessage], steering: Optional[SteeringParams] = None,
        stream: Literal[True], timeout: Optional[Timeout] = None, max_retries: Optional[int] = None,
        extra_body: Optional[dict[str, Any]] = None, **fields: Unpack[ChatFields],
    ) -> AsyncStream[ChatCompletionChunk]: ...

    async def create(
        self, *, model: str, messages: Iterable[ChatMessage], steering: Optional[SteeringParams] = None,
        stream: bool = False, timeout: Optional[Timeout] = None, max_retries: Optional[int] = None,
        extra_body: Optional[dict[str, Any]] = None, **fields: Any,
    ) -> Union[ChatCompletion, AsyncStream[ChatCompletionChunk]]:
        """Answer `messages` under the policy `model`; with `stream=True`, an `AsyncStream` of chunks."""
        body = generation_body(model, steering, stream, extra_body, fields, messages=list(messages))
        return await self._client._generate(CHAT, body, timeout=timeout, max_retries=max_retries)


class AsyncChat:
    def __init__(self, client: AsyncSteeringClient):
        self.completions = AsyncChatCompletions(client)


class AsyncCompletions:
    def __init__(self, client: AsyncSteeringClient):
        self._client = client

    @overload
    async def create(
        self, *, model: str, prompt: Prompt, steering: Optional[SteeringParams] = None,
        stream: Literal[False] = False, timeout: Optional[Timeout] = None, max_retries: Optional[int] = None,
        extra_body: Optional[dict[str, Any]] = None, **fields: Unpack[CompletionFields],
    ) -> Completion: ...

    @overload
    async def create(
        self, *, model: str, prompt: Prompt, steering: Optional[SteeringParams] = None,
        stream: Literal[True], timeout: Optional[Timeout] = None, max_retries: Optional[int] = None,
        extra_body: Optional[dict[str, Any]] = None, **fields: Unpack[CompletionFields],
    ) -> AsyncStream[CompletionChunk]: ...

    async def create(
        self, *, model: str, prompt: Prompt, steering: Optional[SteeringParams] = None,
        stream: bool = False, timeout: Optional[Timeout] = None, max_retries: Optional[int] = None,
        extra_body: Optional[dict[str, Any]] = None, **fields: Any,
    ) -> Union[Completion, AsyncStream[CompletionChunk]]:
        """Complete `prompt` (a text, token ids, or a list of either) under the policy `model`."""
        body = generation_body(model, steering, stream, extra_body, fields, prompt=prompt)
        return await self._client._generate(COMPLETIONS, body, timeout=timeout, max_retries=max_retries)


class AsyncModels:
    def __init__(self, client: AsyncSteeringClient):
        self._client = client

    async def list(self, *, timeout: Optional[Timeout] = None, max_retries: Optional[int] = None) -> PolicyList:
        """The policies served, each with its base, expert pairs, default alphas and `max_alpha`."""
        return await self._client._get("/models", PolicyList, timeout=timeout, max_retries=max_retries)
