"""POST /v1/chat/completions: OpenAI's chat request and response, with tools, a reasoning base's
thinking (`reasoning`, as vLLM 0.32 names it) and the `steering` block."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from vllm.entrypoints.generate.base import protocol as vllm_generate
from vllm.entrypoints.openai.chat_completion import protocol as vllm_chat

from steering_server.protocol import (
    NEUTRAL_FIELDS,
    TEMPLATE_KWARGS,
    TRACE_FIELD,
    Answer,
    ChatMessage,
    ChatRendering,
    GenerationRequest,
    PromptLogprobs,
    StreamChunk,
    StrictRequest,
    TemplateKwargs,
    Text,
    TokenTrace,
    refusal,
    response_id,
)


class FunctionDefinition(vllm_generate.FunctionDefinition):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Annotated[Text, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: Text | None = None
    parameters: dict[Text, Any] | None = Field(default=None, description="A JSON schema of the arguments.")
    defer_loading: None = Field(default=None, exclude=True)  # the Responses API's; not offered here


class Tool(vllm_chat.ChatCompletionToolsParam):
    """vLLM's (and OpenAI's) function tool, made strict."""

    model_config = ConfigDict(extra="forbid", strict=True)
    function: FunctionDefinition
    defer_loading: None = Field(default=None, exclude=True)


class NamedFunction(StrictRequest):
    name: Text


class NamedToolChoice(StrictRequest):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(ChatRendering, GenerationRequest):
    neutral_fields = NEUTRAL_FIELDS["chat"]
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    chat_template_kwargs: TemplateKwargs | None = Field(default=None, description=TEMPLATE_KWARGS)
    tools: Annotated[list[Tool], Field(min_length=1, max_length=128)] | None = Field(
        default=None, description="Functions the policy may call, parsed by the deployment's tool_call_parser.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None, description="auto (the default with tools): the model decides; required or a named "
        "function: the steered answer is constrained to a call.")
    parallel_tool_calls: bool | None = Field(default=None, description="With required: false allows one call.")
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def token_limit_field(self) -> str:
        """The field the client set the limit with, for errors that name it."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _tools_agree(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise refusal("top_logprobs", "top_logprobs needs logprobs: true")
        if self.tools is None:
            if self.tool_choice not in (None, "none"):
                raise refusal("tool_choice", "tool_choice needs tools")
            return self
        names = [tool.function.name for tool in self.tools]
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise refusal("tool_choice.function.name",
                          f"no tool {self.tool_choice.function.name!r} in tools; they are {names}")
        if self.constraint is not None and self.tool_choice != "none":
            raise refusal(self.constraint, f"tools constrain the answer to the parser's call format: {self.constraint} "
                                           "cannot also (unless tool_choice is none)")
        return self



class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


REASONING_FIELD = Field(default=None, exclude_if=lambda reasoning: reasoning is None,
                        description="vLLM extension, with the deployment's reasoning_parser: the base's thinking "
                        "before its answer, as vLLM 0.32 names it (older vLLM: reasoning_content).")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    reasoning: str | None = REASONING_FIELD
    content: str | None
    tool_calls: list[vllm_generate.ToolCall] | None = Field(default=None, exclude_if=lambda calls: calls is None)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None
    stop_reason: int | str | None = Field(
        default=None, description="vLLM extension: the stop string or stop token id that ended the answer; "
        "null where it ended otherwise (end of sequence, length, a withheld or decided answer).")
    trace: list[TokenTrace] | None = TRACE_FIELD


class ChatCompletion(Answer):
    id: str = Field(default_factory=lambda: response_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    prompt_logprobs: PromptLogprobs | None = Field(
        default=None, description="With prompt_logprobs: one entry per token of the rendered conversation, "
        "the first null.")


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    reasoning: str | None = REASONING_FIELD
    content: str | None = None
    tool_calls: list[vllm_generate.DeltaToolCall] | None = Field(default=None, exclude_if=lambda calls: calls is None)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = Field(
        default=None, description="vLLM extension: the stop string or stop token id that ended the answer; "
        "null where it ended otherwise (end of sequence, length, a withheld or decided answer).")
    trace: list[TokenTrace] | None = TRACE_FIELD


class ChatCompletionChunk(StreamChunk):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


