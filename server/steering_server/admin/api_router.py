"""POST /v1/admin/reload: re-read the config file (one of the reloader's three triggers)."""

from fastapi import APIRouter, Request

from steering_server.admin.protocol import ReloadResponse
from steering_server.deps import Ready
from steering_server.openapi import ERRORS
from steering_server.protocol import ErrorResponse

router = APIRouter()


@router.post("/v1/admin/reload", response_model=ReloadResponse,
             responses={**ERRORS, 409: {"model": ErrorResponse, "description": "Needs a restart."}})
async def reload(request: Request, server: Ready) -> ReloadResponse:
    """Re-read the config file: policies added, removed or changed serve from the next request
    on; requests in flight finish on their old policy. A config that fails validation, or that
    changes the base, the experts or the engine (which need a restart), is refused and the
    running policies stay."""
    client = f"{request.client.host}:{request.client.port}" if request.client else "an unknown client"
    agent = request.headers.get("user-agent")
    changes = await server.reloader.reload(f"POST /v1/admin/reload from {client}" + (f" ({agent})" if agent else ""))
    return ReloadResponse(**changes.report(), policies=list(server.lifecycle.deployment.policies))
