"""Tool calls on steered answers, through vLLM's own parsers.

A chat request with `tools` is handed to vLLM's parser for the deployment's `tool_call_parser`
as vLLM's own request object: the parser adjusts it (its call format as a structural tag that
constrains the steered distribution: throughout under `required` or a named function, from an
opened call on under `auto`; special tokens kept), and reads tool calls out of the steered
answer, whole or as a stream, as `vllm serve` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from vllm.entrypoints.generate.base.protocol import DeltaToolCall, ToolCall
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest as VllmChatRequest,
)
from vllm.parser.abstract_parser import Parser
from vllm.parser.parser_manager import ParserManager
from vllm.sampling_params import StructuredOutputsParams

from steering.config import Deployment, checkpoint_name
from steering.errors import ConfigError, InvalidRequest


def parser_class(deployment: Deployment, tokenizer) -> type[Parser] | None:
    """vLLM's parser for the deployment's `tool_call_parser` (as `vllm serve --tool-call-parser
    --enable-auto-tool-choice`), checked against the base's tokenizer: at start-up, once."""
    name = deployment.tool_call_parser
    if name is None:
        return None
    try:
        return ParserManager.get_parser(tool_parser_name=name, enable_auto_tools=True,
                                        tool_strict_level=deployment.tool_strict_level,
                                        model_name=checkpoint_name(deployment.base), tokenizer=tokenizer)
    except TypeError as error:  # vLLM's check that the tokenizer has what the parser needs
        raise ConfigError("tool_call_parser", str(error)) from None


class ToolMessage(NamedTuple):
    """What a parser read in an answer, or a piece of one: text, and tool calls."""

    content: str | None
    tool_calls: list[ToolCall] | list[DeltaToolCall] | None


@dataclass
class ToolCalls:
    """vLLM's view of a chat request with tools, and a fresh parser for each answer."""

    request: VllmChatRequest
    parser_class: type[Parser]
    tokenizer: Any  # vLLM's
    model_config: Any

    @property
    def choice(self):
        return self.request.tool_choice

    @property
    def structured_outputs(self) -> StructuredOutputsParams | None:
        """The call format's constraint on the steered answer, if the parser asked for one."""
        return self.request.structured_outputs

    @property
    def skip_special_tokens(self) -> bool:
        return self.request.skip_special_tokens

    def parser(self, prompt: Sequence[int]) -> Parser:
        """A parser for one answer (parsers keep state while they read a stream)."""
        parser = self.parser_class(self.tokenizer, list(self.request.tools), model_config=self.model_config)
        parser.set_prompt_token_ids(list(prompt))
        return parser

    def message(self, parser: Parser, text: str, token_ids: Sequence[int],
                finish_reason: str | None) -> tuple[ToolMessage, str | None]:
        """What a whole answer says, and its finish reason."""
        if self.choice == "none":
            return ToolMessage(text, None), finish_reason
        _, content, calls = parser.parse(text, self.request, enable_auto_tools=True,
                                         model_output_token_ids=list(token_ids))
        calls = [ToolCall(function=call, **({"id": call.id} if call.id else {})) for call in calls or ()]
        finish = "tool_calls" if self.ends_with_calls(bool(calls), finish_reason) else finish_reason
        return ToolMessage(content or None, calls or None), finish

    def ends_with_calls(self, called: bool, finish_reason: str | None) -> bool:
        """OpenAI's (and vLLM's) finish reason: tool_calls after calls under auto or required,
        stop under a named function."""
        if self.choice == "auto":
            return called
        return self.choice == "required" and finish_reason == "stop"

    def delta(self, parser: Parser, text: str, token_ids: Sequence[int], prompt: Sequence[int],
              finished: bool) -> ToolMessage | None:
        """A streamed piece read by the parser: content, tool-call deltas, or nothing yet."""
        if self.choice == "none":
            return ToolMessage(text, None)
        message = parser.parse_delta(text, list(token_ids), self.request, list(prompt), finished=finished)
        if message is None:
            return None
        return ToolMessage(message.content, list(message.tool_calls or ()) or None)


class ToolStream:
    """One streamed answer's tool calls, read as its pieces arrive (a parser keeps state meanwhile)."""

    def __init__(self, tools: ToolCalls, prompt: Sequence[int]):
        self.tools = tools
        self.prompt = list(prompt)
        self.parser = tools.parser(prompt)
        self.called = False  # whether a tool call has streamed

    def read(self, text: str, token_ids: Sequence[int], finish_reason: str | None) -> tuple[ToolMessage | None,
                                                                                          str | None]:
        """The piece as the client sees it (None while the parser holds a call back), and its
        finish reason (`tool_calls` where the answer ended with calls)."""
        read = self.tools.delta(self.parser, text, token_ids, self.prompt, finished=finish_reason is not None)
        self.called = self.called or bool(read is not None and read.tool_calls)
        if finish_reason is not None and self.tools.ends_with_calls(self.called, finish_reason):
            finish_reason = "tool_calls"
        return read, finish_reason


def admit_tools(policy: str, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]],
                tool_choice: str | Mapping[str, Any] | None, parallel_tool_calls: bool | None,
                parser: type[Parser] | None, tokenizer, model_config) -> ToolCalls:
    """A conversation's tools, as vLLM's parser adjusts the request; refused where the deployment
    reads no tool calls. (What a policy kind allows is admission's; how `tool_choice` fits the
    tools, the request model's.)"""
    if parser is None:
        raise InvalidRequest("this deployment reads no tool calls: its config names no tool_call_parser",
                             param="tools")
    request = VllmChatRequest.model_validate({"model": policy, "messages": list(messages), "tools": list(tools),
                                              "tool_choice": tool_choice or "auto",
                                              "parallel_tool_calls": parallel_tool_calls})
    request = parser(tokenizer, request.tools, model_config=model_config).adjust_request(request)
    return ToolCalls(request, parser, tokenizer, model_config)
