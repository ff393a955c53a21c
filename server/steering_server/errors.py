"""The one place where exceptions become HTTP statuses and OpenAI error envelopes."""

from __future__ import annotations

import re
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from steering.errors import (
    ConfigError,
    GenerationFailed,
    InvalidRequest,
    InvalidSteering,
    RequestError,
    RestartRequired,
    SteeringError,
    UnknownPolicy,
)
from steering.feedback import FeedbackConflict, InvalidFeedback
from steering_server.protocol import REFUSAL, ErrorBody, ErrorResponse


class NotAuthenticated(SteeringError):
    """The API key is missing or wrong."""


class EngineNotReady(SteeringError):
    """The engine is still loading, failed to load, or died."""


class BodyTooLarge(SteeringError):
    """The request body is over the server's limit."""


# error class -> (HTTP status, OpenAI error type, code)
STATUS = {
    UnknownPolicy: (404, "invalid_request_error", "model_not_found"),
    InvalidFeedback: (400, "invalid_request_error", "invalid_feedback"),
    FeedbackConflict: (409, "invalid_request_error", "outcome_conflict"),
    InvalidSteering: (400, "invalid_request_error", "invalid_steering"),
    InvalidRequest: (400, "invalid_request_error", "invalid_request"),
    NotAuthenticated: (401, "authentication_error", "invalid_api_key"),
    BodyTooLarge: (413, "invalid_request_error", "request_too_large"),
    EngineNotReady: (503, "service_unavailable", "engine_not_ready"),
    GenerationFailed: (500, "server_error", "generation_failed"),
    # A reload whose config is refused: the running policies stay (the field is the `param`).
    RestartRequired: (409, "invalid_request_error", "restart_required"),
    ConfigError: (400, "invalid_request_error", "invalid_config"),
}


def error_body(error: Exception) -> tuple[int, ErrorBody]:
    """Status and envelope body for any exception; unexpected ones are a 500 without details."""
    for cls in type(error).__mro__:
        if cls in STATUS:
            status, kind, code = STATUS[cls]
            param = error.param if isinstance(error, RequestError) else getattr(error, "field", None)
            return status, ErrorBody(message=str(error), type=kind, param=param, code=code)
    return 500, ErrorBody(message="internal server error", type="server_error", code="internal_error")


def field_path(loc: tuple) -> str | None:
    """`messages[0].content` from pydantic's location, without the union members it tried
    (`str`, `list[TextPart]`, `function-after[...]`) or the `body` it starts with."""
    path = ""
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _UNION_MEMBER.fullmatch(part):
            path += f".{part}" if path else part
    return path or None


# What pydantic names a union member by: a type (`str`, `list[int]`, `nullable[...]`), or one of
# our request models by its class name (`TokenizeChatRequest`), never a field.
_UNION_MEMBER = re.compile(r"(str|int|float|bool|list|dict|none|is-instance|literal)(\[.*\])?|[\w-]+\[.*\]|[A-Z]\w*Request")


def _union_member_that_got_furthest(errors: list[dict]) -> dict:
    """The first error, or where it is one of a union's failed members (`prompt` as a string, as
    a token list, ...), the first error of the member that came closest: fewest errors, then the
    deepest, at the latest item (the one token that is not an int, not "should be a string")."""
    loc = tuple(errors[0].get("loc", ()))
    tag = next((i for i, part in enumerate(loc) if isinstance(part, str) and _UNION_MEMBER.fullmatch(part)), None)
    if tag is None:
        return errors[0]
    members: dict[str, list[dict]] = {}
    for e in errors:
        if tuple(e["loc"])[:tag] == loc[:tag] and len(e["loc"]) > tag:
            members.setdefault(e["loc"][tag], []).append(e)

    def closeness(failed: list[dict]) -> tuple:
        first = failed[0]["loc"]
        return -len(failed), len(first), tuple(part for part in first if isinstance(part, int))

    return max(members.values(), key=closeness)[0]


def _validation_body(error: RequestValidationError) -> ErrorBody:
    errors = error.errors()
    first = _union_member_that_got_furthest(errors) if errors else {}
    if first.get("type") == REFUSAL:  # fields that disagree (`protocol.refusal`): the one it names
        return ErrorBody(message=first["ctx"]["message"], type="invalid_request_error", param=first["ctx"]["param"],
                         code="invalid_request")
    param = field_path(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":  # its loc is the character position, not a field
        param, message = None, f"the body is not valid JSON ({first.get('ctx', {}).get('error', message)})"
    return ErrorBody(
        message=f"{param}: {message}" if param else message,
        type="invalid_request_error",
        param=param,
        code="invalid_value",
    )


UNREADABLE_BODY = "There was an error parsing the body"  # FastAPI's HTTPException detail


def respond(
    request: Request, status: int, body: ErrorBody, *, endpoint: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The error envelope, counted in the metrics under the request's policy and endpoint."""
    if endpoint is None:
        endpoint = request.scope["route"].name if request.scope.get("route") else "unknown"
    request.app.state.server.metrics.refused(getattr(request.state, "policy", None), endpoint, status, body)
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(ErrorResponse(error=body).model_dump(), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SteeringError)
    async def steering_error(request: Request, error: SteeringError) -> JSONResponse:
        status, body = error_body(error)
        return respond(request, status, body)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        body = error.body if isinstance(error.body, dict) else {}
        request.state.policy = body.get("model")
        return respond(request, 400, _validation_body(error))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        if error.detail == UNREADABLE_BODY:  # FastAPI's, where json.loads fails other than on syntax
            body = ErrorBody(message="the body could not be read as JSON: it is not UTF-8, or nests too deep",
                             type=kind, code="invalid_value")
        else:
            body = ErrorBody(message=str(error.detail), type=kind)
        # Starlette's own headers stay, e.g. the `Allow` of a 405.
        return respond(request, error.status_code, body, headers=error.headers)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        # Starlette re-raises after this handler, so uvicorn logs the traceback.
        status, body = error_body(error)
        return respond(request, status, body)
