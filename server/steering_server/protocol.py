"""OpenAI-compatible request and response models, plus the `steering` extension.

Requests forbid unknown fields: a field we do not implement is refused (400), never ignored.
They are strict: a value of the wrong JSON type (`"2"` for a number, `true` for an alpha) is
refused, not coerced; text must be valid Unicode (a lone surrogate escape is refused).

Where vLLM's own model fits, it is subclassed and made strict (`response_format`, `/tokenize`,
`/detokenize`), and vLLM converts (structured outputs, chat rendering, sampling checks). vLLM's
chat and completion requests are not: they coerce types, ignore unknown fields, and carry some
eighty fields for what one composite engine cannot honour per policy (beam search, LoRA, KV
transfer, images, prompt embeddings), each of which would have to be re-declared to be refused.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from vllm.entrypoints.generate.base import protocol as vllm_generate
from vllm.entrypoints.openai.chat_completion import protocol as vllm_chat
from vllm.entrypoints.serve.tokenize import protocol as vllm_tokenize

from steering.config import FiniteFloat

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # vLLM's bounds on a seed


def _unicode(text: str) -> str:
    """JSON's `\\ud800` escapes decode to lone surrogates, which no tokenizer or encoder takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"is not valid Unicode: a lone surrogate at character {error.start}") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SteeringRequest(_Request):
    """Per-request overrides of the chosen policy, within the bounds the policy sets."""

    alpha: dict[Text, FiniteFloat] | None = Field(
        default=None,
        description="Alpha per expert pair, e.g. {\"chat\": 1.5}; |alpha| must stay within the policy's max_alpha.",
    )
    abstain_threshold: FiniteFloat | None = Field(
        default=None, description="Abstention policies: the confidence threshold, within the policy's bounds."
    )
    costs: list[list[FiniteFloat]] | None = Field(
        default=None, description="Decision policies: the cost matrix (rows: actions, columns: true labels)."
    )
    abstain_cost: FiniteFloat | None = Field(default=None, description="Decision policies: the cost of abstaining.")
    claim: Text | None = Field(
        default=None, description="Claim-check policies (required there): the answer to the prompt to check, "
        "scored as written right after the prompt (mind the leading space)."
    )


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(
        default=False, description="vLLM extension: with include_usage, every chunk carries the usage so far."
    )


class JsonSchemaResponseFormat(vllm_generate.JsonSchemaResponseFormat):
    model_config = ConfigDict(extra="forbid", strict=True, serialize_by_alias=True)
    name: Text


class ResponseFormat(vllm_generate.ResponseFormat):
    """vLLM's `response_format`, made strict: `text`, `json_object`, or `json_schema` with its schema.
    (vLLM's structural-tag formats are not offered: they name tool-call tags we do not parse.)"""

    model_config = ConfigDict(extra="forbid", strict=True)
    json_schema: JsonSchemaResponseFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with type json_schema, and only then")
        if self.json_schema is not None and self.json_schema.json_schema is None:
            raise ValueError("json_schema.schema is required")
        return self


class StructuredOutputs(_Request):
    """vLLM's `structured_outputs` (its `StructuredOutputsParams` fields): exactly one constraint."""

    json_: dict | Text | None = Field(default=None, alias="json", description="A JSON schema.")
    regex: Text | None = None
    choice: Annotated[list[Text], Field(min_length=1)] | None = None
    grammar: Text | None = Field(default=None, description="An EBNF / GBNF grammar.")
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: Text | None = None


class _GenerationRequest(_Request):
    model: Text = Field(description="A policy name, as listed by GET /v1/models.")
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[FiniteFloat, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[FiniteFloat, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] | None = Field(default=None, description="vLLM extension; -1 or unset: off.")
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stop: Text | Annotated[list[Text], Field(max_length=16)] | None = None
    seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    presence_penalty: Annotated[FiniteFloat, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[FiniteFloat, Field(ge=-2, le=2)] = 0.0
    logit_bias: dict[Text, Annotated[FiniteFloat, Field(ge=-100, le=100)]] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = Field(default=0, description="vLLM extension.")
    ignore_eos: bool = Field(default=False, description="vLLM extension.")
    repetition_penalty: Annotated[FiniteFloat, Field(gt=0)] = Field(
        default=1.0, description="vLLM extension: above 1 discourages tokens already in the prompt or answer."
    )
    min_p: Annotated[FiniteFloat, Field(ge=0, le=1)] = Field(
        default=0.0, description="vLLM extension: drop tokens less likely than min_p times the likeliest."
    )
    include_stop_str_in_output: bool = Field(default=False, description="vLLM extension.")
    response_format: ResponseFormat | None = Field(
        default=None, description="Constrain the steered answer: text, any JSON object, or JSON of a schema."
    )
    structured_outputs: StructuredOutputs | None = Field(
        default=None, description="vLLM extension: constrain the steered answer by a schema, regex, choice or grammar."
    )
    prompt_logprobs: Annotated[int, Field(ge=0, le=20)] | None = Field(
        default=None, description="vLLM extension: the steered log-probability of every prompt token after the "
        "first, with this many alternatives (not with stream).",
    )
    user: Text | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    steering: SteeringRequest | None = Field(
        default=None, description="Steering overrides (send through the OpenAI SDK's extra_body)."
    )


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class FunctionCall(_Request):
    name: Text
    arguments: Text = Field(description="The arguments as a JSON text, as the model wrote them.")


class AssistantToolCall(_Request):
    """A tool call of an earlier assistant turn, sent back in the conversation."""

    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = Field(default=None, description="Optional only beside tool_calls.")
    name: Text | None = None
    tool_calls: list[AssistantToolCall] | None = Field(default=None, description="Assistant turns: the calls made.")
    tool_call_id: Text | None = Field(default=None, description="Tool turns: the call this answers.")

    @model_validator(mode="after")
    def _fields_of_its_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls belong to assistant messages")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool messages, and only they, name the tool_call_id they answer")
        if self.content is None and not self.tool_calls:
            raise ValueError("content is required (it may be left out only beside tool_calls)")
        return self


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


class NamedFunction(_Request):
    name: Text


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


TemplateKwargs = dict[Text, Any]
TEMPLATE_KWARGS = "vLLM extension: variables for the base's chat template (e.g. {\"enable_thinking\": false}); " \
    "one the template does not read is refused."


class ChatCompletionRequest(_GenerationRequest):
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


class CompletionRequest(_GenerationRequest):
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


# /tokenize and /detokenize: vLLM's own request and response models, made strict.


class TokenizeCompletionRequest(vllm_tokenize.TokenizeCompletionRequest):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: Text | None = Field(default=None, description="A policy name; every policy shares the base's tokenizer.")
    prompt: Text


class TokenizeChatRequest(_Request):
    """vLLM's chat fields that apply here, with our `ChatMessage`: vLLM's request also takes
    images, audio, tools and its own chat template, which the base's rendering here does not."""

    model: Text | None = Field(default=None, description="A policy name; every policy shares the base's tokenizer.")
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    return_token_strs: bool | None = False
    chat_template_kwargs: TemplateKwargs | None = Field(default=None, description=TEMPLATE_KWARGS)


class DetokenizeRequest(vllm_tokenize.DetokenizeRequest):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: Text | None = Field(default=None, description="A policy name; every policy shares the base's tokenizer.")


TokenizeResponse = vllm_tokenize.TokenizeResponse
DetokenizeResponse = vllm_tokenize.DetokenizeResponse


# Responses


class SteeringInfo(BaseModel):
    """What steering and decisions did for this response."""

    policy: str
    alpha: dict[str, float] = Field(description="The alpha applied per expert pair.")
    abstained: bool | None = Field(default=None, description="Whether the answer was replaced by abstaining.")
    confidence: float | None = Field(default=None, description="Calibrated confidence of the answer or decision.")
    decision: dict | None = Field(
        default=None,
        description="Decision policies: labels, raw and calibrated probabilities, label_mass, costs, "
        "expected_costs per action, and the chosen action; a claim check adds the claim and claim_logprob.",
    )
    abstention: dict | None = Field(
        default=None, description="Abstention policies: the score, its raw and calibrated values, the threshold."
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class PromptLogprob(BaseModel):
    """vLLM's shape of one candidate prompt token (keyed by its token id)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[vllm_generate.ToolCall] | None = Field(default=None, exclude_if=lambda calls: calls is None)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None
    prompt_logprobs: PromptLogprobs | None = Field(
        default=None, description="With prompt_logprobs: one entry per prompt token, the first null.")


def _response_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=lambda: _response_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    steering: SteeringInfo
    prompt_logprobs: PromptLogprobs | None = Field(
        default=None, description="With prompt_logprobs: one entry per token of the rendered conversation, "
        "the first null.")


class Completion(BaseModel):
    id: str = Field(default_factory=lambda: _response_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    steering: SteeringInfo


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[vllm_generate.DeltaToolCall] | None = Field(default=None, exclude_if=lambda calls: calls is None)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class _Chunk(BaseModel):
    """What every streamed chunk has; the last one carries `steering` (and `usage` if asked)."""

    id: str
    created: int
    model: str
    usage: Usage | None = None
    steering: SteeringInfo | None = None


class ChatCompletionChunk(_Chunk):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class CompletionChunk(_Chunk):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    """A policy, listed as a model."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "steering"
    description: str
    base: str
    experts: dict[str, dict[str, str]] = Field(description="Expert pairs by name: tuned and untuned checkpoints.")
    alpha: dict[str, float]
    max_alpha: float | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ready", "loading", "failed"]


class ReloadResponse(BaseModel):
    """What `POST /v1/admin/reload` changed; requests admitted before it finish on their old policy."""

    object: Literal["config.reload"] = "config.reload"
    status: Literal["reloaded", "unchanged"]
    digest: str = Field(description="The active config's digest (also `steer_config_info` in /metrics).")
    previous_digest: str
    added: list[str]
    removed: list[str]
    changed: dict[str, list[str]] = Field(description="Changed policies, each with the fields that changed.")
    policies: list[str] = Field(description="Every policy served from now on.")


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
