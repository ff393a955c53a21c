"""POST /tokenize and /detokenize: vLLM's own request and response models, made strict."""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Field
from vllm.entrypoints.serve.tokenize import protocol as vllm_tokenize

from steering_server.protocol import (
    TEMPLATE_KWARGS,
    ChatMessage,
    ChatRendering,
    StrictRequest,
    TemplateKwargs,
    Text,
)


class TokenizeCompletionRequest(vllm_tokenize.TokenizeCompletionRequest):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: Text | None = Field(default=None, description="A policy name; every policy shares the base's tokenizer.")
    prompt: Text


class TokenizeChatRequest(ChatRendering, StrictRequest):
    """vLLM's chat fields that apply here, with our `ChatMessage`: vLLM's request also takes
    images, audio, tools and its own chat template, which the base's rendering here does not."""

    model: Text | None = Field(default=None, description="A policy name; every policy shares the base's tokenizer.")
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_special_tokens: bool = False
    return_token_strs: bool | None = False
    chat_template_kwargs: TemplateKwargs | None = Field(default=None, description=TEMPLATE_KWARGS)


class DetokenizeRequest(vllm_tokenize.DetokenizeRequest):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: Text | None = Field(default=None, description="A policy name; every policy shares the base's tokenizer.")


TokenizeResponse = vllm_tokenize.TokenizeResponse
DetokenizeResponse = vllm_tokenize.DetokenizeResponse


