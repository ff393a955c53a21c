"""A chat answer as vLLM's own parser reads it: a reasoning base's thinking, the content, tool calls.

With the deployment's `reasoning_parser` or `tool_call_parser`, a chat request is handed to vLLM's
parser for them (composed as `vllm serve --reasoning-parser … --tool-call-parser …
--enable-auto-tool-choice` composes them) as vLLM's own request object. The parser adjusts the
request as vLLM's renderer has it adjust one (a call format as a structural tag that constrains the
steered distribution: throughout under `required` or a named function, from an opened call on under
`auto`; special tokens kept), and reads the steered answer, whole or as a stream, as vLLM's chat
serving reads it: the thinking first, then tool calls in what follows it. What the thinking means
for the policies is `steering.reasoning`'s.
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
from steering.prompts import Conversation
from steering.reasoning import reasoning_parser_class


def parser_class(deployment: Deployment, tokenizer) -> type[Parser] | None:
    """vLLM's parser of the deployment's chat answers, each of its parsers checked against the base's
    tokenizer (a refusal names its field): at start-up, once."""
    options = {"enable_auto_tools": True, "tool_strict_level": deployment.tool_strict_level,
               "model_name": checkpoint_name(deployment.base)}
    reasoning_parser_class(deployment, tokenizer)
    if deployment.tool_call_parser is not None:
        try:
            ParserManager.get_parser(tool_parser_name=deployment.tool_call_parser, tokenizer=tokenizer, **options)
        except TypeError as error:  # vLLM's check that the tokenizer has what the parser needs
            raise ConfigError("tool_call_parser", str(error)) from None
    return ParserManager.get_parser(tool_parser_name=deployment.tool_call_parser,
                                    reasoning_parser_name=deployment.reasoning_parser, **options)


class ParsedMessage(NamedTuple):
    """What the parser read in an answer, or a piece of one: the thinking, text, tool calls."""

    reasoning: str | None
    content: str | None
    tool_calls: list[ToolCall] | list[DeltaToolCall] | None


@dataclass
class ChatParsing:
    """vLLM's view of a chat request whose answers its parser reads, and a fresh parser for each answer."""

    request: VllmChatRequest
    parser_class: type[Parser]
    tokenizer: Any  # vLLM's
    model_config: Any
    template_kwargs: Mapping[str, Any]  # the chat template's variables, as vLLM gives them to its parsers

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
        parser = self.parser_class(self.tokenizer, self.request.tools, model_config=self.model_config,
                                   chat_template_kwargs=dict(self.template_kwargs))
        parser.set_prompt_token_ids(list(prompt))
        return parser

    def message(self, parser: Parser, text: str, token_ids: Sequence[int],
                finish_reason: str | None) -> tuple[ParsedMessage, str | None]:
        """What a whole answer says, and its finish reason."""
        reasoning, content, calls = parser.parse(text, self.request, enable_auto_tools=True,
                                                 model_output_token_ids=list(token_ids))
        calls = [ToolCall(function=call, **({"id": call.id} if call.id else {})) for call in calls or ()]
        finish = "tool_calls" if self.ends_with_calls(bool(calls), finish_reason) else finish_reason
        return ParsedMessage(reasoning, content or None, calls or None), finish

    def ends_with_calls(self, called: bool, finish_reason: str | None) -> bool:
        """OpenAI's (and vLLM's) finish reason: tool_calls after calls under auto or required,
        stop under a named function."""
        if self.choice == "auto":
            return called
        return self.choice == "required" and finish_reason == "stop"

    def delta(self, parser: Parser, text: str, token_ids: Sequence[int], prompt: Sequence[int],
              finished: bool) -> ParsedMessage | None:
        """A streamed piece read by the parser: thinking, content, tool-call deltas, or nothing yet."""
        message = parser.parse_delta(text, list(token_ids), self.request, list(prompt), finished=finished)
        if message is None:
            return None
        return ParsedMessage(message.reasoning, message.content, list(message.tool_calls or ()) or None)


class ParsedStream:
    """One streamed answer, read as its pieces arrive (a parser keeps state meanwhile)."""

    def __init__(self, parsing: ChatParsing, prompt: Sequence[int]):
        self.parsing = parsing
        self.prompt = list(prompt)
        self.parser = parsing.parser(prompt)
        self.called = False  # whether a tool call has streamed

    def read(self, text: str, token_ids: Sequence[int], finish_reason: str | None) -> tuple[ParsedMessage | None,
                                                                                          str | None]:
        """The piece as the client sees it (None while the parser holds it back), and its finish
        reason (`tool_calls` where the answer ended with calls)."""
        read = self.parsing.delta(self.parser, text, token_ids, self.prompt, finished=finish_reason is not None)
        self.called = self.called or bool(read is not None and read.tool_calls)
        if finish_reason is not None and self.parsing.ends_with_calls(self.called, finish_reason):
            finish_reason = "tool_calls"
        return read, finish_reason


def admit_parsing(policy: str, conversation: Conversation, parser: type[Parser] | None, tokenizer,
                  model_config) -> ChatParsing | None:
    """A conversation as vLLM's parser will read its answers (None: they are read as they are, as
    they are without tools where the deployment reads no thinking); its tools refused where the
    deployment reads no tool calls. (What a policy kind allows is admission's; how `tool_choice`
    fits the tools, the request model's.)"""
    tools = conversation.tools
    if tools and (parser is None or parser.tool_parser_cls is None):
        raise InvalidRequest("this deployment reads no tool calls: its config names no tool_call_parser",
                             param="tools")
    if parser is None or not (tools or parser.reasoning_parser_cls):
        return None
    fields: dict[str, Any] = {"model": policy, "messages": list(conversation.messages)}
    if tools:
        fields |= {"tools": list(tools), "tool_choice": conversation.tool_choice or "auto",
                   "parallel_tool_calls": conversation.parallel_tool_calls}
    request = VllmChatRequest.model_validate(fields)
    kwargs = conversation.chat_template_kwargs
    if parser.reasoning_parser_cls is not None or request.tool_choice != "none":  # as vLLM's renderer decides
        request = parser(tokenizer, request.tools, model_config=model_config,
                         chat_template_kwargs=dict(kwargs)).adjust_request(request)
    return ChatParsing(request, parser, tokenizer, model_config, kwargs)
