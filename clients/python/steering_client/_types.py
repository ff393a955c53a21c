"""Typed responses. Fields the server adds later are kept: as attributes and in `model_extra`."""

from typing import Any, Iterator, Optional, Union

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class Decision(_Model):
    """Decision policies: the label probabilities, the expected cost of each action, the action chosen."""

    labels: list[str]
    probabilities: dict[str, float]
    calibrated: dict[str, float]
    label_mass: float
    temperature: float
    bias: Optional[list[float]] = None  # a fitted claim check's, added per label after the temperature
    costs: list[list[float]]
    abstain_cost: Optional[float] = None
    expected_costs: dict[str, float]
    action: str
    claim: Optional[str] = None  # claim checks: the claim, and its steered log-probability as the answer
    claim_logprob: Optional[float] = None


class Abstention(_Model):
    """Abstention policies: the answer's score, raw and calibrated, against the threshold."""

    score: str
    raw: float
    confidence: float
    threshold: float


class Steering(_Model):
    """What steering did for a response: the policy, the alpha applied per pair, and any decision."""

    policy: str
    alpha: dict[str, float]
    abstained: Optional[bool] = None
    confidence: Optional[float] = None
    decision: Optional[Decision] = None
    abstention: Optional[Abstention] = None
    certified: Optional[dict[str, Any]] = None  # a policy that states a risk: what its calibration certifies
    feedback_id: Optional[str] = None  # decisions and abstentions, where the server takes feedback
    evidence: Optional[dict[str, Any]] = None  # asked for with steering.evidence (a calibration's request)


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Model):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Model):
    content: list[TokenLogprob]


class CompletionLogprobs(_Model):
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class TraceFlip(_Model):
    """The base alone's likeliest token, where steering chose another."""

    token: str
    token_id: int
    base_logprob: float


class TokenTrace(_Model):
    """What steering did at one answer token (asked for with steering.trace)."""

    token: str
    token_id: int
    logprob: float  # steered, at temperature 1
    base_logprob: float  # the base model's alone
    contributions: dict[str, float]  # per pair with a nonzero alpha: alpha * (log p_tuned - log p_untuned)
    flip: Optional[TraceFlip] = None  # the base alone's own choice, where it is another token


class _Response(_Model):
    id: str
    object: str
    created: int
    model: str


class Chunk(_Response):
    """One streamed event; the last one has no choices and carries `steering` (and `usage` if asked)."""

    usage: Optional[Usage] = None
    steering: Optional[Steering] = None


class FunctionCall(_Model):
    name: str
    arguments: str


class ToolCall(_Model):
    id: str
    type: str = "function"
    function: FunctionCall


class ChatCompletionMessage(_Model):
    role: str
    reasoning: Optional[str] = None  # a reasoning base's thinking (the deployment's reasoning_parser)
    content: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None


class ChatChoice(_Model):
    index: int
    message: ChatCompletionMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None  # the stop string or token id that ended it, as vLLM says
    trace: Optional[list[TokenTrace]] = None  # with steering.trace: per answer token (a chunk: its own)


class PromptLogprob(_Model):
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


PromptLogprobs = list[Optional[dict[str, PromptLogprob]]]
"""One entry per prompt token, keyed by token id; the first is None."""


class ChatCompletion(_Response):
    choices: list[ChatChoice]
    usage: Usage
    steering: Steering
    prompt_logprobs: Optional[PromptLogprobs] = None


class DeltaFunctionCall(_Model):
    name: Optional[str] = None
    arguments: Optional[str] = None  # a piece of the JSON text: concatenate a call's pieces


class DeltaToolCall(_Model):
    index: int
    id: Optional[str] = None
    type: Optional[str] = None
    function: Optional[DeltaFunctionCall] = None


class ChatDelta(_Model):
    role: Optional[str] = None
    reasoning: Optional[str] = None  # a piece of a reasoning base's thinking
    content: Optional[str] = None
    tool_calls: Optional[list[DeltaToolCall]] = None


class ChatChunkChoice(_Model):
    index: int
    delta: ChatDelta
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None
    trace: Optional[list[TokenTrace]] = None  # with steering.trace: per answer token (a chunk: its own)


class ChatCompletionChunk(Chunk):
    choices: list[ChatChunkChoice]


class CompletionChoice(_Model):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None
    trace: Optional[list[TokenTrace]] = None  # with steering.trace: per answer token (a chunk: its own)
    prompt_logprobs: Optional[PromptLogprobs] = None


class Completion(_Response):
    choices: list[CompletionChoice]
    usage: Usage
    steering: Steering


class CompletionChunk(Chunk):
    choices: list[CompletionChoice]


class ExpertPair(_Model):
    tuned: str
    untuned: str


class Policy(_Model):
    """A policy, served as a model: its base, expert pairs, default alphas and the bound on overrides."""

    id: str
    object: str
    created: int
    owned_by: str
    description: str
    base: str
    experts: dict[str, ExpertPair]
    alpha: dict[str, float]
    max_alpha: Optional[float] = None

    @property
    def pairs(self) -> list[str]:
        """The expert pairs this policy steers with."""
        return list(self.experts)


class PolicyList(_Model):
    """`GET /v1/models`; iterating it yields the policies."""

    object: str
    data: list[Policy]

    def __iter__(self) -> Iterator[Policy]:  # type: ignore[override]
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


class FeedbackResult(_Model):
    """`POST /v1/feedback`: the outcome kept (or kept before), and the response's policy and config."""

    object: str
    status: str  # "recorded" or "already recorded"
    policy: str
    digest: str


class ReloadResult(_Model):
    """`POST /v1/admin/reload`: what the server's config file changed, and the policies served now."""

    object: str
    status: str  # "reloaded" or "unchanged"
    digest: str
    previous_digest: str
    added: list[str]
    removed: list[str]
    changed: dict[str, list[str]]  # policy -> the fields that changed
    policies: list[str]
