"""POST /v1/completions: OpenAI's legacy completions, with vLLM's echo and prompt logprobs."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, model_validator

from steering_server.protocol import (
    NEUTRAL_FIELDS,
    TRACE_FIELD,
    Answer,
    GenerationRequest,
    PromptLogprobs,
    StreamChunk,
    Text,
    TokenTrace,
    refusal,
    response_id,
)


class CompletionRequest(GenerationRequest):
    neutral_fields = NEUTRAL_FIELDS["completions"]
    max_tokens: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="0 (with echo) scores the prompt without generating."
    )
    echo: bool = Field(default=False, description="Prepend the prompt to the text, and its steered logprobs to "
                       "the logprobs: how loglikelihood evaluations score a policy.")
    prompt: Text | Annotated[list[int], Field(min_length=1)] | Annotated[list[Text], Field(min_length=1)] | Annotated[
        list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)
    ]
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def token_limit_field(self) -> str:
        return "max_tokens"

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a text or a token-id list."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)

    @model_validator(mode="after")
    def _echo_agrees(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise refusal("max_tokens", "max_tokens 0 needs echo: true (it scores the prompt without generating)")
        return self



class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None
    stop_reason: int | str | None = Field(
        default=None, description="vLLM extension: the stop string or stop token id that ended the answer; "
        "null where it ended otherwise (end of sequence, length, a withheld or decided answer).")
    trace: list[TokenTrace] | None = TRACE_FIELD
    prompt_logprobs: PromptLogprobs | None = Field(
        default=None, description="With prompt_logprobs: one entry per prompt token, the first null.")


class Completion(Answer):
    id: str = Field(default_factory=lambda: response_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class CompletionChunk(StreamChunk):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


