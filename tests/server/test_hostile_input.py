"""Input that crashed, leaked or was silently coerced, each pinned at its root (in-process, `FakeEngine`).

The end-to-end half (a seed the engine cannot carry leaves nothing unfinished in vLLM) is in
`tests/engine/test_proxy_tuning.py`.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from steering_server.app import create_app
from steering_server.completions.protocol import CompletionRequest
from steering_server.protocol import INT64_MAX, INT64_MIN
from steering_server.settings import ServerSettings

from steering.config import parse_deployment
from tests.server.fake_engine import ANSWER_LEN, FakeEngine
from tests.server.test_protocol import (
    API_KEY,
    INVALID,
    MESSAGES,
    POLICIES,
    assert_error,
    chat,
    metric,
)
from tests.server.test_protocol import EXPERTS as FAKE_EXPERTS


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(parse_deployment({"base": "fake/base", "experts": FAKE_EXPERTS, "policies": POLICIES}))


def make_client(engine, **settings) -> TestClient:
    app = create_app(ServerSettings(config=Path("unused"), api_key=API_KEY, **settings), engine=engine)
    return TestClient(app, headers={"Authorization": f"Bearer {API_KEY}"})


@pytest.fixture
def client(engine) -> TestClient:
    return make_client(engine)


def post_raw(client: TestClient, path: str, text: str, **headers: str):
    return client.post(path, content=text.encode(), headers={"content-type": "application/json", **headers})


@pytest.mark.parametrize(("body", "param", "says"), [
    # Wrong JSON types are refused, never coerced (pydantic's lax mode turned these into numbers).
    ({"steering": {"alpha": {"chat": True}}}, "steering.alpha.chat", "valid number"),
    ({"steering": {"alpha": {"chat": "2"}}}, "steering.alpha.chat", "valid number"),
    ({"max_tokens": "8"}, "max_tokens", "valid integer"),
    ({"max_tokens": 8.0}, "max_tokens", "valid integer"),
    ({"temperature": "1"}, "temperature", "valid number"),
    ({"stream": "yes"}, "stream", "valid boolean"),
    ({"model": "triage", "steering": {"costs": [["0", "1"], ["1", "0"]]}}, "steering.costs[0][0]", "valid number"),
    ({"model": {}}, "model", "valid string"),
    ({"model": ["chat"]}, "model", "valid string"),
    # A seed the engine cannot carry (vLLM's bounds: int64).
    ({"seed": 2**64}, "seed", "less than or equal to"),
    ({"seed": INT64_MIN - 1}, "seed", "greater than or equal to"),
    # Fields that only mean something beside another.
    ({"top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream: true"),
    # The param names the field the way a client wrote it, not pydantic's union members.
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "valid"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, "messages[0].content[0].text", "valid"),
    ({"stop": {"a": 1}}, "stop", "valid"),
    ({"stop": ["a", 1]}, "stop[1]", "valid string"),
])
def test_wrong_types_are_400_naming_the_field(client, body, param, says):
    fields = {"model": "chat", **body}
    code = "invalid_request" if param in {"top_logprobs", "stream_options"} else "invalid_value"
    response = client.post("/v1/chat/completions", json={"messages": MESSAGES, **fields})
    assert_error(response, 400, type=INVALID, param=param, code=code, says=says)


def test_a_token_list_names_the_item_that_is_not_a_token(client):
    response = client.post("/v1/completions", json={"model": "chat", "prompt": [1, "a"]})
    assert_error(response, 400, type=INVALID, param="prompt[1]", code="invalid_value", says="valid integer")


def test_the_seed_bounds_are_vllms(client):
    for seed in (INT64_MIN, INT64_MAX):
        assert chat(client, "chat", seed=seed).status_code == 200


@pytest.mark.parametrize(("path", "field", "param"), [
    ("/v1/completions", '"prompt": "a\\ud800b"', "prompt"),
    ("/v1/completions", '"prompt": ["ok", "\\udfff"]', "prompt[1]"),
    ("/v1/chat/completions", '"messages": [{"role": "user", "content": "\\ud800"}]', "messages[0].content"),
    ("/v1/completions", '"prompt": "x", "stop": ["\\ud800"]', "stop[0]"),
    ("/v1/completions", '"prompt": "x", "steering": {"alpha": {"\\ud800": 1}}', "steering.alpha.\ud800"),
])
def test_a_lone_surrogate_is_400_not_500(client, path, field, param):
    response = post_raw(client, path, f'{{"model": "chat", {field}}}')
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "lone surrogate" in error["message"]
    if "\ud800" not in param:  # a key that is itself the surrogate cannot come back as valid JSON text
        assert error["param"] == param


def test_a_model_that_is_no_string_is_counted_under_unknown(client):
    assert client.post("/v1/completions", json={"model": {}, "prompt": "x"}).status_code == 400
    text = client.get("/metrics").text
    assert metric(text, "steer_requests_total", policy="<unknown>", endpoint="completions", status="400") == 1


@pytest.mark.parametrize("authorization", [None, "Bearer wrong"])
@pytest.mark.parametrize("body", ["{not json", '{"model": {}}', "[]", ""])
def test_the_api_key_is_checked_before_the_body_is_read(engine, authorization, body):
    headers = {"Authorization": authorization} if authorization else {}
    anonymous = TestClient(create_app(ServerSettings(api_key=API_KEY), engine=engine), headers=headers)
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/nowhere"):
        assert_error(post_raw(anonymous, path, body), 401, type="authentication_error", param=None,
                     code="invalid_api_key", says="a valid API key is required")


def test_malformed_json_says_so(client):
    response = post_raw(client, "/v1/completions", '{"model": "chat", "prompt": ')
    assert_error(response, 400, type=INVALID, param=None, code="invalid_value", says="not valid JSON")


def test_a_body_over_the_limit_is_413_whether_declared_or_streamed(engine):
    limit = 2000
    client = make_client(engine, max_body_bytes=limit)
    # The fake's context is short: the bulk goes in a field that is not tokenized.
    small = json.dumps({"model": "chat", "prompt": "hi", "max_tokens": 1, "user": "u" * (limit - 100)})
    assert client.post("/v1/completions", content=small, headers={"content-type": "application/json"}).status_code == 200
    large = json.dumps({"model": "chat", "prompt": "x" * limit})
    declared = client.post("/v1/completions", content=large, headers={"content-type": "application/json"})
    assert_error(declared, 413, type=INVALID, param=None, code="request_too_large", says=f"over {limit} bytes")

    def chunks():  # no Content-Length: the body arrives chunked, and is counted as it comes
        for start in range(0, len(large), 500):
            yield large[start : start + 500].encode()

    streamed = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in streamed.request.headers
    assert_error(streamed, 413, type=INVALID, param=None, code="request_too_large", says="--max-body-bytes")
    text = client.get("/metrics").text
    assert metric(text, "steer_requests_total", policy="<unknown>", endpoint="completions", status="413") == 2


def test_prompts_are_tokenized_off_the_event_loop(client, engine):
    threads = []
    encode = engine.prompts.encode

    def recording(text: str, **options) -> list[int]:
        threads.append(threading.current_thread().name)
        return encode(text, **options)

    engine.prompts.encode = recording
    assert client.post("/v1/completions", json={"model": "chat", "prompt": "hi", "max_tokens": 2}).status_code == 200
    assert threads and all(name.startswith("steer-admission") for name in threads)


class FailingEngine(FakeEngine):
    """Fails after `after` streamed tokens, the way an engine error reaches a running stream."""

    after = 2

    async def generate(self, prompt, params, *, alpha_row, request_id=None, **options):
        count = 0
        async for output in super().generate(prompt, params, alpha_row=alpha_row, request_id=request_id, **options):
            if count == self.after:
                raise RuntimeError("the engine died")
            count += 1
            yield output


def test_an_error_mid_stream_is_counted_as_the_error_it_sends(engine):
    failing = FailingEngine(engine.deployment)
    client = make_client(failing)
    response = chat(client, "chat", stream=True)
    assert response.status_code == 200  # sent with the first event, before the failure
    events = [block.removeprefix("data: ") for block in response.text.split("\n\n") if block]
    assert json.loads(events[-2])["error"]["type"] == "server_error" and events[-1] == "[DONE]"
    text = client.get("/metrics").text
    assert metric(text, "steer_requests_total", policy="chat", endpoint="chat", status="500") == 1
    assert metric(text, "steer_requests_total", policy="chat", endpoint="chat", status="200") == 0
    assert metric(text, "steer_errors_total", policy="chat", type="internal_error") == 1
    assert metric(text, "steer_generation_tokens_total", policy="chat") == FailingEngine.after


def test_tokens_of_an_abandoned_stream_are_counted(engine):
    app = create_app(ServerSettings(), engine=engine)
    service = app.state.server.completions
    request = CompletionRequest(model="chat", prompt="hi", stream=True)
    plan = service.plan(request)

    async def read_two_then_leave() -> None:
        chunks = service.chunks(request, plan)
        for _ in range(2):
            await anext(chunks)
        await chunks.aclose()  # what the server does when the client goes away

    asyncio.run(read_two_then_leave())
    text = TestClient(app).get("/metrics").text
    assert metric(text, "steer_generation_tokens_total", policy="chat") == 2 < ANSWER_LEN
    assert metric(text, "steer_prompt_tokens_total", policy="chat") == len("hi") + 1
    assert engine.num_unfinished_requests == 0


def test_no_filesystem_path_is_shown(tmp_path):
    experts = {"chat": {"tuned": str(tmp_path / "ckpt" / "chat-tuned"), "untuned": "org/chat-untuned"}}
    deployment = parse_deployment({"base": str(tmp_path / "ckpt" / "base-7b"), "experts": experts,
                                   "policies": {"chat": {"alpha": {"chat": 1.0}}}})
    client = make_client(FakeEngine(deployment))
    (card,) = client.get("/v1/models").json()["data"]
    assert card["base"] == "base-7b"
    assert card["experts"] == {"chat": {"tuned": "chat-tuned", "untuned": "org/chat-untuned"}}
    assert str(tmp_path) not in client.get("/metrics").text + client.get("/v1/models").text

