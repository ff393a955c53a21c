"""A Python client for the decode-time steering service, shaped like the official `openai` package.

    from steering_client import SteeringClient

    client = SteeringClient()  # $STEER_BASE_URL (default http://127.0.0.1:8000/v1), $STEER_API_KEY
    answer = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                                            steering={"alpha": {"chat": 2.0}})
    print(answer.choices[0].message.content, answer.steering.alpha)
"""

from ._client import DEFAULT_MAX_RETRIES, DEFAULT_STREAM_TIMEOUT, DEFAULT_TIMEOUT, AsyncSteeringClient, SteeringClient
from ._exceptions import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    RateLimitError,
)
from ._response import RawResponse
from ._streaming import AsyncStream, Stream
from ._types import (
    Abstention,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    Decision,
    FeedbackResult,
    Policy,
    PolicyList,
    ReloadResult,
    Steering,
    TokenTrace,
    Usage,
)
from ._version import __version__

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "Abstention",
    "AsyncSteeringClient",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "ChatCompletion",
    "ChatCompletionChunk",
    "Completion",
    "CompletionChunk",
    "ConflictError",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_STREAM_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "Decision",
    "FeedbackResult",
    "InternalServerError",
    "NotFoundError",
    "Policy",
    "PolicyList",
    "RateLimitError",
    "RawResponse",
    "ReloadResult",
    "Steering",
    "SteeringClient",
    "Stream",
    "TokenTrace",
    "Usage",
    "__version__",
]
