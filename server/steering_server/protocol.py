"""What the generation endpoints share of OpenAI's protocol, and the `steering` extension.

Requests forbid unknown fields: a field we do not implement is refused (400), never ignored.
They are strict: a value of the wrong JSON type (`"2"` for a number, `true` for an alpha) is
refused, not coerced; text must be valid Unicode (a lone surrogate escape is refused). What the
fields must say of each other is checked here too, as vLLM checks it on its request models; such a
refusal names its field (`refusal`).

Where vLLM's own model fits, it is subclassed and made strict (`response_format`, `/tokenize`,
`/detokenize`), and vLLM converts (structured outputs, chat rendering, sampling checks). vLLM's
chat and completion requests are not: they coerce types, ignore unknown fields, and carry some
eighty fields for what one composite engine cannot honour per policy (beam search, LoRA, KV
transfer, images, prompt embeddings), each of which would have to be re-declared to be refused.
Each endpoint's own models are in its folder's `protocol.py`.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError
from vllm.entrypoints.generate.base import protocol as vllm_generate
from vllm.entrypoints.generate.base.protocol import structured_outputs_from_response_format
from vllm.entrypoints.openai.chat_completion import protocol as vllm_chat
from vllm.entrypoints.openai.completion import protocol as vllm_completion
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

from steering.policy import Overrides
from steering.rules.calibration import FiniteFloat

REFUSAL = "invalid_request"  # the error type of a cross-field refusal; its context names the field


def refusal(param: str, message: str) -> PydanticCustomError:
    """A request whose fields disagree: the client's error names `param` (`steering_server.errors`)."""
    return PydanticCustomError(REFUSAL, "{message}", {"message": message, "param": param})


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # vLLM's bounds on a seed


def _unicode(text: str) -> str:
    """JSON's `\\ud800` escapes decode to lone surrogates, which no tokenizer or encoder takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"is not valid Unicode: a lone surrogate at character {error.start}") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class StrictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SteeringRequest(StrictRequest):
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
    evidence: Literal["score", "every_score"] | None = Field(
        default=None, description="For a calibration, behind the API key: withhold nothing, and return what the "
        "policy's score (or every abstention score) reads, in steering.evidence.")
    trace: bool = Field(
        default=False, description="Plain and abstention policies: each choice's `trace` gives, per answer token, "
        "its steered and base-alone log-probabilities, each pair's contribution, and the base's own choice where it "
        "differs. Costs one prefill request per view (the base and each steering expert) per piece of the answer.")


class StreamOptions(StrictRequest):
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


class StructuredOutputs(StrictRequest):
    """vLLM's `structured_outputs` (its `StructuredOutputsParams` fields): exactly one constraint."""

    json_: dict | Text | None = Field(default=None, alias="json", description="A JSON schema.")
    regex: Text | None = None
    choice: Annotated[list[Text], Field(min_length=1)] | None = None
    grammar: Text | None = Field(default=None, description="An EBNF / GBNF grammar.")
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: Text | None = None


def _vllm_default(request: type[BaseModel], name: str) -> object:
    return request.model_fields[name].default


# Fields this server does not implement, taken at the one value that changes nothing here and
# refused at any other, by name: vLLM's router (vllm-router) re-serialises every body with them
# set, and clients built for `vllm serve` fill vLLM's defaults in. The values are vLLM's own
# defaults where vLLM's request models declare the field; the rest are the router's (from
# SGLang's protocol, which vLLM does not declare), as the router sends them.
NEUTRAL_FIELDS: dict[str, dict[str, object]] = {
    "chat": {
        **{name: _vllm_default(vllm_chat.ChatCompletionRequest, name)
           for name in ("skip_special_tokens", "include_reasoning")},
        "no_stop_trim": False, "separate_reasoning": True, "stream_reasoning": True, "return_hidden_states": False,
    },
    "completions": {
        "skip_special_tokens": _vllm_default(vllm_completion.CompletionRequest, "skip_special_tokens"),
        "no_stop_trim": False, "return_hidden_states": False,
    },
}


class GenerationRequest(StrictRequest):
    # A field of NEUTRAL_FIELDS: dropped at its neutral value, refused at any other.
    neutral_fields: ClassVar[dict[str, object]] = {}

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

    @model_validator(mode="before")
    @classmethod
    def _neutral_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, neutral in cls.neutral_fields.items():
            value = data.get(name, neutral)
            if value != neutral or type(value) is not type(neutral):
                raise refusal(name, f"{name} {value!r} is not served here: only {neutral!r}, the value that "
                                    "changes nothing, is taken")
        return {key: value for key, value in data.items() if key not in cls.neutral_fields}

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        try:
            return None if bias is None else {str(int(token)): value for token, value in bias.items()}
        except ValueError:
            raise refusal("logit_bias", "logit_bias keys must be token ids") from None

    @model_validator(mode="after")
    def _fields_agree(self) -> GenerationRequest:
        if self.n > 1 and self.temperature == 0:
            raise refusal("n", "n must be 1 with greedy sampling (temperature 0): the choices would be identical")
        if self.stream_options is not None and not self.stream:
            raise refusal("stream_options", "stream_options is only allowed with stream: true")
        if self.prompt_logprobs is not None and self.stream:
            raise refusal("prompt_logprobs", "prompt_logprobs are not available with stream: true")
        try:  # vLLM's own refusal of no constraint, or of several
            self.structured()
        except VLLMValidationError as error:
            raise refusal("structured_outputs", str(error).split(": {")[0]) from None
        return self

    @property
    def constraint(self) -> str | None:
        """The field that constrains the answer's format, if one does."""
        if self.structured_outputs is not None:
            return "structured_outputs"
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format"
        return None

    def structured(self) -> StructuredOutputsParams | None:
        """vLLM's constraint of the answer: its own conversion (`response_format` wins)."""
        given = self.structured_outputs
        params = StructuredOutputsParams(**given.model_dump(by_alias=True, exclude_unset=True)) if given else None
        return structured_outputs_from_response_format(params, self.response_format)

    def sampling(self) -> dict[str, Any]:
        """The fields as vLLM's `SamplingParams` takes them (admission adds max_tokens)."""
        return {
            "n": self.n, "temperature": self.temperature, "top_p": self.top_p,
            "top_k": self.top_k if self.top_k is not None else 0, "min_tokens": self.min_tokens, "stop": self.stop,
            "seed": self.seed, "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "logit_bias": {int(token): bias for token, bias in self.logit_bias.items()} if self.logit_bias else None,
            "ignore_eos": self.ignore_eos, "repetition_penalty": self.repetition_penalty, "min_p": self.min_p,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "structured_outputs": self.structured(),
            "logprobs": self.num_logprobs, "prompt_logprobs": self.prompt_logprobs,
            "output_kind": RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
        }

    @property
    def collect(self) -> str | None:
        return self.steering.evidence if self.steering is not None else None

    @property
    def trace(self) -> bool:
        return self.steering is not None and self.steering.trace

    def overrides(self) -> Overrides | None:
        given = self.steering
        if given is None:
            return None
        return Overrides(given.alpha, given.abstain_threshold, given.costs, given.abstain_cost, given.claim)


class TextPart(StrictRequest):
    type: Literal["text"]
    text: Text


class FunctionCall(StrictRequest):
    name: Text
    arguments: Text = Field(description="The arguments as a JSON text, as the model wrote them.")


class AssistantToolCall(StrictRequest):
    """A tool call of an earlier assistant turn, sent back in the conversation."""

    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictRequest):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = Field(default=None, description="Optional only beside tool_calls.")
    name: Text | None = None
    tool_calls: list[AssistantToolCall] | None = Field(default=None, description="Assistant turns: the calls made.")
    tool_call_id: Text | None = Field(default=None, description="Tool turns: the call this answers.")
    reasoning: Text | None = Field(default=None, description="vLLM extension, assistant turns: a reasoning base's "
                                   "thinking, as its answer carried it, for the chat template (reasoning_content, "
                                   "its older name, is taken too, as vLLM takes it).")

    @model_validator(mode="before")
    @classmethod
    def _older_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and "reasoning_content" in data:  # vLLM renames it so
            data = dict(data)
            older = data.pop("reasoning_content")
            if data.get("reasoning") is None:
                data["reasoning"] = older
        return data

    @model_validator(mode="after")
    def _fields_of_its_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls belong to assistant messages")
        if self.reasoning is not None and self.role != "assistant":
            raise ValueError("reasoning belongs to assistant messages")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool messages, and only they, name the tool_call_id they answer")
        if self.content is None and not self.tool_calls:
            raise ValueError("content is required (it may be left out only beside tool_calls)")
        return self


class ChatRendering(BaseModel):
    """How a conversation is rendered, as vLLM takes it: after the last message the template's
    generation prompt (the default), or the last (assistant) message left open to be continued."""

    add_generation_prompt: bool = Field(default=True, description="vLLM extension: end the rendered "
                                        "conversation with the template's generation prompt.")
    continue_final_message: bool = Field(default=False, description="vLLM extension: leave the final (assistant) "
                                         "message open, so the answer continues it (a prefill); not with "
                                         "add_generation_prompt.")

    @model_validator(mode="after")
    def _one_ending(self):
        if self.continue_final_message and self.add_generation_prompt:
            raise refusal("continue_final_message", "continue_final_message needs add_generation_prompt: false "
                          "(the answer continues the last message; no new one is started)")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise refusal("continue_final_message", "continue_final_message continues the last message, which must "
                          f"be the assistant's (it is {self.messages[-1].role!r})")
        return self


TemplateKwargs = dict[Text, Any]
TEMPLATE_KWARGS = "vLLM extension: variables for the base's chat template (e.g. {\"enable_thinking\": false}); " \
    "one the template does not read is refused."




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
    evidence: dict | None = Field(
        default=None, exclude_if=lambda value: value is None,
        description="With steering.evidence (behind the API key): what the score or decision was computed from "
        "(token_logprobs, first_step, label_logprobs), as `steer calibrate --server` fits on.")
    certified: dict | None = Field(
        default=None, exclude_if=lambda value: value is None,
        description="A policy that states a risk: what its calibration certifies (the risk, epsilon, delta, the "
        "calibration rows n, the threshold).")
    feedback_id: str | None = Field(
        default=None, exclude_if=lambda value: value is None,
        description="Decision and abstention policies, where the config takes feedback: send the outcome with "
        "POST /v1/feedback {\"id\": …, \"outcome\": …}.")


def json_logprob(logprob: float) -> float:
    """A logprob as vLLM sends it: -inf clamped to -9999 (JSON has no -inf)."""
    return max(logprob, -9999.0)


class TraceFlip(BaseModel):
    """The base alone's likeliest token, where steering chose another."""

    token: str
    token_id: int
    base_logprob: float


class TokenTrace(BaseModel):
    """What steering did at one answer token."""

    token: str
    token_id: int
    logprob: float = Field(description="Steered log-probability of the token, at temperature 1.")
    base_logprob: float = Field(description="The base model's alone.")
    contributions: dict[str, float] = Field(
        description="Per pair with a nonzero alpha: alpha * (log p_tuned - log p_untuned) of the token.")
    flip: TraceFlip | None = Field(description="The base alone's own choice, where it is another token.")


def trace_body(entries) -> list[TokenTrace] | None:
    """A piece's `steering.trace.TraceEntry`s as the response shows them (None: no trace asked)."""
    if entries is None:
        return None
    return [TokenTrace(token=e.token, token_id=e.token_id, logprob=json_logprob(e.logprob),
                       base_logprob=json_logprob(e.base_logprob), contributions=e.contributions,
                       flip=None if e.flip is None else TraceFlip(token=e.flip.token, token_id=e.flip.token_id,
                                                                  base_logprob=json_logprob(e.flip.base_logprob)))
            for e in entries]


TRACE_FIELD = Field(default=None, exclude_if=lambda trace: trace is None,
                    description="With steering.trace: one entry per answer token (in a stream, this chunk's tokens).")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class PromptLogprob(BaseModel):
    """vLLM's shape of one candidate prompt token (keyed by its token id)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[str, PromptLogprob] | None]


def prompt_logprobs_body(prompt_logprobs) -> PromptLogprobs:
    """vLLM's `prompt_logprobs` shape."""
    return [
        None if step is None else {
            str(token): PromptLogprob(logprob=json_logprob(lp.logprob), rank=lp.rank, decoded_token=lp.decoded_token)
            for token, lp in step.items()
        }
        for step in prompt_logprobs
    ]


def response_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Answer(BaseModel):
    """What a generation endpoint answers: its choices, the usage, and the `steering` block."""

    id: str
    object: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list
    usage: Usage
    steering: SteeringInfo


class StreamChunk(BaseModel):
    """What every streamed chunk has; the last one carries `steering` (and `usage` if asked)."""

    id: str
    created: int
    model: str
    usage: Usage | None = None
    steering: SteeringInfo | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
