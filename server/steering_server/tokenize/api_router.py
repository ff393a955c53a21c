"""POST /tokenize and /detokenize (behind the API key: tokenizing is work on the admission thread
that generation waits behind)."""

from fastapi import APIRouter

from steering_server.deps import Ready
from steering_server.openapi import ERRORS
from steering_server.tokenize import serving
from steering_server.tokenize.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)

router = APIRouter()


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest, server: Ready) -> TokenizeResponse:
    return await server.lifecycle.on_admission_thread(serving.tokenize, server.lifecycle.ready(), body)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
async def detokenize(body: DetokenizeRequest, server: Ready) -> DetokenizeResponse:
    return await server.lifecycle.on_admission_thread(serving.detokenize, server.lifecycle.ready(), body)
