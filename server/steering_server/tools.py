"""Tool calls on steered answers, through vLLM's own parsers.

A chat request with `tools` is handed to vLLM's parser for the deployment's `tool_call_parser`
as vLLM's own request object: the parser adjusts it (its call format as a structural tag that
constrains the steered distribution: throughout under `required` or a named function, from an
opened call on under `auto`; special tokens kept), and reads tool calls out of the steered
answer, whole or as a stream, as `vllm serve` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vllm import SamplingParams
from vllm.entrypoints.generate.base.protocol import DeltaToolCall, ToolCall
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest as VllmChatRequest,
)
from vllm.parser.abstract_parser import Parser

from steering.engine import SteeringEngine
from steering.errors import InvalidRequest
from steering_server.protocol import AssistantMessage, ChatCompletionRequest, ChatDelta, NamedToolChoice


@dataclass
class ToolCalling:
    """vLLM's view of a chat request with tools, and where to get a parser for each answer."""

    request: VllmChatRequest
    engine: SteeringEngine

    @property
    def choice(self):
        return self.request.tool_choice

    def constrain(self, params: SamplingParams) -> None:
        """What the parser asked of generation: the call's JSON schema, special tokens kept."""
        if self.request.structured_outputs is not None:
            params.structured_outputs = self.request.structured_outputs
        params.skip_special_tokens = self.request.skip_special_tokens

    def parser(self, prompt: Sequence[int]) -> Parser:
        parser = self.engine.tool_parser(self.request.tools)
        parser.set_prompt_token_ids(list(prompt))
        return parser

    def message(self, parser: Parser, text: str, token_ids: Sequence[int],
                finish_reason: str | None) -> tuple[AssistantMessage, str | None]:
        """The assistant message of a whole answer, and its finish reason."""
        if self.choice == "none":
            return AssistantMessage(content=text), finish_reason
        _, content, calls = parser.parse(text, self.request, enable_auto_tools=True,
                                         model_output_token_ids=list(token_ids))
        calls = [ToolCall(function=call, **({"id": call.id} if call.id else {})) for call in calls or ()]
        message = AssistantMessage(content=content or None, tool_calls=calls or None)
        return message, "tool_calls" if self.ends_with_calls(bool(calls), finish_reason) else finish_reason

    def ends_with_calls(self, called: bool, finish_reason: str | None) -> bool:
        """OpenAI's (and vLLM's) finish reason: tool_calls after calls under auto or required,
        stop under a named function."""
        if self.choice == "auto":
            return called
        return self.choice == "required" and finish_reason == "stop"

    def delta(self, parser: Parser, text: str, token_ids: Sequence[int], prompt: Sequence[int],
              finished: bool) -> ChatDelta | None:
        """A streamed piece read by the parser: content, tool-call deltas, or nothing yet."""
        if self.choice == "none":
            return ChatDelta(content=text)
        message = parser.parse_delta(text, list(token_ids), self.request, list(prompt), finished=finished)
        if message is None:
            return None
        calls: list[DeltaToolCall] = list(message.tool_calls or ())
        return ChatDelta(content=message.content, tool_calls=calls or None)


def tool_calling(engine: SteeringEngine, request: ChatCompletionRequest) -> ToolCalling | None:
    """Admit `tools` and `tool_choice` (what a policy kind allows is `plan_request`'s), or raise
    the error the client gets."""
    if request.tools is None:
        if request.tool_choice not in (None, "none"):
            raise InvalidRequest("tool_choice needs tools", param="tool_choice")
        return None
    if engine.deployment.tool_call_parser is None:
        raise InvalidRequest("this deployment reads no tool calls: its config names no tool_call_parser",
                             param="tools")
    names = [tool.function.name for tool in request.tools]
    if isinstance(request.tool_choice, NamedToolChoice) and request.tool_choice.function.name not in names:
        raise InvalidRequest(f"no tool {request.tool_choice.function.name!r} in tools; they are {names}",
                             param="tool_choice.function.name")
    constrained = request.structured_outputs is not None or (
        request.response_format is not None and request.response_format.type != "text")
    if constrained and request.tool_choice != "none":
        field = "structured_outputs" if request.structured_outputs is not None else "response_format"
        raise InvalidRequest(f"tools constrain the answer to the parser's call format: {field} cannot also "
                             "(unless tool_choice is none)", param=field)
    vllm_request = VllmChatRequest.model_validate({
        "model": request.model,
        "messages": [m.model_dump(exclude_none=True) for m in request.messages],
        "tools": [tool.model_dump() for tool in request.tools],
        "tool_choice": request.tool_choice.model_dump() if isinstance(request.tool_choice, NamedToolChoice)
        else request.tool_choice or "auto",
        "parallel_tool_calls": request.parallel_tool_calls,
    })
    vllm_request = engine.tool_parser(vllm_request.tools).adjust_request(vllm_request)
    return ToolCalling(vllm_request, engine)
