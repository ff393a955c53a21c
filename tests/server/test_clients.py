"""The API through the clients people put in front of it, LangChain and LiteLLM, on the live server."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")  # else LiteLLM fetches its model cost map on import

import litellm  # noqa: E402
from langchain_openai import ChatOpenAI  # noqa: E402

from tests.live_server import API_KEY  # noqa: E402
from tests.server.test_api import MESSAGES  # noqa: E402

QUESTION = MESSAGES[0]["content"]


# Tools as LangChain users write them: pydantic models, sent with no `strict`. Lower-case names,
# as the fixture tokenizer spells no capitals.
class Weather(BaseModel):
    """The weather in a city."""

    model_config = ConfigDict(title="weather")
    city: Literal["paris", "rome"]


class Note(BaseModel):
    """A digit to note."""

    model_config = ConfigDict(title="note")
    n: int = Field(ge=0, le=9)


class Answer(BaseModel):
    """A yes or no, and a count."""

    model_config = ConfigDict(title="answer")
    yes: bool
    count: int = Field(ge=0, le=9)


def chat_model(server) -> ChatOpenAI:
    """LangChain's OpenAI chat model on the steered `chat` policy (a call takes ~60 fixture tokens)."""
    return ChatOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, model="chat", temperature=0, max_tokens=128,
                      max_retries=0)


def test_langchain_bind_tools_gets_a_call_held_to_the_tools_schema(server):
    """The default tool_strict_level holds a call's arguments to its schema though LangChain sends no strict."""
    message = chat_model(server).bind_tools([Weather, Note], tool_choice="note").invoke(QUESTION)
    (call,) = message.tool_calls
    assert (call["name"], message.invalid_tool_calls) == ("note", [])
    assert set(call["args"]) == {"n"} and Note.model_validate(call["args"]).n in range(10)
    assert message.response_metadata["finish_reason"] == "stop"  # OpenAI's, under a named function


def test_langchain_structured_output_by_function_calling_parses(server):
    answer = chat_model(server).with_structured_output(Answer, method="function_calling").invoke(QUESTION)
    assert isinstance(answer, Answer)  # None had the answer no call; a ValidationError, arguments off the schema


def test_litellm_streams_the_answer_and_hands_on_its_steering_block(server):
    """LiteLLM drops the stream's last chunk, which has no choices; the steering block reaches its
    user as an extra field (`chunk.steering`) of the chunk that finished the answer, or, where that
    chunk had text too, of that text's chunk: LiteLLM moves the finish reason to a chunk of its own."""
    ask = {"model": "openai/chat", "api_base": f"{server.url}/v1", "api_key": API_KEY, "messages": MESSAGES,
           "temperature": 0.0, "max_tokens": 8, "extra_body": {"steering": {"alpha": {"chat": 2.0}}}}
    whole = litellm.completion(**ask)
    assert whole.steering["policy"] == "chat" and whole.steering["alpha"] == {"chat": 2.0}
    chunks = list(litellm.completion(**ask, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert [c.steering for c in chunks if (c.model_extra or {}).get("steering")] == [whole.steering]
