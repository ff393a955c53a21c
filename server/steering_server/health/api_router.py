"""GET /health (200 once the engine is up; 503 while it loads, or once it failed) and GET /metrics."""

from typing import Literal

import prometheus_client
from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel

from steering_server.deps import AnyState

router = APIRouter()


class Health(BaseModel):
    status: Literal["ready", "loading", "failed"]


@router.get("/health", response_model=Health,
            responses={503: {"model": Health, "description": "Loading, or failed (the engine did not start, or died)."}})
async def health(server: AnyState) -> JSONResponse:
    status = server.lifecycle.status
    return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(server: AnyState) -> Response:
    body = server.metrics.render() + prometheus_client.generate_latest(prometheus_client.REGISTRY)
    return Response(body, media_type=prometheus_client.CONTENT_TYPE_LATEST)
