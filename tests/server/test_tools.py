"""Tool calls read from a steered answer by vLLM's own parser, on the real fixture tokenizer (no engine)."""

from __future__ import annotations

import json

from steering_server.chat.protocol import ChatCompletionRequest

from steering.config import parse_deployment
from steering.parsing import ChatParsing, admit_parsing, parser_class
from steering.prompts import Conversation
from tests.server.test_api import MESSAGES, WEATHER


def test_an_auto_answer_that_calls_is_read_by_vllms_parser(tokenizer):
    """The hermes format in a steered answer becomes a tool call and finish_reason tool_calls."""
    deployment = parse_deployment({"base": "fake/base", "policies": {"chat": {}}, "tool_call_parser": "hermes"})
    parser = parser_class(deployment, tokenizer)  # built on the real tokenizer
    request = ChatCompletionRequest.model_validate({"model": "chat", "messages": MESSAGES, "tools": [WEATHER]})
    conversation = Conversation([m.model_dump(exclude_none=True) for m in request.messages],
                                tools=[tool.model_dump() for tool in request.tools], tool_choice=request.tool_choice,
                                parallel_tool_calls=request.parallel_tool_calls)
    calling = admit_parsing("chat", conversation, parser, tokenizer, None)
    assert isinstance(calling, ChatParsing) and calling.choice == "auto"
    text = 'the moon <tool_call>\n{"name": "weather", "arguments": {"city": "paris"}}\n</tool_call>'
    message, finish = calling.message(calling.parser([1, 2]), text, tokenizer.encode(text), "stop")
    assert finish == "tool_calls"
    (call,) = message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("weather", {"city": "paris"})
    assert message.content.strip() == "the moon"


def test_the_default_holds_arguments_to_the_schema_where_vllms_leaves_them_free(tokenizer):
    """LangChain marks no function strict. vLLM's default level (auto) then lets a named call's
    arguments be any JSON value, a bare number even; ours (parameter) holds them to the schema."""
    note = {"type": "function", "function": {"name": "note", "parameters": {
        "type": "object", "required": ["n"], "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}}}}

    def arguments_grammars(**level) -> set[str]:
        """The grammars vLLM's structural tag holds a forced call's arguments to (one per call format)."""
        deployment = parse_deployment({"base": "fake/base", "policies": {"chat": {}}, "tool_call_parser": "hermes",
                                       **level})
        forced = {"type": "function", "function": {"name": "note"}}
        calling = admit_parsing("chat", Conversation(MESSAGES, tools=[note], tool_choice=forced),
                                parser_class(deployment, tokenizer), tokenizer, None)
        tags = json.loads(calling.structured_outputs.structural_tag)["format"]["tags"]
        return {json.dumps(tag["content"]["json_schema"]) for tag in tags}

    assert parse_deployment({"base": "fake/base", "policies": {"chat": {}}}).tool_strict_level == "parameter"
    assert arguments_grammars() == {json.dumps(note["function"]["parameters"])}
    assert arguments_grammars(tool_strict_level="auto") == {"true"}  # any JSON value
