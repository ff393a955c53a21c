"""How one call is sent (`Options`) and, for `with_raw_response`, what it returns (`RawResponse`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, Mapping, Optional, TypeVar, Union

import httpx

T = TypeVar("T")
Timeout = Union[float, httpx.Timeout]


@dataclass(frozen=True)
class Options:
    """A call's own settings, on top of the client's: None keeps the client's."""

    timeout: Optional[Timeout] = None
    max_retries: Optional[int] = None
    extra_headers: Optional[Mapping[str, str]] = None
    extra_query: Optional[Mapping[str, object]] = None
    raw: bool = False  # answer with a `RawResponse`


class RawResponse(Generic[T]):
    """The HTTP response a call got, as the `openai` package's `with_raw_response` gives it.

    `headers`, `status_code`, `http_response`, …; `parse()` returns what the call returns
    without `with_raw_response` (for a stream, the `Stream` or `AsyncStream` to iterate).
    """

    def __init__(self, http_response: httpx.Response, retries_taken: int, read: Callable[[httpx.Response], T]):
        self.http_response = http_response
        self.retries_taken = retries_taken
        self._read = read
        self._parsed: list[T] = []

    def parse(self) -> T:
        if not self._parsed:
            self._parsed.append(self._read(self.http_response))
        return self._parsed[0]

    @property
    def headers(self) -> httpx.Headers:
        return self.http_response.headers

    @property
    def status_code(self) -> int:
        return self.http_response.status_code

    @property
    def request(self) -> httpx.Request:
        return self.http_response.request

    @property
    def url(self) -> httpx.URL:
        return self.http_response.url

    @property
    def content(self) -> bytes:
        """The body (not for a stream: read it through `parse()`)."""
        return self.http_response.content

    @property
    def text(self) -> str:
        return self.http_response.text

    def json(self) -> Any:
        return self.http_response.json()

    def __repr__(self) -> str:
        return f"<RawResponse [{self.status_code}] {self.request.method} {self.url}>"
