"""POST /v1/completions."""

from fastapi import APIRouter, Request
from fastapi.responses import Response

from steering_server.completions.protocol import Completion, CompletionChunk, CompletionRequest
from steering_server.deps import Ready
from steering_server.openapi import ERRORS, streamed

router = APIRouter()


@router.post("/v1/completions", response_model=Completion, responses={**ERRORS, **streamed(CompletionChunk)},
             name="completions")
async def create_completion(request: Request, body: CompletionRequest, server: Ready) -> Response:
    return await server.completions.handle(request, body)
