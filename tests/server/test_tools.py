"""Tool calls read from a steered answer by vLLM's own parser, on the real fixture tokenizer (no engine)."""

from __future__ import annotations

import json

from steering_server.chat.protocol import ChatCompletionRequest

from steering.config import parse_deployment
from steering.tool_calls import ToolCalls, admit_tools, parser_class
from tests.server.test_api import MESSAGES, WEATHER


def test_an_auto_answer_that_calls_is_read_by_vllms_parser(tokenizer):
    """The hermes format in a steered answer becomes a tool call and finish_reason tool_calls."""
    deployment = parse_deployment({"base": "fake/base", "policies": {"chat": {}}, "tool_call_parser": "hermes"})
    parser = parser_class(deployment, tokenizer)  # built on the real tokenizer
    request = ChatCompletionRequest.model_validate({"model": "chat", "messages": MESSAGES, "tools": [WEATHER]})
    calling = admit_tools("chat", [m.model_dump(exclude_none=True) for m in request.messages],
                          [tool.model_dump() for tool in request.tools], request.tool_choice,
                          request.parallel_tool_calls, parser, tokenizer, None)
    assert isinstance(calling, ToolCalls) and calling.choice == "auto"
    text = 'the moon <tool_call>\n{"name": "weather", "arguments": {"city": "paris"}}\n</tool_call>'
    message, finish = calling.message(calling.parser([1, 2]), text, tokenizer.encode(text), "stop")
    assert finish == "tool_calls"
    (call,) = message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("weather", {"city": "paris"})
    assert message.content.strip() == "the moon"
