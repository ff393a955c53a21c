"""The one place where exceptions become HTTP statuses and OpenAI error envelopes."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from steering.errors import (
    InvalidRequest,
    InvalidSteering,
    RequestError,
    SteeringError,
    UnknownPolicy,
)
from steering_server.protocol import ErrorBody, ErrorResponse


class NotAuthenticated(SteeringError):
    """The API key is missing or wrong."""


class EngineNotReady(SteeringError):
    """The engine is still loading (or failed to load)."""


# error class -> (HTTP status, OpenAI error type, code)
STATUS = {
    UnknownPolicy: (404, "invalid_request_error", "model_not_found"),
    InvalidSteering: (400, "invalid_request_error", "invalid_steering"),
    InvalidRequest: (400, "invalid_request_error", "invalid_request"),
    NotAuthenticated: (401, "authentication_error", "invalid_api_key"),
    EngineNotReady: (503, "service_unavailable", "engine_not_ready"),
}


def error_body(error: Exception) -> tuple[int, ErrorBody]:
    """Status and envelope body for any exception; unexpected ones are a 500 without details."""
    for cls in type(error).__mro__:
        if cls in STATUS:
            status, kind, code = STATUS[cls]
            param = error.param if isinstance(error, RequestError) else None
            return status, ErrorBody(message=str(error), type=kind, param=param, code=code)
    return 500, ErrorBody(message="internal server error", type="server_error", code="internal_error")


def _validation_body(error: RequestValidationError) -> ErrorBody:
    first = error.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    return ErrorBody(
        message=f"{param}: {message}" if param else message,
        type="invalid_request_error",
        param=param,
        code="invalid_value",
    )


def _respond(request: Request, status: int, body: ErrorBody) -> JSONResponse:
    metrics = request.app.state.service.metrics
    policy = metrics.policy_label(getattr(request.state, "policy", None))
    metrics.errors.labels(policy, body.code or body.type).inc()
    endpoint = request.scope.get("route").name if request.scope.get("route") else "unknown"
    metrics.requests.labels(policy, endpoint, str(status)).inc()
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(ErrorResponse(error=body).model_dump(), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SteeringError)
    async def steering_error(request: Request, error: SteeringError) -> JSONResponse:
        status, body = error_body(error)
        return _respond(request, status, body)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        body = error.body if isinstance(error.body, dict) else {}
        request.state.policy = body.get("model")
        return _respond(request, 400, _validation_body(error))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return _respond(request, error.status_code, ErrorBody(message=str(error.detail), type=kind))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        # Starlette re-raises after this handler, so uvicorn logs the traceback.
        status, body = error_body(error)
        return _respond(request, status, body)
