"""POST /v1/chat/completions."""

from fastapi import APIRouter, Request
from fastapi.responses import Response

from steering_server.chat.protocol import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest
from steering_server.deps import Ready
from steering_server.openapi import ERRORS, streamed

router = APIRouter()


@router.post("/v1/chat/completions", response_model=ChatCompletion,
             responses={**ERRORS, **streamed(ChatCompletionChunk)}, name="chat")
async def create_chat_completion(request: Request, body: ChatCompletionRequest, server: Ready) -> Response:
    return await server.chat.handle(request, body)
