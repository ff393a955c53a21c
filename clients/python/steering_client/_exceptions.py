"""The errors this SDK raises; every one is an `APIError`.

    APIError                        .message, .request, .body, .type, .param, .code
    ├── APIConnectionError          no answer: refused, reset, DNS, …
    │   └── APITimeoutError         no answer in time
    ├── APIResponseValidationError  an answer that is not the JSON the types describe
    └── APIStatusError              an answer with a 4xx/5xx status: .response, .status_code
        ├── BadRequestError         400
        ├── AuthenticationError     401
        ├── NotFoundError           404
        ├── RateLimitError          429
        └── InternalServerError     >= 500

A failure in the middle of a stream (the server's `data: {"error": …}` event) is an `APIError`.
`.body` is the server's JSON answer: for errors, the envelope `{"error": {"message", "type",
"param", "code"}}`, whose `type`, `param` and `code` are also attributes; `.message` carries the
server's message (after the status code, for status errors).
"""

from __future__ import annotations

from typing import Any, Optional

import httpx


class APIError(Exception):
    """Anything that went wrong with a request to the steering service."""

    def __init__(self, message: str, *, request: httpx.Request, body: Any = None):
        super().__init__(message)
        self.message = message
        self.request = request
        self.body = body
        error = _envelope(body)
        self.type: Optional[str] = error.get("type")
        self.param: Optional[str] = error.get("param")
        self.code: Optional[str] = error.get("code")


class APIConnectionError(APIError):
    """The request got no answer."""

    def __init__(self, *, request: httpx.Request, message: str = "Connection error."):
        super().__init__(message, request=request)


class APITimeoutError(APIConnectionError):
    """The request got no answer within its timeout."""

    def __init__(self, *, request: httpx.Request):
        super().__init__(request=request, message="Request timed out.")


class APIResponseValidationError(APIError):
    """The server answered with a body that does not fit the expected type."""

    def __init__(self, *, response: httpx.Response, body: Any, message: str):
        super().__init__(message, request=response.request, body=body)
        self.response = response
        self.status_code = response.status_code


class APIStatusError(APIError):
    """The server answered with an error status; `.body` is its error envelope."""

    def __init__(self, message: str, *, response: httpx.Response, body: Any):
        super().__init__(message, request=response.request, body=body)
        self.response = response
        self.status_code = response.status_code


class BadRequestError(APIStatusError):
    """400: the request was refused, e.g. an alpha beyond the policy's `max_alpha` (see `.param`)."""


class AuthenticationError(APIStatusError):
    """401: the API key is missing or wrong."""


class NotFoundError(APIStatusError):
    """404: e.g. a policy the server does not serve."""


class ConflictError(APIStatusError):
    """409: e.g. a reload whose config changes what only a restart can (the base, experts or engine)."""


class RateLimitError(APIStatusError):
    """429: too many requests."""


class InternalServerError(APIStatusError):
    """>= 500: the server failed, or (503) its engine is still loading."""


STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    429: RateLimitError,
}


def _envelope(body: Any) -> dict[str, Any]:
    """The `error` object of an OpenAI error envelope, or {} when `body` is not one."""
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def status_error(response: httpx.Response) -> APIStatusError:
    """The typed error for a response with an error status (its body must have been read)."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text or None
    detail = _envelope(body).get("message") or (body if isinstance(body, str) else response.reason_phrase)
    message = f"Error code: {response.status_code} - {detail}"
    if response.status_code >= 500:
        return InternalServerError(message, response=response, body=body)
    return STATUS_ERRORS.get(response.status_code, APIStatusError)(message, response=response, body=body)


def stream_error(body: dict[str, Any], request: httpx.Request) -> APIError:
    """The error for a stream that failed after its 200 status: the server sent an error event."""
    return APIError(f"Error in stream - {_envelope(body).get('message')}", request=request, body=body)


def transport_error(error: httpx.TransportError, request: httpx.Request) -> APIConnectionError:
    """The typed error for an httpx transport failure."""
    if isinstance(error, httpx.TimeoutException):
        return APITimeoutError(request=request)
    return APIConnectionError(request=request, message=f"Connection error: {error}")
