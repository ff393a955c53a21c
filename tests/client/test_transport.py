"""Retries, timeouts, request shape and parsing, through `http_client=` with an `httpx.MockTransport`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import httpx
import pytest
from steering_client import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APITimeoutError,
    AsyncSteeringClient,
    BadRequestError,
    ChatCompletion,
    InternalServerError,
    NotFoundError,
    PolicyList,
    RateLimitError,
    RawResponse,
    SteeringClient,
)
from steering_client._client import BaseClient

URL = "http://steer.test/v1"
STEERING = {"policy": "chat", "alpha": {"chat": 1.0}, "abstained": None, "confidence": None, "decision": None,
            "abstention": None}
CHAT = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "chat",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    "steering": STEERING,
}
MESSAGES = [{"role": "user", "content": "hello"}]
POLICY = {"id": "chat", "object": "model", "created": 1, "owned_by": "steering", "description": "", "base": "base",
          "experts": {"chat": {"tuned": "chat-tuned", "untuned": "chat-untuned"}}, "alpha": {"chat": 1.0},
          "max_alpha": 4.0}


@dataclass
class Answer:
    status: int = 200
    body: object = None  # JSON-encoded unless bytes
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # how long the server would take: a read timeout shorter than this times out
    stream: httpx.SyncByteStream | None = None  # sent instead of `body`, as it iterates

    def respond(self, request: httpx.Request) -> httpx.Response:
        if request.extensions["timeout"]["read"] < self.delay:
            raise httpx.ReadTimeout("timed out", request=request)
        if self.stream is not None:
            return httpx.Response(self.status, stream=self.stream, headers={"content-type": "text/event-stream"})
        content = self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()
        return httpx.Response(self.status, content=content,
                              headers={"content-type": "application/json", **self.headers})


UNAVAILABLE = Answer(503, {"error": {"message": "the engine is still loading", "type": "service_unavailable",
                                     "param": None, "code": "engine_not_ready"}})
Script = Answer | httpx.TransportError


class Server:
    """A `MockTransport` handler: answers each request with the next scripted answer (the last one
    repeats) and records it. A transport error in the script is raised, as if there were no answer."""

    def __init__(self, *answers: Script):
        self.answers = answers
        self.seen: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        answer = self.answers[min(len(self.seen), len(self.answers)) - 1]
        if isinstance(answer, httpx.TransportError):
            raise type(answer)(str(answer), request=request)
        return answer.respond(request)

    def client(self, **options) -> SteeringClient:
        transport = httpx.MockTransport(self)
        return SteeringClient(**{"base_url": URL, **options}, http_client=httpx.Client(transport=transport))

    def async_client(self, **options) -> AsyncSteeringClient:
        transport = httpx.MockTransport(self)
        return AsyncSteeringClient(**{"base_url": URL, **options}, http_client=httpx.AsyncClient(transport=transport))


def body_of(request: httpx.Request) -> object | None:
    return json.loads(request.content) if request.content else None


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """The waits the SDK decides on before each retry, recorded and not slept."""
    decided: list[float] = []
    retry_delay = BaseClient._retry_delay

    def record(self, *args) -> float:
        decided.append(retry_delay(self, *args))
        return 0.0

    monkeypatch.setattr(BaseClient, "_retry_delay", record)
    return decided


def ask(client: SteeringClient, **options):
    return client.chat.completions.create(model="chat", messages=MESSAGES, **options)


def sse(*events: object, delay: float = 0.0) -> Answer:
    body = "".join(f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n" for event in events)
    return Answer(200, body.encode(), {"content-type": "text/event-stream"}, delay)


def chunk(content: str | None = None, **extra) -> dict:
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "chat", "choices": choices, **extra}


def test_a_given_http_client_sends_every_request_and_is_closed_with_the_client():
    server = Server(Answer(body={"object": "list", "data": []}))
    given = httpx.Client(transport=httpx.MockTransport(server))  # no base_url of its own
    client = SteeringClient(base_url=URL, api_key="key", http_client=given)
    client.models.list()
    (seen,) = server.seen
    assert str(seen.url) == f"{URL}/models"
    assert seen.headers["Authorization"] == "Bearer key"
    client.close()
    assert given.is_closed, "as in the openai package: closing the SDK client closes the given one"


def test_an_http_client_of_the_wrong_kind_is_refused():
    with pytest.raises(TypeError, match="httpx.Client"):
        SteeringClient(http_client=httpx.AsyncClient())


def test_a_request_sends_what_was_given_and_nothing_else(monkeypatch):
    server = Server(Answer(body=CHAT))
    monkeypatch.setenv("STEER_BASE_URL", URL)
    monkeypatch.setenv("STEER_API_KEY", "from-env")
    with server.client(base_url=None) as client:
        ask(client, steering={"alpha": {"chat": 2.0}}, max_tokens=4, seed=None, extra_body={"top_k": 5})
    (seen,) = server.seen
    assert (seen.method, str(seen.url)) == ("POST", f"{URL}/chat/completions")
    assert body_of(seen) == {"model": "chat", "messages": MESSAGES, "max_tokens": 4,
                             "steering": {"alpha": {"chat": 2.0}}, "top_k": 5}
    assert seen.headers["Authorization"] == "Bearer from-env"
    assert seen.headers["User-Agent"].startswith("steering-client/")


def test_arguments_win_over_the_environment(monkeypatch):
    server = Server(Answer(body={"object": "list", "data": []}))
    monkeypatch.setenv("STEER_BASE_URL", "http://127.0.0.1:1/v1")
    monkeypatch.setenv("STEER_API_KEY", "from-env")
    with server.client(base_url=URL + "/", api_key="given") as client:
        assert list(client.models.list()) == []
    assert str(server.seen[0].url) == f"{URL}/models"
    assert server.seen[0].headers["Authorization"] == "Bearer given"


def test_without_a_key_no_authorization_is_sent(monkeypatch):
    server = Server(Answer(body={"object": "list", "data": []}))
    monkeypatch.delenv("STEER_API_KEY", raising=False)
    with server.client() as client:
        client.policies.list()
    assert "Authorization" not in server.seen[0].headers


def test_the_openai_variables_are_the_fallback_for_the_steer_ones(monkeypatch):
    server = Server(Answer(body={"object": "list", "data": []}))
    for name in ("STEER_BASE_URL", "STEER_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", URL)
    monkeypatch.setenv("OPENAI_API_KEY", "openai-key")
    with server.client(base_url=None) as client:
        client.models.list()
    monkeypatch.setenv("STEER_API_KEY", "steer-key")
    with server.client(base_url=None) as client:
        client.models.list()
    assert [(str(seen.url), seen.headers["Authorization"]) for seen in server.seen] == [
        (f"{URL}/models", "Bearer openai-key"), (f"{URL}/models", "Bearer steer-key")]


def test_extra_headers_and_query_go_on_top_of_the_client_defaults():
    server = Server(Answer(body=CHAT), Answer(body={"object": "list", "data": []}))
    with server.client(api_key="key", default_headers={"X-Team": "a", "X-Trace": "0"},
                       default_query={"tenant": "t"}) as client:
        ask(client, extra_headers={"X-Trace": "1"}, extra_query={"debug": 1})
        client.models.list()
    chat, listing = server.seen
    assert dict(chat.url.params) == {"tenant": "t", "debug": "1"}
    assert (chat.headers["X-Team"], chat.headers["X-Trace"], chat.headers["Authorization"]) == ("a", "1", "Bearer key")
    assert (dict(listing.url.params), listing.headers["X-Trace"]) == ({"tenant": "t"}, "0")


def test_a_misspelt_or_misplaced_field_fails_before_anything_is_sent():
    server = Server(Answer(body=CHAT))
    with server.client() as client:
        with pytest.raises(TypeError, match=r"'max_token' \(did you mean 'max_tokens'\?\)"):
            ask(client, max_token=4)
        with pytest.raises(TypeError, match="'top_logprobs'"):  # a chat field, not a completions one
            client.completions.create(model="chat", prompt="x", top_logprobs=2)
    assert server.seen == []


def test_a_policy_is_retrieved_by_its_escaped_name():
    server = Server(Answer(body=POLICY), Answer(404, {"error": {"message": "no such policy", "type": "invalid_request_error",
                                                              "param": "model", "code": "model_not_found"}}))
    with server.client() as client:
        policy = client.models.retrieve("chat")
        with pytest.raises(NotFoundError):
            client.policies.retrieve("a b/c")
        with pytest.raises(ValueError, match="empty"):
            client.models.retrieve("")
    assert (policy.id, policy.pairs, policy.alpha) == ("chat", ["chat"], {"chat": 1.0})
    assert [seen.url.raw_path.decode() for seen in server.seen] == ["/v1/models/chat", "/v1/models/a%20b%2Fc"]


def test_with_raw_response_gives_the_http_response_and_parses_on_demand(waits):
    server = Server(UNAVAILABLE, Answer(body=CHAT, headers={"x-request-id": "req-1"}),
                    Answer(body={"object": "list", "data": [POLICY]}))
    with server.client() as client:
        raw = client.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES)
        listing = client.models.with_raw_response.list()
    assert isinstance(raw, RawResponse)
    assert (raw.status_code, raw.headers["x-request-id"], raw.retries_taken, raw.json()) == (200, "req-1", 1, CHAT)
    answer = raw.parse()
    assert isinstance(answer, ChatCompletion) and answer.choices[0].message.content == "hi"
    assert raw.parse() is answer
    assert isinstance(listing.parse(), PolicyList)


def test_a_raw_stream_parses_to_the_stream():
    server = Server(sse(chunk("a"), chunk("b"), "[DONE]"))
    with server.client() as client:
        raw = client.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES, stream=True)
        assert raw.headers["content-type"] == "text/event-stream"
        assert [c.choices[0].delta.content for c in raw.parse()] == ["a", "b"]


def test_unavailable_twice_then_answered_takes_three_attempts(waits):
    server = Server(UNAVAILABLE, UNAVAILABLE, Answer(body=CHAT))
    with server.client() as client:
        assert ask(client).choices[0].message.content == "hi"
    assert len(server.seen) == 3
    assert len(waits) == 2


def test_retries_can_be_turned_down_per_call_and_per_client(waits):
    server = Server(UNAVAILABLE, UNAVAILABLE, Answer(body=CHAT))
    with server.client() as client, pytest.raises(InternalServerError) as failed:
        ask(client, max_retries=0)
    assert len(server.seen) == 1
    assert (failed.value.status_code, failed.value.code) == (503, "engine_not_ready")
    assert failed.value.body == UNAVAILABLE.body
    with server.client(max_retries=0) as client, pytest.raises(InternalServerError):
        ask(client)
    with server.client(max_retries=0) as client:
        assert ask(client, max_retries=1).steering.policy == "chat"
    assert len(server.seen) == 3


def test_a_rate_limit_waits_as_long_as_retry_after_says(waits):
    limited = Answer(429, {"error": {"message": "slow down", "type": "rate_limit", "param": None, "code": None}},
                     {"Retry-After": "1"})
    server = Server(limited, Answer(body=CHAT))
    with server.client() as client:
        ask(client)
    assert waits == [1.0]
    assert len(server.seen) == 2
    server = Server(limited)
    with server.client(max_retries=0) as client, pytest.raises(RateLimitError) as failed:
        ask(client)
    assert failed.value.message.endswith("slow down")


def test_a_bad_request_is_not_retried():
    refused = {"error": {"message": "no", "type": "invalid_request_error", "param": "n", "code": None}}
    server = Server(Answer(400, refused))
    with server.client() as client, pytest.raises(BadRequestError) as failed:
        ask(client)
    assert len(server.seen) == 1
    assert failed.value.param == "n"


def test_a_refused_connection_is_a_connection_error_after_the_retries(waits):
    server = Server(httpx.ConnectError("connection refused"))
    with server.client() as client, pytest.raises(APIConnectionError) as failed:
        client.models.list()
    assert not isinstance(failed.value, APITimeoutError)
    assert len(server.seen) == 3
    first, second = waits  # two backoffs: 0.5 s and 1 s, less jitter
    assert 0.75 * 0.5 <= first <= 0.5 and 0.75 * 1.0 <= second <= 1.0


def test_a_slow_answer_times_out(waits):
    server = Server(Answer(body=CHAT, delay=1.0))
    with server.client(timeout=0.2, max_retries=1) as client:
        with pytest.raises(APITimeoutError) as failed:
            ask(client)
        assert isinstance(failed.value, APIConnectionError)
        assert len(server.seen) == 2
        assert ask(client, timeout=5, max_retries=0).choices[0].message.content == "hi"


def test_a_timeout_on_connect_is_a_timeout_error():
    server = Server(httpx.ConnectTimeout("no answer"))
    with server.client(max_retries=0) as client, pytest.raises(APITimeoutError) as failed:
        client.models.list()
    assert failed.value.request is server.seen[0]


def test_streams_wait_with_their_own_longer_read_timeout():
    server = Server(Answer(body=CHAT, delay=0.5), sse(chunk("hi"), chunk(steering=STEERING), "[DONE]", delay=0.5))
    with server.client(timeout=0.2, max_retries=0) as client:
        with pytest.raises(APITimeoutError):
            ask(client)
        stream = ask(client, stream=True)
        assert [c.choices[0].delta.content for c in stream if c.choices] == ["hi"]
    assert stream.steering.policy == "chat"


def test_unknown_response_fields_are_kept():
    server = Server(Answer(body={**CHAT, "system_fingerprint": "fp-1", "steering": {**STEERING, "route": "fast"}}))
    with server.client() as client:
        response = ask(client)
    assert response.system_fingerprint == "fp-1"
    assert response.steering.model_extra == {"route": "fast"}
    assert response.model_dump()["steering"]["route"] == "fast"


def test_a_body_that_is_not_the_expected_json_is_a_validation_error():
    server = Server(Answer(body=b"<html>proxy</html>"), Answer(body={"object": "list"}))
    with server.client() as client:
        with pytest.raises(APIResponseValidationError) as not_json:
            ask(client)
        assert not_json.value.body == "<html>proxy</html>"
        with pytest.raises(APIResponseValidationError):
            client.models.list()


def test_an_error_in_the_middle_of_a_stream_is_raised():
    failure = {"error": {"message": "engine died", "type": "server_error", "param": None, "code": "internal_error"}}
    server = Server(sse(chunk("hi"), failure, "[DONE]"))
    with server.client() as client:
        stream = ask(client, stream=True)
        assert next(stream).choices[0].delta.content == "hi"
        with pytest.raises(APIError) as failed:
            next(stream)
    assert (failed.value.code, failed.value.body) == ("internal_error", failure)
    assert "engine died" in str(failed.value)
    assert stream.response.is_closed


class Events(httpx.SyncByteStream):
    """A response body sent one event at a time, which records whether the client closed it."""

    def __init__(self, *events: dict):
        self.events = events
        self.is_closed = False

    def __iter__(self):
        for event in self.events:
            yield f"data: {json.dumps(event)}\n\n".encode()

    def close(self) -> None:
        self.is_closed = True


def test_closing_a_stream_early_closes_the_connection():
    events = Events(chunk("a"), chunk("b"), chunk("c"))
    with Server(Answer(stream=events)).client() as client:
        with ask(client, stream=True) as stream:
            assert next(stream).choices[0].delta.content == "a"
        assert events.is_closed and stream.response.is_closed
        with pytest.raises(StopIteration):
            next(stream)


def test_events_split_over_lines_and_comments_are_read():
    event = json.dumps(chunk("hi"))
    body = f": keep-alive\n\nevent: message\ndata: {event[:10]}\ndata:{event[10:]}\n\ndata: [DONE]\n\n".encode()
    server = Server(Answer(200, body, {"content-type": "text/event-stream"}))
    with server.client() as client:
        (only,) = list(ask(client, stream=True))
    assert only.model_dump()["choices"][0]["delta"]["content"] == "hi"


@pytest.mark.anyio
async def test_a_given_async_http_client_sends_every_request_and_is_closed_with_the_client():
    server = Server(Answer(body={"object": "list", "data": []}))
    given = httpx.AsyncClient(transport=httpx.MockTransport(server))
    client = AsyncSteeringClient(base_url=URL, api_key="key", http_client=given)
    await client.models.list()
    (seen,) = server.seen
    assert str(seen.url) == f"{URL}/models"
    assert seen.headers["Authorization"] == "Bearer key"
    await client.aclose()
    assert given.is_closed


@pytest.mark.anyio
async def test_async_retries_and_timeouts(waits):
    server = Server(UNAVAILABLE, Answer(body=CHAT), Answer(body=CHAT, delay=1.0))
    async with server.async_client() as client:
        response = await client.chat.completions.create(model="chat", messages=MESSAGES)
        assert response.usage.total_tokens == 4
        with pytest.raises(APITimeoutError):
            await client.chat.completions.create(model="chat", messages=MESSAGES, timeout=0.2, max_retries=0)
    assert len(server.seen) == 3
    assert len(waits) == 1


@pytest.mark.anyio
async def test_async_retrieve_and_raw_responses():
    server = Server(Answer(body=POLICY, headers={"x-request-id": "req-2"}))
    async with server.async_client(default_headers={"X-Team": "a"}) as client:
        raw = await client.models.with_raw_response.retrieve("chat", extra_query={"debug": 1})
        assert (await client.policies.retrieve("chat")).id == "chat"
    assert (raw.headers["x-request-id"], raw.parse().id) == ("req-2", "chat")
    assert str(server.seen[0].url) == f"{URL}/models/chat?debug=1"
    assert server.seen[0].headers["X-Team"] == "a"


@pytest.mark.anyio
async def test_an_async_stream_raises_the_error_event():
    failure = {"error": {"message": "engine died", "type": "server_error", "param": None, "code": "internal_error"}}
    server = Server(sse(chunk("hi"), failure, "[DONE]"))
    async with server.async_client() as client:
        stream = await client.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
        with pytest.raises(APIError) as failed:
            [c async for c in stream]
    assert failed.value.code == "internal_error"
    assert stream.response.is_closed
