"""One error hierarchy for the steering library; the server maps it to HTTP once.

    SteeringError
    ├── ConfigError              bad deployment config, found at start-up or reload (names the field)
    │   ├── EngineStartError     the engine did not start although the config passed every check
    │   └── RestartRequired      a reload changes what only a restart can (the base, experts, engine)
    ├── GenerationFailed         vLLM ended a request with finish_reason "error" (vllm serve's 500)
    └── RequestError             a request that must not be served as asked
        ├── UnknownPolicy        `model` names no policy
        ├── InvalidSteering      an unknown pair or field, a non-finite or out-of-bounds value
        └── InvalidRequest       bad generation input (e.g. longer than the context)
"""

from __future__ import annotations

from collections.abc import Iterable


class SteeringError(Exception):
    """Base of every error this library raises on purpose."""


class ConfigError(SteeringError):
    """The deployment config is unusable; `field` is its dotted path, e.g. `policies.chat.alpha`."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class EngineStartError(ConfigError):
    """vLLM's engine failed to start after every check before it passed; the log has vLLM's reason."""


class RestartRequired(ConfigError):
    """A reload's config changes a field the running engine was built from; the running policies stay."""


class GenerationFailed(SteeringError):
    """vLLM's engine ended a request with an error of its own (e.g. a grammar the tokenizer cannot
    follow); `vllm serve` answers these with a 500, so no client takes an empty answer for one."""


class RequestError(SteeringError):
    """A request asked for something this deployment must refuse; `param` names the input."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class UnknownPolicy(RequestError):
    """The requested policy (the OpenAI `model`) does not exist."""

    def __init__(self, name: str, known: Iterable[str], *, param: str = "model"):
        super().__init__(f"the policy {name!r} does not exist; policies: {sorted(known)}", param=param)


class InvalidSteering(RequestError):
    """A steering override names an unknown pair or field, or a value outside the policy's bounds."""


class InvalidRequest(RequestError):
    """Generation input the engine cannot serve (e.g. longer than the context)."""


def vllm_refusal(error: Exception, *, param: str | None = None) -> InvalidRequest:
    """vLLM's refusal of a request (its `VLLMClientError`s, the `ValueError`s of its parameter
    checks) as this request's error, naming the parameter: the one vLLM names, else the sampling
    parameter its message starts with (`min_tokens must be …`), else `param`, the field the
    caller knows the refusal is about."""
    from vllm import SamplingParams

    named = getattr(error, "parameter", None)
    first = str(error).split(" ", 1)[0]
    if named is None and first in SamplingParams.__struct_fields__:
        named = first
    return InvalidRequest(str(error), param=named or param)
