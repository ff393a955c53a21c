"""Tool calls read from a steered answer by vLLM's own parser, on the real fixture tokenizer (no engine)."""

from __future__ import annotations

import json

from vllm.parser.parser_manager import ParserManager

from steering_server.protocol import ChatCompletionRequest
from steering_server.tools import ToolCalling, tool_calling
from tests.server.test_api import MESSAGES, WEATHER


def test_an_auto_answer_that_calls_is_read_by_vllms_parser(tokenizer):
    """The hermes format in a steered answer becomes a tool call and finish_reason tool_calls."""
    class Deployment:  # what tool_calling reads of the engine: the parser, built on the real tokenizer
        tool_call_parser = "hermes"

    class Engine:
        deployment = Deployment()
        parser_class = ParserManager.get_parser(tool_parser_name="hermes", enable_auto_tools=True, tokenizer=tokenizer)

        def tool_parser(self, tools):
            return self.parser_class(tokenizer, list(tools))

    request = ChatCompletionRequest.model_validate({"model": "chat", "messages": MESSAGES, "tools": [WEATHER]})
    calling = tool_calling(Engine(), request)
    assert isinstance(calling, ToolCalling) and calling.choice == "auto"
    text = 'the moon <tool_call>\n{"name": "weather", "arguments": {"city": "paris"}}\n</tool_call>'
    message, finish = calling.message(calling.parser([1, 2]), text, tokenizer.encode(text), "stop")
    assert finish == "tool_calls"
    (call,) = message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("weather", {"city": "paris"})
    assert message.content.strip() == "the moon"
