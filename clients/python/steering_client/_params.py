"""What `create()` accepts besides `model`, the prompt and `steering`: the standard fields, typed.

They are for type checkers and editors; at run time the fields pass through as given, and the
server refuses (400) any it does not know.
"""

from typing import Any, Literal, TypedDict, Union


class SteeringParams(TypedDict, total=False):
    """Per-request overrides of the policy, within the bounds it sets."""

    alpha: dict[str, float]
    abstain_threshold: float
    costs: list[list[float]]
    abstain_cost: float
    claim: str
    trace: bool  # plain and abstention policies: each choice's `trace`, per answer token


class StreamOptions(TypedDict, total=False):
    include_usage: bool
    continuous_usage_stats: bool


class JSONSchema(TypedDict, total=False):
    name: str
    description: str
    schema: dict[str, Any]
    strict: bool


class ResponseFormat(TypedDict, total=False):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchema


class StructuredOutputs(TypedDict, total=False):
    """vLLM's structured outputs: exactly one of json, regex, choice, grammar, json_object."""

    json: Union[dict[str, Any], str]
    regex: str
    choice: list[str]
    grammar: str
    json_object: bool
    disable_any_whitespace: bool
    disable_additional_properties: bool
    whitespace_pattern: str


class TextPart(TypedDict):
    type: str
    text: str


class FunctionCall(TypedDict):
    name: str
    arguments: str  # JSON text


class ToolCall(TypedDict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class _Message(TypedDict):
    role: str


class ChatMessage(_Message, total=False):
    content: Union[str, list[TextPart], None]  # None only beside tool_calls
    name: str
    tool_calls: list[ToolCall]  # assistant turns
    tool_call_id: str  # tool turns
    reasoning: str  # assistant turns: a reasoning base's thinking, as its answer carried it


class _Function(TypedDict):
    name: str


class FunctionDefinition(_Function, total=False):
    description: str
    parameters: dict[str, Any]  # a JSON schema
    strict: bool


class Tool(TypedDict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(TypedDict):
    type: Literal["function"]
    function: _Function


class _GenerationFields(TypedDict, total=False):
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    n: int
    stop: Union[str, list[str]]
    seed: int
    presence_penalty: float
    frequency_penalty: float
    logit_bias: dict[str, float]
    min_tokens: int
    ignore_eos: bool
    repetition_penalty: float
    min_p: float
    include_stop_str_in_output: bool
    prompt_logprobs: int
    response_format: ResponseFormat
    structured_outputs: StructuredOutputs
    user: str
    stream_options: StreamOptions


class ChatFields(_GenerationFields, total=False):
    max_completion_tokens: int
    chat_template_kwargs: dict[str, Any]
    add_generation_prompt: bool  # vLLM's: false with continue_final_message, to continue the last message
    continue_final_message: bool
    tools: list[Tool]
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice]
    parallel_tool_calls: bool
    logprobs: bool
    top_logprobs: int


class CompletionFields(_GenerationFields, total=False):
    logprobs: int
    echo: bool


Prompt = Union[str, list[int], list[str], list[list[int]]]
