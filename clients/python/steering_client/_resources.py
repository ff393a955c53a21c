"""What a client offers: `chat.completions`, `completions`, and `models` (also called `policies`,
with `reload()`).

Every option is keyword-only. A field left out (or given as None) is not sent, so the server's
default applies; the standard fields (`max_tokens`, `temperature`, …) are checked by name before
sending (a typo is a `TypeError`), and `extra_body` adds to or overrides anything in the JSON
body. As in the `openai` package, each call also takes `extra_headers`, `extra_query`, `timeout`
and `max_retries`, and `resource.with_raw_response.method(...)` answers with a `RawResponse`
(headers, status, `parse()`) instead of the parsed value.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Iterable, Literal, Mapping, Optional, TypeVar, Union, overload
from urllib.parse import quote

from ._params import ChatFields, CompletionFields
from ._response import Options
from ._streaming import AsyncStream, ChunkT, Stream
from ._types import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    FeedbackResult,
    Policy,
    PolicyList,
    ReloadResult,
)

if TYPE_CHECKING:
    from typing_extensions import Self, Unpack

    from ._client import AsyncSteeringClient, SteeringClient
    from ._params import ChatMessage, Prompt, SteeringParams
    from ._response import Timeout

ResponseT = TypeVar("ResponseT", ChatCompletion, Completion)
ClientT = TypeVar("ClientT", "SteeringClient", "AsyncSteeringClient")
Headers = Mapping[str, str]
Query = Mapping[str, object]


@dataclass(frozen=True)
class Endpoint(Generic[ResponseT, ChunkT]):
    """A generation endpoint: its path, its answer's and streamed chunks' types, its typed fields."""

    path: str
    response_type: type[ResponseT]
    chunk_type: type[ChunkT]
    fields: frozenset[str]


CHAT = Endpoint("/chat/completions", ChatCompletion, ChatCompletionChunk,
                ChatFields.__required_keys__ | ChatFields.__optional_keys__)
COMPLETIONS = Endpoint("/completions", Completion, CompletionChunk,
                       CompletionFields.__required_keys__ | CompletionFields.__optional_keys__)


def generation_body(
    endpoint: Endpoint[Any, Any], model: str, steering: Optional[SteeringParams], stream: bool,
    extra_body: Optional[Mapping[str, Any]], fields: dict[str, Any], **prompt: Any,
) -> dict[str, Any]:
    """The JSON body of a generation: what was given and nothing else, then `extra_body` on top.

    A keyword that is not one of the endpoint's fields is a `TypeError` here, before sending.
    """
    for name in fields:
        if name not in endpoint.fields:
            close = difflib.get_close_matches(name, endpoint.fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"create() got an unexpected keyword argument {name!r}{hint}; "
                            "a field the SDK does not know goes in extra_body")
    body = {"model": model, **prompt, **{name: value for name, value in fields.items() if value is not None}}
    if steering is not None:
        body["steering"] = dict(steering)
    if stream:
        body["stream"] = True
    return {**body, **(extra_body or {})}


class Resource(Generic[ClientT]):
    """A part of the API on one client; `with_raw_response` is the same part answering with `RawResponse`s."""

    def __init__(self, client: ClientT, *, raw: bool = False):
        self._client = client
        self._raw = raw

    @property
    def with_raw_response(self) -> Self:
        """The same methods, each answering with a `RawResponse` whose `parse()` gives the usual value."""
        return type(self)(self._client, raw=True)

    def _options(
        self, timeout: Optional[Timeout], max_retries: Optional[int], extra_headers: Optional[Headers],
        extra_query: Optional[Query],
    ) -> Options:
        return Options(timeout, max_retries, extra_headers, extra_query, raw=self._raw)


class ChatCompletions(Resource["SteeringClient"]):
    @overload
    def create(
        self, *, model: str, messages: Iterable[ChatMessage], steering: Optional[SteeringParams] = None,
        stream: Literal[False] = False, extra_headers: Optional[Headers] = None, extra_query: Optional[Query] = None,
        extra_body: Optional[Mapping[str, Any]] = None, timeout: Optional[Timeout] = None,
        max_retries: Optional[int] = None,
        **fields: Unpack[ChatFields],
    ) -> ChatCompletion: ...

    @overload
    def create(
        self, *, model: str, messages: Iterable[ChatMessage], steering: Optional[SteeringParams] = None,
        stream: Literal[True], extra_headers: Optional[Headers] = None, extra_query: Optional[Query] = None,
        extra_body: Optional[Mapping[str, Any]] = None, timeout: Optional[Timeout] = None,
        max_retries: Optional[int] = None,
        **fields: Unpack[ChatFields],
    ) -> Stream[ChatCompletionChunk]: ...

    def create(
        self, *, model: str, messages: Iterable[ChatMessage], steering: Optional[SteeringParams] = None,
        stream: bool = False, extra_headers: Optional[Headers] = None, extra_query: Optional[Query] = None,
        extra_body: Optional[Mapping[str, Any]] = None, timeout: Optional[Timeout] = None,
        max_retries: Optional[int] = None,
        **fields: Any,
    ) -> Union[ChatCompletion, Stream[ChatCompletionChunk]]:
        """Answer `messages` under the policy `model`; with `stream=True`, a `Stream` of chunks."""
        body = generation_body(CHAT, model, steering, stream, extra_body, fields, messages=list(messages))
        return self._client._generate(CHAT, body, self._options(timeout, max_retries, extra_headers, extra_query))


class Chat:
    def __init__(self, client: SteeringClient):
        self.completions = ChatCompletions(client)


class Completions(Resource["SteeringClient"]):
    @overload
    def create(
        self, *, model: str, prompt: Prompt, steering: Optional[SteeringParams] = None,
        stream: Literal[False] = False, extra_headers: Optional[Headers] = None, extra_query: Optional[Query] = None,
        extra_body: Optional[Mapping[str, Any]] = None, timeout: Optional[Timeout] = None,
        max_retries: Optional[int] = None,
        **fields: Unpack[CompletionFields],
    ) -> Completion: ...

    @overload
    def create(
        self, *, model: str, prompt: Prompt, steering: Optional[SteeringParams] = None,
        stream: Literal[True], extra_headers: Optional[Headers] = None, extra_query: Optional[Query] = None,
        extra_body: Optional[Mapping[str, Any]] = None, timeout: Optional[Timeout] = None,
        max_retries: Optional[int] = None,
        **fields: Unpack[CompletionFields],
    ) -> Stream[CompletionChunk]: ...

    def create(
        self, *, model: str, prompt: Prompt, steering: Optional[SteeringParams] = None,
        stream: bool = False, extra_headers: Optional[Headers] = None, extra_query: Optional[Query] = None,
        extra_body: Optional[Mapping[str, Any]] = None, timeout: Optional[Timeout] = None,
        max_retries: Optional[int] = None,
        **fields: Any,
    ) -> Union[Completion, Stream[CompletionChunk]]:
        """Complete `prompt` (a text, token ids, or a list of either) under the policy `model`."""
        body = generation_body(COMPLETIONS, model, steering, stream, extra_body, fields, prompt=prompt)
        return self._client._generate(COMPLETIONS, body, self._options(timeout, max_retries, extra_headers, extra_query))


class Models(Resource["SteeringClient"]):
    def list(
        self, *, extra_headers: Optional[Headers] = None, extra_query: Optional[Query] = None,
        timeout: Optional[Timeout] = None, max_retries: Optional[int] = None,
    ) -> PolicyList:
        """The policies served, each with its base, expert pairs, default alphas and `max_alpha`."""
        return self._client._get("/models", PolicyList, self._options(timeout, max_retries, extra_headers, extra_query))

    def retrieve(
        self, model: str, *, extra_headers: Optional[Headers] = None, extra_query: Optional[Query] = None,
        timeout: Optional[Timeout] = None, max_retries: Optional[int] = None,
    ) -> Policy:
        """The policy `model` (a `NotFoundError` if there is none)."""
        if not model:
            raise ValueError("model must be a policy name, not empty")
        return self._client._get(f"/models/{quote(model, safe='')}", Policy, self._options(timeout, max_retries, extra_headers, extra_query))

    def reload(
        self, *, extra_headers: Optional[Headers] = None, extra_query: Optional[Query] = None,
        timeout: Optional[Timeout] = None, max_retries: Optional[int] = 0,
    ) -> ReloadResult:
        """Have the server re-read its config file: policies added, removed or changed serve from the
        next request on (requests in flight finish on their old policy). A config that fails
        validation is a `BadRequestError`, one that changes the base, experts or engine a
        `ConflictError`; either way the server keeps its running policies. Not retried by default."""
        return self._client._post("/admin/reload", ReloadResult, self._options(timeout, max_retries, extra_headers, extra_query))


FEEDBACK_DOC = """The outcome of a decision or abstention, for its `steering.feedback_id`: `correct` or
        `incorrect` for an abstention (was the answer, given or withheld, right), the true label for
        a decision. Sent again, the same outcome is answered `already recorded`; another is a
        `ConflictError`, and an id the server did not issue (or too old) a `BadRequestError`."""


class Feedback(Resource["SteeringClient"]):
    def create(
        self, *, id: str, outcome: str, extra_headers: Optional[Headers] = None, extra_query: Optional[Query] = None,
        timeout: Optional[Timeout] = None, max_retries: Optional[int] = None,
    ) -> FeedbackResult:
        return self._client._post("/feedback", FeedbackResult, self._options(timeout, max_retries, extra_headers,
                                                                            extra_query),
                                  body={"id": id, "outcome": outcome})

    create.__doc__ = FEEDBACK_DOC


class AsyncFeedback(Resource["AsyncSteeringClient"]):
    async def create(
        self, *, id: str, outcome: str, extra_headers: Optional[Headers] = None, extra_query: Optional[Query] = None,
        timeout: Optional[Timeout] = None, max_retries: Optional[int] = None,
    ) -> FeedbackResult:
        return await self._client._post("/feedback", FeedbackResult, self._options(timeout, max_retries, extra_headers,
                                                                                  extra_query),
                                        body={"id": id, "outcome": outcome})

    create.__doc__ = FEEDBACK_DOC


class AsyncChatCompletions(Resource["AsyncSteeringClient"]):
    @overload
    async def create(
        self, *, model: str, messages: Iterable[ChatMessage], steering: Optional[SteeringParams] = None,
        stream: Literal[False] = False, extra_headers: Optional[Headers] = None, extra_query: Optional[Query] = None,
        extra_body: Optional[Mapping[str, Any]] = None, timeout: Optional[Timeout] = None,
        max_retries: Optional[int] = None,
        **fields: Unpack[ChatFields],
    ) -> ChatCompletion: ...

    @overload
    async def create(
        self, *, model: str, messages: Iterable[ChatMessage], steering: Optional[SteeringParams] = None,
        stream: Literal[True], extra_headers: Optional[Headers] = None, extra_query: Optional[Query] = None,
        extra_body: Optional[Mapping[str, Any]] = None, timeout: Optional[Timeout] = None,
        max_retries: Optional[int] = None,
        **fields: Unpack[ChatFields],
    ) -> AsyncStream[ChatCompletionChunk]: ...

    async def create(
        self, *, model: str, messages: Iterable[ChatMessage], steering: Optional[SteeringParams] = None,
        stream: bool = False, extra_headers: Optional[Headers] = None, extra_query: Optional[Query] = None,
        extra_body: Optional[Mapping[str, Any]] = None, timeout: Optional[Timeout] = None,
        max_retries: Optional[int] = None,
        **fields: Any,
    ) -> Union[ChatCompletion, AsyncStream[ChatCompletionChunk]]:
        """Answer `messages` under the policy `model`; with `stream=True`, an `AsyncStream` of chunks."""
        body = generation_body(CHAT, model, steering, stream, extra_body, fields, messages=list(messages))
        return await self._client._generate(CHAT, body, self._options(timeout, max_retries, extra_headers, extra_query))


class AsyncChat:
    def __init__(self, client: AsyncSteeringClient):
        self.completions = AsyncChatCompletions(client)


class AsyncCompletions(Resource["AsyncSteeringClient"]):
    @overload
    async def create(
        self, *, model: str, prompt: Prompt, steering: Optional[SteeringParams] = None,
        stream: Literal[False] = False, extra_headers: Optional[Headers] = None, extra_query: Optional[Query] = None,
        extra_body: Optional[Mapping[str, Any]] = None, timeout: Optional[Timeout] = None,
        max_retries: Optional[int] = None,
        **fields: Unpack[CompletionFields],
    ) -> Completion: ...

    @overload
    async def create(
        self, *, model: str, prompt: Prompt, steering: Optional[SteeringParams] = None,
        stream: Literal[True], extra_headers: Optional[Headers] = None, extra_query: Optional[Query] = None,
        extra_body: Optional[Mapping[str, Any]] = None, timeout: Optional[Timeout] = None,
        max_retries: Optional[int] = None,
        **fields: Unpack[CompletionFields],
    ) -> AsyncStream[CompletionChunk]: ...

    async def create(
        self, *, model: str, prompt: Prompt, steering: Optional[SteeringParams] = None,
        stream: bool = False, extra_headers: Optional[Headers] = None, extra_query: Optional[Query] = None,
        extra_body: Optional[Mapping[str, Any]] = None, timeout: Optional[Timeout] = None,
        max_retries: Optional[int] = None,
        **fields: Any,
    ) -> Union[Completion, AsyncStream[CompletionChunk]]:
        """Complete `prompt` (a text, token ids, or a list of either) under the policy `model`."""
        body = generation_body(COMPLETIONS, model, steering, stream, extra_body, fields, prompt=prompt)
        return await self._client._generate(COMPLETIONS, body, self._options(timeout, max_retries, extra_headers, extra_query))


class AsyncModels(Resource["AsyncSteeringClient"]):
    async def list(
        self, *, extra_headers: Optional[Headers] = None, extra_query: Optional[Query] = None,
        timeout: Optional[Timeout] = None, max_retries: Optional[int] = None,
    ) -> PolicyList:
        """The policies served, each with its base, expert pairs, default alphas and `max_alpha`."""
        return await self._client._get("/models", PolicyList, self._options(timeout, max_retries, extra_headers, extra_query))

    async def retrieve(
        self, model: str, *, extra_headers: Optional[Headers] = None, extra_query: Optional[Query] = None,
        timeout: Optional[Timeout] = None, max_retries: Optional[int] = None,
    ) -> Policy:
        """The policy `model` (a `NotFoundError` if there is none)."""
        if not model:
            raise ValueError("model must be a policy name, not empty")
        return await self._client._get(f"/models/{quote(model, safe='')}", Policy, self._options(timeout, max_retries, extra_headers, extra_query))

    async def reload(
        self, *, extra_headers: Optional[Headers] = None, extra_query: Optional[Query] = None,
        timeout: Optional[Timeout] = None, max_retries: Optional[int] = 0,
    ) -> ReloadResult:
        """Have the server re-read its config file: policies added, removed or changed serve from the
        next request on (requests in flight finish on their old policy). A config that fails
        validation is a `BadRequestError`, one that changes the base, experts or engine a
        `ConflictError`; either way the server keeps its running policies. Not retried by default."""
        return await self._client._post("/admin/reload", ReloadResult, self._options(timeout, max_retries, extra_headers, extra_query))
