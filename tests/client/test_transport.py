"""Retries, timeouts, request shape and parsing, against a scripted local server."""

from __future__ import annotations

import json
import time

import pytest

from steering_client import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APITimeoutError,
    AsyncSteeringClient,
    BadRequestError,
    InternalServerError,
    RateLimitError,
    SteeringClient,
)
from tests.client.stub import Answer
from tests.live_server import free_port

STEERING = {"policy": "chat", "alpha": {"chat": 1.0}, "abstained": None, "confidence": None, "decision": None,
            "abstention": None}
CHAT = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "chat",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    "steering": STEERING,
}
MESSAGES = [{"role": "user", "content": "hello"}]
UNAVAILABLE = Answer(503, {"error": {"message": "the engine is still loading", "type": "service_unavailable",
                                     "param": None, "code": "engine_not_ready"}})


def ask(client: SteeringClient, **options):
    return client.chat.completions.create(model="chat", messages=MESSAGES, **options)


def sse(*events: object, delay: float = 0.0) -> Answer:
    body = "".join(f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n" for event in events)
    return Answer(200, body.encode(), {"content-type": "text/event-stream"}, delay)


def chunk(content: str | None = None, **extra) -> dict:
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "chat", "choices": choices, **extra}


def test_a_request_sends_what_was_given_and_nothing_else(stub, monkeypatch):
    server = stub(Answer(body=CHAT))
    monkeypatch.setenv("STEER_BASE_URL", server.url)
    monkeypatch.setenv("STEER_API_KEY", "from-env")
    with SteeringClient() as client:
        ask(client, steering={"alpha": {"chat": 2.0}}, max_tokens=4, seed=None, extra_body={"top_k": 5})
    (seen,) = server.seen
    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
    assert seen.body == {"model": "chat", "messages": MESSAGES, "max_tokens": 4, "steering": {"alpha": {"chat": 2.0}},
                         "top_k": 5}
    assert seen.headers["Authorization"] == "Bearer from-env"
    assert seen.headers["User-Agent"].startswith("steering-client/")


def test_arguments_win_over_the_environment(stub, monkeypatch):
    server = stub(Answer(body={"object": "list", "data": []}))
    monkeypatch.setenv("STEER_BASE_URL", "http://127.0.0.1:1/v1")
    monkeypatch.setenv("STEER_API_KEY", "from-env")
    with SteeringClient(base_url=server.url + "/", api_key="given") as client:
        assert list(client.models.list()) == []
    assert server.seen[0].path == "/v1/models"
    assert server.seen[0].headers["Authorization"] == "Bearer given"


def test_without_a_key_no_authorization_is_sent(stub, monkeypatch):
    server = stub(Answer(body={"object": "list", "data": []}))
    monkeypatch.delenv("STEER_API_KEY", raising=False)
    with SteeringClient(base_url=server.url) as client:
        client.policies.list()
    assert "Authorization" not in server.seen[0].headers


def test_unavailable_twice_then_answered_takes_three_attempts(stub):
    server = stub(UNAVAILABLE, UNAVAILABLE, Answer(body=CHAT))
    with SteeringClient(base_url=server.url) as client:
        assert ask(client).choices[0].message.content == "hi"
    assert len(server.seen) == 3


def test_retries_can_be_turned_down_per_call_and_per_client(stub):
    server = stub(UNAVAILABLE, UNAVAILABLE, Answer(body=CHAT))
    with SteeringClient(base_url=server.url) as client, pytest.raises(InternalServerError) as failed:
        ask(client, max_retries=0)
    assert len(server.seen) == 1
    assert (failed.value.status_code, failed.value.code) == (503, "engine_not_ready")
    assert failed.value.body == UNAVAILABLE.body
    with SteeringClient(base_url=server.url, max_retries=0) as client, pytest.raises(InternalServerError):
        ask(client)
    with SteeringClient(base_url=server.url, max_retries=0) as client:
        assert ask(client, max_retries=1).steering.policy == "chat"
    assert len(server.seen) == 3


def test_a_rate_limit_waits_as_long_as_retry_after_says(stub):
    limited = Answer(429, {"error": {"message": "slow down", "type": "rate_limit", "param": None, "code": None}},
                     {"Retry-After": "1"})
    server = stub(limited, Answer(body=CHAT))
    started = time.monotonic()
    with SteeringClient(base_url=server.url) as client:
        ask(client)
    assert time.monotonic() - started >= 1.0
    assert len(server.seen) == 2
    server = stub(limited)
    with SteeringClient(base_url=server.url, max_retries=0) as client, pytest.raises(RateLimitError) as failed:
        ask(client)
    assert failed.value.message.endswith("slow down")


def test_a_bad_request_is_not_retried(stub):
    refused = {"error": {"message": "no", "type": "invalid_request_error", "param": "n", "code": None}}
    server = stub(Answer(400, refused))
    with SteeringClient(base_url=server.url) as client, pytest.raises(BadRequestError) as failed:
        ask(client)
    assert len(server.seen) == 1
    assert failed.value.param == "n"


def test_a_closed_port_is_a_connection_error_after_the_retries():
    started = time.monotonic()
    with SteeringClient(base_url=f"http://127.0.0.1:{free_port()}/v1") as client:
        with pytest.raises(APIConnectionError) as failed:
            client.models.list()
    assert not isinstance(failed.value, APITimeoutError)
    assert time.monotonic() - started >= 0.75 * (0.5 + 1.0), "two backoffs: 0.5 s and 1 s, less jitter"


def test_a_slow_answer_times_out(stub):
    server = stub(Answer(body=CHAT, delay=1.0))
    with SteeringClient(base_url=server.url, timeout=0.2, max_retries=1) as client:
        with pytest.raises(APITimeoutError) as failed:
            ask(client)
        assert isinstance(failed.value, APIConnectionError)
        assert len(server.seen) == 2
        assert ask(client, timeout=5, max_retries=0).choices[0].message.content == "hi"


def test_streams_wait_with_their_own_longer_read_timeout(stub):
    server = stub(Answer(body=CHAT, delay=0.5), sse(chunk("hi"), chunk(steering=STEERING), "[DONE]", delay=0.5))
    with SteeringClient(base_url=server.url, timeout=0.2, max_retries=0) as client:
        with pytest.raises(APITimeoutError):
            ask(client)
        stream = ask(client, stream=True)
        assert [c.choices[0].delta.content for c in stream if c.choices] == ["hi"]
    assert stream.steering.policy == "chat"


def test_unknown_response_fields_are_kept(stub):
    server = stub(Answer(body={**CHAT, "system_fingerprint": "fp-1", "steering": {**STEERING, "route": "fast"}}))
    with SteeringClient(base_url=server.url) as client:
        response = ask(client)
    assert response.system_fingerprint == "fp-1"
    assert response.steering.model_extra == {"route": "fast"}
    assert response.model_dump()["steering"]["route"] == "fast"


def test_a_body_that_is_not_the_expected_json_is_a_validation_error(stub):
    server = stub(Answer(body=b"<html>proxy</html>"), Answer(body={"object": "list"}))
    with SteeringClient(base_url=server.url) as client:
        with pytest.raises(APIResponseValidationError) as not_json:
            ask(client)
        assert not_json.value.body == "<html>proxy</html>"
        with pytest.raises(APIResponseValidationError):
            client.models.list()


def test_an_error_in_the_middle_of_a_stream_is_raised(stub):
    failure = {"error": {"message": "engine died", "type": "server_error", "param": None, "code": "internal_error"}}
    server = stub(sse(chunk("hi"), failure, "[DONE]"))
    with SteeringClient(base_url=server.url) as client:
        stream = ask(client, stream=True)
        assert next(stream).choices[0].delta.content == "hi"
        with pytest.raises(APIError) as failed:
            next(stream)
    assert (failed.value.code, failed.value.body) == ("internal_error", failure)
    assert "engine died" in str(failed.value)
    assert stream.response.is_closed


def test_events_split_over_lines_and_comments_are_read(stub):
    event = json.dumps(chunk("hi"))
    body = f": keep-alive\n\nevent: message\ndata: {event[:10]}\ndata:{event[10:]}\n\ndata: [DONE]\n\n".encode()
    server = stub(Answer(200, body, {"content-type": "text/event-stream"}))
    with SteeringClient(base_url=server.url) as client:
        (only,) = list(ask(client, stream=True))
    assert only.model_dump()["choices"][0]["delta"]["content"] == "hi"


@pytest.mark.anyio
async def test_async_retries_and_timeouts(stub):
    server = stub(UNAVAILABLE, Answer(body=CHAT), Answer(body=CHAT, delay=1.0))
    async with AsyncSteeringClient(base_url=server.url) as client:
        response = await client.chat.completions.create(model="chat", messages=MESSAGES)
        assert response.usage.total_tokens == 4
        with pytest.raises(APITimeoutError):
            await client.chat.completions.create(model="chat", messages=MESSAGES, timeout=0.2, max_retries=0)
    assert len(server.seen) == 3


@pytest.mark.anyio
async def test_an_async_stream_raises_the_error_event(stub):
    failure = {"error": {"message": "engine died", "type": "server_error", "param": None, "code": "internal_error"}}
    server = stub(sse(chunk("hi"), failure, "[DONE]"))
    async with AsyncSteeringClient(base_url=server.url) as client:
        stream = await client.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
        with pytest.raises(APIError) as failed:
            [c async for c in stream]
    assert failed.value.code == "internal_error"
    assert stream.response.is_closed

