"""The OpenAPI schema, made to say what the server does: invalid input is our 400, never FastAPI's
422; a stream's events are described; with an API key, every guarded path takes it."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from steering_server.gate import GUARDED
from steering_server.protocol import ErrorResponse
from steering_server.settings import ServerSettings

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 503)}


def streamed(chunk: type[BaseModel]) -> dict:
    """The OpenAPI 200 of a generation endpoint: JSON, or with `stream: true` server-sent events
    (before OpenAPI 3.2, a stream's `schema` describes one event)."""
    data = f"One {chunk.__name__} as JSON; an ErrorResponse if generation fails midway; `[DONE]` to end."
    event = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string", "description": data}, "event": {"type": "string"}}}
    return {200: {"description": "The answer; with `stream: true`, server-sent events.",
                  "content": {"text/event-stream": {"schema": event}}}}


def openapi_schema(app: FastAPI, settings: ServerSettings) -> dict:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                operation["responses"].pop("422", None)
                if settings.api_key and path.startswith(GUARDED):
                    operation["security"] = [{"apiKey": []}]
        components = schema.setdefault("components", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.get("schemas", {}).pop(unused, None)
        if settings.api_key:
            components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
        app.openapi_schema = schema
    return app.openapi_schema
