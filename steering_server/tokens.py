"""`/tokenize` and `/detokenize`, as `vllm serve` has them, and the chat rendering generation uses:
one base tokenizer, which every policy shares, so a prompt counts here as it counts in `usage`."""

from __future__ import annotations

from collections.abc import Sequence

from steering.engine import SteeringEngine
from steering.errors import InvalidRequest
from steering_server.protocol import (
    ChatMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)


def chat_ids(engine: SteeringEngine, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True) -> list[int]:
    """A conversation's token ids, rendered with the base tokenizer's chat template."""
    if not engine.tokenizer.chat_template:
        raise InvalidRequest("the base model has no chat template; use /v1/completions", param="messages")
    rendered = [{"role": m.role, "content": m.text()} for m in messages]
    return engine.chat_prompt(rendered, add_generation_prompt=add_generation_prompt)


def tokenize(engine: SteeringEngine, request: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
    if request.model is not None:
        engine.policies[request.model]  # an unknown policy is refused here as on /v1
    if isinstance(request, TokenizeChatRequest):
        ids = chat_ids(engine, request.messages, add_generation_prompt=request.add_generation_prompt)
    else:
        ids = engine.encode(request.prompt, add_special_tokens=request.add_special_tokens)
    strings = engine.tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=strings)


def detokenize(engine: SteeringEngine, request: DetokenizeRequest) -> DetokenizeResponse:
    if request.model is not None:
        engine.policies[request.model]
    return DetokenizeResponse(prompt=engine.decode(request.tokens))
