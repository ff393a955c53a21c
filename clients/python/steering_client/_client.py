"""The clients. `BaseClient` holds all that does no I/O (address, key, timeouts, retry policy,
request building, parsing); `SteeringClient` and `AsyncSteeringClient` only send and close.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import time
from typing import Any, Callable, Generic, Mapping, Optional, TypeVar, Union

import httpx
from pydantic import BaseModel, ValidationError

from ._exceptions import APIResponseValidationError, status_error, transport_error
from ._resources import (
    AsyncChat,
    AsyncCompletions,
    AsyncFeedback,
    AsyncModels,
    Chat,
    Completions,
    Endpoint,
    Feedback,
    Models,
    ResponseT,
)
from ._response import Options, RawResponse, Timeout
from ._streaming import AsyncStream, ChunkT, Stream
from ._version import __version__

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
# Reads wait long: a generation answers only when done, and an abstention policy may hold a
# streamed answer back until its end. A dead address still fails fast on connect.
DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=5.0)
DEFAULT_STREAM_TIMEOUT = httpx.Timeout(600.0, connect=5.0)
DEFAULT_MAX_RETRIES = 2
INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0
MAX_RETRY_AFTER = 60.0  # a longer Retry-After is not waited for; exponential backoff applies instead
RETRYABLE_STATUSES = frozenset({408, 429})  # and every status >= 500

Failure = Union[httpx.Response, httpx.TransportError]  # an error status, or no answer at all
ModelT = TypeVar("ModelT", bound=BaseModel)
T = TypeVar("T")
HttpT = TypeVar("HttpT", httpx.Client, httpx.AsyncClient)


class BaseClient(Generic[HttpT]):
    """Where and how to talk to the service, shared by the sync and async clients.

    `base_url` and `api_key` default to $STEER_BASE_URL and $STEER_API_KEY, then to the `openai`
    package's $OPENAI_BASE_URL and $OPENAI_API_KEY, read once here; without any, the URL is
    http://127.0.0.1:8000/v1 and no key is sent. `default_headers` and `default_query` go with
    every request; a call's `extra_headers` and `extra_query` add to them or override them.

    `http_client` (an `httpx.Client`, or an `httpx.AsyncClient` for the async client) sends every
    request instead of one the client opens: for proxies, custom transports, event hooks, tests.
    Each request carries its full URL, headers and timeout, so the SDK's `base_url`, key, timeouts
    and retries apply on top of it and its own `base_url` and `timeout` are not used. As in the
    `openai` package, closing the SDK client closes the given one too.
    """

    _http_type: type[HttpT]
    _http: HttpT

    def __init__(
        self,
        *,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        timeout: Timeout = DEFAULT_TIMEOUT,
        stream_timeout: Timeout = DEFAULT_STREAM_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        default_headers: Optional[Mapping[str, str]] = None,
        default_query: Optional[Mapping[str, object]] = None,
        http_client: Optional[HttpT] = None,
    ):
        if http_client is not None and not isinstance(http_client, self._http_type):
            raise TypeError(f"http_client must be an httpx.{self._http_type.__name__}, not {type(http_client).__name__}")
        environ = os.environ
        self.base_url = (base_url or environ.get("STEER_BASE_URL") or environ.get("OPENAI_BASE_URL")
                         or DEFAULT_BASE_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else environ.get("STEER_API_KEY", environ.get("OPENAI_API_KEY"))
        self.default_headers = dict(default_headers or {})
        self.default_query = dict(default_query or {})
        self.timeout = httpx.Timeout(timeout)
        self.stream_timeout = httpx.Timeout(stream_timeout)
        self.max_retries = max_retries
        self._http = self._http_type() if http_client is None else http_client
        self._add_resources()

    def _add_resources(self) -> None:
        """Attach `chat`, `completions`, `models` (also called `policies`) and `feedback`."""
        raise NotImplementedError

    @property
    def headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": f"steering-client/{__version__}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return {**headers, **self.default_headers}

    def _build_request(
        self, method: str, path: str, options: Options, *, body: Optional[dict[str, Any]] = None
    ) -> httpx.Request:
        timeout = options.timeout
        if timeout is None:
            timeout = self.stream_timeout if is_stream(body) else self.timeout
        return self._http.build_request(
            method, self.base_url + path, json=body, timeout=httpx.Timeout(timeout),
            headers={**self.headers, **(options.extra_headers or {})},
            params={**self.default_query, **(options.extra_query or {})} or None,
        )

    def _result(
        self, response: httpx.Response, retries: int, options: Options, read: Callable[[httpx.Response], T]
    ) -> Union[T, RawResponse[T]]:
        """What a call returns: `read(response)`, or for `with_raw_response` the response with `read` for later."""
        return RawResponse(response, retries, read) if options.raw else read(response)

    def _retry_delay(self, attempt: int, max_retries: Optional[int], request: httpx.Request, failure: Failure) -> float:
        """Seconds to wait before retrying `failure`; raises it as the typed error when it is final.

        Connection failures, 408, 429 and 5xx are retried up to `max_retries` times; the wait is
        the server's Retry-After when it asks for a short one, else exponential backoff with jitter.
        """
        is_final = attempt >= (self.max_retries if max_retries is None else max_retries)
        if isinstance(failure, httpx.TransportError):
            if is_final:
                raise transport_error(failure, request) from failure
            return backoff(attempt)
        if is_final or not is_retryable(failure.status_code):
            raise status_error(failure)
        retry_after = _retry_after(failure)
        return backoff(attempt) if retry_after is None else retry_after


def is_stream(body: Optional[dict[str, Any]]) -> bool:
    return bool(body and body.get("stream"))


def is_retryable(status_code: int) -> bool:
    return status_code in RETRYABLE_STATUSES or status_code >= 500


def backoff(attempt: int) -> float:
    """Exponential backoff with jitter: about 0.5 s, 1 s, 2 s, … up to 8 s."""
    return min(INITIAL_RETRY_DELAY * 2.0**attempt, MAX_RETRY_DELAY) * random.uniform(0.75, 1.0)


def _retry_after(response: httpx.Response) -> Optional[float]:
    """The wait the server asks for in Retry-After (seconds or an HTTP date), if between 0 and 60 s."""
    value = response.headers.get("retry-after", "")
    try:
        seconds = float(value)
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if email.utils.parsedate_tz(value) else None
        seconds = when.timestamp() - time.time() if when else -1.0
    return seconds if 0 <= seconds <= MAX_RETRY_AFTER else None


def parse(response: httpx.Response, cast_to: type[ModelT]) -> ModelT:
    """The response's JSON body as `cast_to`."""
    try:
        body: Any = response.json()
    except ValueError as error:
        raise APIResponseValidationError(response=response, body=response.text, message=f"not JSON: {error}") from error
    try:
        return cast_to.model_validate(body)
    except ValidationError as error:
        raise APIResponseValidationError(response=response, body=body, message=str(error)) from error


class SteeringClient(BaseClient[httpx.Client]):
    """The steering service, synchronously, over one pooled httpx client; close it, or use `with`.

    `client.chat.completions.create(...)`, `client.completions.create(...)`, and
    `client.models.list()` (also `client.policies.list()`). `http_client=` takes an `httpx.Client`.
    """

    _http_type = httpx.Client

    def _add_resources(self) -> None:
        self.chat = Chat(self)
        self.completions = Completions(self)
        self.models = self.policies = Models(self)
        self.feedback = Feedback(self)

    def _get(self, path: str, cast_to: type[ModelT], options: Options) -> Any:
        request = self._build_request("GET", path, options)
        response, retries = self._send(request, stream=False, max_retries=options.max_retries)
        return self._result(response, retries, options, lambda r: parse(r, cast_to))

    def _post(self, path: str, cast_to: type[ModelT], options: Options, body: Optional[dict[str, Any]] = None) -> Any:
        request = self._build_request("POST", path, options, body=body)
        response, retries = self._send(request, stream=False, max_retries=options.max_retries)
        return self._result(response, retries, options, lambda r: parse(r, cast_to))

    def _generate(self, endpoint: Endpoint[ResponseT, ChunkT], body: dict[str, Any], options: Options) -> Any:
        """POST a generation; a stream of chunks when the body asks for one, else the parsed answer."""
        request = self._build_request("POST", endpoint.path, options, body=body)
        response, retries = self._send(request, stream=is_stream(body), max_retries=options.max_retries)
        if is_stream(body):
            return self._result(response, retries, options, lambda r: Stream(r, endpoint.chunk_type))
        return self._result(response, retries, options, lambda r: parse(r, endpoint.response_type))

    def _send(self, request: httpx.Request, *, stream: bool, max_retries: Optional[int]) -> tuple[httpx.Response, int]:
        """The 2xx response (still open when streaming) and the retries it took, within what `_retry_delay` allows."""
        attempt = 0
        while True:
            try:
                response = self._http.send(request, stream=stream)
                if response.is_success:
                    return response, attempt
                response.read()
                failure: Failure = response
            except httpx.TransportError as error:
                failure = error
            time.sleep(self._retry_delay(attempt, max_retries, request, failure))
            attempt += 1

    def close(self) -> None:
        """Close the connections, and the `http_client` if one was given."""
        self._http.close()

    def __enter__(self) -> SteeringClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncSteeringClient(BaseClient[httpx.AsyncClient]):
    """The steering service, with asyncio, over one pooled httpx client; `aclose()` it, or use `async with`.

    The same surface as `SteeringClient`, with `await` (and `async for` over streams);
    `http_client=` takes an `httpx.AsyncClient`.
    """

    _http_type = httpx.AsyncClient

    def _add_resources(self) -> None:
        self.chat = AsyncChat(self)
        self.completions = AsyncCompletions(self)
        self.models = self.policies = AsyncModels(self)
        self.feedback = AsyncFeedback(self)

    async def _get(self, path: str, cast_to: type[ModelT], options: Options) -> Any:
        request = self._build_request("GET", path, options)
        response, retries = await self._send(request, stream=False, max_retries=options.max_retries)
        return self._result(response, retries, options, lambda r: parse(r, cast_to))

    async def _post(self, path: str, cast_to: type[ModelT], options: Options,
                    body: Optional[dict[str, Any]] = None) -> Any:
        request = self._build_request("POST", path, options, body=body)
        response, retries = await self._send(request, stream=False, max_retries=options.max_retries)
        return self._result(response, retries, options, lambda r: parse(r, cast_to))

    async def _generate(self, endpoint: Endpoint[ResponseT, ChunkT], body: dict[str, Any], options: Options) -> Any:
        """POST a generation; a stream of chunks when the body asks for one, else the parsed answer."""
        request = self._build_request("POST", endpoint.path, options, body=body)
        response, retries = await self._send(request, stream=is_stream(body), max_retries=options.max_retries)
        if is_stream(body):
            return self._result(response, retries, options, lambda r: AsyncStream(r, endpoint.chunk_type))
        return self._result(response, retries, options, lambda r: parse(r, endpoint.response_type))

    async def _send(
        self, request: httpx.Request, *, stream: bool, max_retries: Optional[int]
    ) -> tuple[httpx.Response, int]:
        """The 2xx response (still open when streaming) and the retries it took, within what `_retry_delay` allows."""
        attempt = 0
        while True:
            try:
                response = await self._http.send(request, stream=stream)
                if response.is_success:
                    return response, attempt
                await response.aread()
                failure: Failure = response
            except httpx.TransportError as error:
                failure = error
            await asyncio.sleep(self._retry_delay(attempt, max_retries, request, failure))
            attempt += 1

    async def aclose(self) -> None:
        """Close the connections, and the `http_client` if one was given."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncSteeringClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
