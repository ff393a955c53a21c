"""`/tokenize` and `/detokenize`, as `vllm serve` has them, and the chat rendering generation uses:
one base tokenizer, which every policy shares, so a prompt counts here as it counts in `usage`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

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


# Set by the endpoint (or its own field), never through chat_template_kwargs.
_RESERVED = frozenset({"messages", "add_generation_prompt", "tools", "documents"})


def chat_ids(
    engine: SteeringEngine,
    messages: Sequence[ChatMessage],
    *,
    add_generation_prompt: bool = True,
    template_kwargs: Mapping[str, Any] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """A conversation's token ids, rendered with the base tokenizer's chat template.

    vLLM drops a `chat_template_kwargs` key the template does not read; here it is refused, so a
    typo is not silently a different prompt."""
    if not engine.tokenizer.chat_template:
        raise InvalidRequest("the base model has no chat template; use /v1/completions", param="messages")
    for key in template_kwargs or {}:
        if key in _RESERVED or key not in engine.chat_template_variables:
            readable = sorted(engine.chat_template_variables - _RESERVED)
            raise InvalidRequest(f"the base's chat template does not read {key!r}; it reads {readable}",
                                 param=f"chat_template_kwargs.{key}")
    rendered = [m.model_dump(exclude_none=True) for m in messages]
    return engine.chat_prompt(rendered, add_generation_prompt=add_generation_prompt, template_kwargs=template_kwargs,
                              tools=tools)


def tokenize(engine: SteeringEngine, request: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
    if request.model is not None:
        engine.policies[request.model]  # an unknown policy is refused here as on /v1
    if isinstance(request, TokenizeChatRequest):
        ids = chat_ids(engine, request.messages, add_generation_prompt=request.add_generation_prompt,
                       template_kwargs=request.chat_template_kwargs)
    else:
        ids = engine.encode(request.prompt, add_special_tokens=request.add_special_tokens)
    strings = engine.tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=strings)


def detokenize(engine: SteeringEngine, request: DetokenizeRequest) -> DetokenizeResponse:
    if request.model is not None:
        engine.policies[request.model]
    return DetokenizeResponse(prompt=engine.decode(request.tokens))
