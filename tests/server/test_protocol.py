"""The HTTP protocol, errors and metrics, in-process over `FakeEngine`: no vLLM, milliseconds a test.

Every behaviour here is also covered end to end against the real engine (`test_api.py`,
`test_decisions.py`); these pin the envelope, statuses and numbers exactly, against hand
computations from the fake model's documented rules (`tests/server/fake_engine.py`).
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from steering_client._params import ChatFields, CompletionFields
from steering_server.app import create_app
from steering_server.chat.protocol import ChatCompletionRequest
from steering_server.completions.protocol import CompletionRequest
from steering_server.settings import ServerSettings
from vllm import SamplingParams

from steering.config import parse_deployment
from tests.server.fake_engine import (
    ANSWER_LEN,
    BOS,
    PROMPT_PROB,
    CharTokenizer,
    FakeEngine,
    answer,
    label_prob,
    token_prob,
)

API_KEY = "k"
MAX_MODEL_LEN = 64
EXPERTS = {
    "chat": {"tuned": "fake/chat-tuned", "untuned": "fake/chat-untuned"},
    "code": {"tuned": "fake/code-tuned", "untuned": "fake/code-untuned"},
}
DECISION = {"labels": ["yes", "no"], "cost_fp": 3.0, "cost_fn": 1.0, "abstain_cost": 0.5, "max_cost": 10.0}
CALIBRATION_T = 2.0
POLICIES = {
    "base": {"description": "the frozen base"},
    "chat": {"description": "the chat pair", "alpha": {"chat": 1.0}, "max_alpha": 2.0},
    "mix": {"alpha": {"chat": 0.5, "code": -0.5}},
    "triage": {"decision": DECISION},
    "triage-calibrated": {
        "decision": DECISION,
        "calibration": {"kind": "decision", "policy": "triage-calibrated", "temperature": CALIBRATION_T,
                        "labels": ["yes", "no"]},
    },
    "triage-chat": {"alpha": {"chat": 1.0}, "decision": DECISION},
    "qa": {"alpha": {"chat": 1.0}, "abstain": {"threshold": 0.2, "threshold_bounds": [0.1, 0.9], "message": "Pass."}},
}
MESSAGES = [{"role": "user", "content": "hi"}]
CHAT_PROMPT = [BOS, *map(ord, "user: hi\nassistant: ")]  # the fake's template: "role: content\n" per message
ROOM = MAX_MODEL_LEN - len(CHAT_PROMPT)


@pytest.fixture
def engine() -> FakeEngine:
    deployment = parse_deployment({"base": "fake/base", "experts": EXPERTS, "policies": POLICIES})
    return FakeEngine(deployment, max_model_len=MAX_MODEL_LEN)


@pytest.fixture
def app(engine):
    return create_app(ServerSettings(config=Path("unused"), api_key=API_KEY), engine=engine)


@pytest.fixture
def client(app) -> TestClient:
    return TestClient(app, headers={"Authorization": f"Bearer {API_KEY}"})


def chat(client: TestClient, model: str, **fields) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": model, "messages": MESSAGES, **fields})


def assert_error(response: httpx.Response, status: int, *, type: str, param: str | None, code: str,
                 says: str) -> None:
    """The OpenAI error envelope, field by field; `says` is part of the message."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(response.json()) == {"error"}
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type
    assert error["param"] == param
    assert error["code"] == code
    assert says in error["message"]


def sse_events(response: httpx.Response) -> list[str]:
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = [block for block in response.text.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in blocks)
    return [block.removeprefix("data: ") for block in blocks]


def metric(text: str, name: str, **labels: str) -> float:
    """A Prometheus sample's value, 0 when the series does not exist."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


INVALID = "invalid_request_error"
TOOL = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(("model", "body", "param", "code", "says"), [
    ("chat", {"bogus": 1}, "bogus", "invalid_value", "bogus: Extra inputs are not permitted"),
    ("chat", {"steering": {"alpha": {"chat": 1.0}, "bogus": 1}}, "steering.bogus", "invalid_value", "Extra inputs"),
    ("chat", {"steering": {"alpha": {"chat": 2.5}}}, "steering.alpha.chat", "invalid_steering", "beyond this policy's max_alpha 2.0"),
    ("chat", {"steering": {"alpha": {"chat": -2.5}}}, "steering.alpha.chat", "invalid_steering", "max_alpha"),
    ("chat", {"steering": {"alpha": {"nope": 1.0}}}, "steering.alpha.nope", "invalid_steering", "unknown expert"),
    ("mix", {"steering": {"alpha": {"chat": 0.1}}}, "steering.alpha.chat", "invalid_steering", "does not allow alpha overrides"),
    ("chat", {"n": 2, "temperature": 0.0}, "n", "invalid_request", "greedy"),
    ("chat", {"max_tokens": ROOM + 1}, "max_tokens", "invalid_request", f"exceed the context of {MAX_MODEL_LEN}"),
    ("chat", {"max_completion_tokens": ROOM + 1}, "max_completion_tokens", "invalid_request", "exceed the context"),
    ("triage", {"logprobs": True}, "logprobs", "invalid_request", "decision policies answer with a label"),
    ("triage", {"n": 2}, "n", "invalid_request", "one prompt with one choice"),
    ("chat", {"steering": {"abstain_threshold": 0.5}}, "steering.abstain_threshold", "invalid_steering",
     "does not abstain"),
    ("qa", {"steering": {"abstain_threshold": 0.95}}, "steering.abstain_threshold", "invalid_steering",
     "outside this policy's bounds [0.1, 0.9]"),
    ("chat", {"steering": {"costs": [[0, 1], [1, 0]]}}, "steering.costs", "invalid_steering", "makes no decisions"),
    ("triage", {"steering": {"costs": [[0, 11], [1, 0]]}}, "steering.costs", "invalid_steering", "[0, 10.0]"),
    ("triage", {"steering": {"costs": [[0, 1]]}}, "steering.costs", "invalid_steering", "2 x 2 matrix"),
    ("chat", {"temperature": 2.5}, "temperature", "invalid_value", "less than or equal to 2"),
    ("chat", {"tools": [TOOL]}, "tools", "invalid_request", "names no tool_call_parser"),
    ("chat", {"tool_choice": "auto"}, "tool_choice", "invalid_request", "needs tools"),
    ("chat", {"tools": [{**TOOL, "function": {"name": "a b"}}]}, "tools[0].function.name", "invalid_value", "pattern"),
    ("chat", {"messages": [{"role": "tool", "content": "4"}]}, "messages[0]", "invalid_value", "tool_call_id"),
    ("chat", {"messages": [{"role": "user", "content": None}]}, "messages[0]", "invalid_value", "content is required"),
])
def test_chat_refusals_are_400_naming_the_param(client, model, body, param, code, says):
    assert_error(chat(client, model, **body), 400, type=INVALID, param=param, code=code, says=says)


TOO_LONG = "x" * MAX_MODEL_LEN  # BOS + 64 characters: 65 tokens


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"prompt": TOO_LONG, "max_tokens": 1}, "prompt", f"the prompt has {MAX_MODEL_LEN + 1} tokens"),
    # No max_tokens: the default (the rest of the context) must not hide the prompt's own error.
    ({"prompt": TOO_LONG}, "prompt", f"the prompt has {MAX_MODEL_LEN + 1} tokens"),
    ({"prompt": "x" * (MAX_MODEL_LEN - 1)}, "prompt", f"the prompt has {MAX_MODEL_LEN} tokens"),
    ({"prompt": "hi", "max_tokens": MAX_MODEL_LEN - 2}, "max_tokens", "exceed the context"),
    ({"prompt": ["a", "b"], "model": "triage"}, "prompt", "one prompt with one choice"),
    ({"prompt": "hi", "model": "triage", "logprobs": 0}, "logprobs", "decision policies"),
    ({"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias", "token ids"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens", "needs echo: true"),
    ({"prompt": "hi", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs", "not available with stream"),
    ({"prompt": "hi", "model": "triage", "echo": True}, "echo", "served by plain policies"),
    ({"prompt": "hi", "model": "qa", "prompt_logprobs": 0}, "prompt_logprobs", "served by plain policies"),
    # vLLM's own refusals, named: by vLLM, by the sampling parameter its message starts with, or here
    ({"prompt": [1, 0xD800]}, "prompt", f"Token id {0xD800} is out of vocabulary"),
    ({"prompt": "hi", "max_tokens": 2, "min_tokens": 5}, "min_tokens", "min_tokens must be less than or equal"),
])
def test_completion_refusals_are_400_naming_the_param(client, body, param, says):
    response = client.post("/v1/completions", json={"model": "chat", **body})
    assert_error(response, 400, type=INVALID, param=param, code="invalid_request", says=says)


def test_unknown_policy_is_404_on_model(client):
    for response in (chat(client, "nope"), client.post("/v1/completions", json={"model": "nope", "prompt": "hi"})):
        assert_error(response, 404, type=INVALID, param="model", code="model_not_found", says="'nope' does not exist")


@pytest.mark.parametrize("content", [
    b'{"model": "chat", "prompt": "\xff\xfe"}',  # not UTF-8
    b'{"model": "chat", "prompt": "hi", "user": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # nested past json's limit
])
def test_a_body_that_cannot_be_read_as_json_is_400_saying_so(client, content):
    response = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert_error(response, 400, type=INVALID, param=None, code="invalid_value", says="could not be read as JSON")


@pytest.mark.parametrize(("raw", "param"), [
    ('"temperature": NaN', "temperature"),
    ('"top_p": Infinity', "top_p"),
    ('"steering": {"alpha": {"chat": NaN}}', "steering.alpha.chat"),
    ('"steering": {"alpha": {"chat": -Infinity}}', "steering.alpha.chat"),
])
def test_non_finite_numbers_are_400(client, raw, param):
    text = f'{{"model": "chat", "messages": {json.dumps(MESSAGES)}, {raw}}}'
    response = client.post("/v1/chat/completions", content=text, headers={"content-type": "application/json"})
    assert_error(response, 400, type=INVALID, param=param, code="invalid_value", says="finite number")


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {API_KEY}", API_KEY])
def test_missing_or_wrong_api_key_is_401(app, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    anonymous = TestClient(app, headers=headers)
    for response in (anonymous.get("/v1/models"), anonymous.post("/v1/chat/completions", json={})):
        assert_error(response, 401, type="authentication_error", param=None, code="invalid_api_key",
                     says="a valid API key is required")
        assert response.headers["www-authenticate"] == "Bearer"


def test_chat_without_a_chat_template_is_400(client, engine):
    engine.prompts.tokenizer.chat_template = None
    assert_error(chat(client, "chat"), 400, type=INVALID, param="messages", code="invalid_request",
                 says="no chat template")


def test_health_is_ready_at_once_and_the_engine_is_not_shut_down_by_the_app(app, engine):
    with TestClient(app) as anonymous:
        response = anonymous.get("/health")
    assert (response.status_code, response.json()) == (200, {"status": "ready"})
    assert not engine.llm.is_shut_down


def test_a_dead_engine_is_unhealthy_and_refuses_requests_with_503(client, engine):
    engine.llm.errored = True
    response = client.get("/health")
    assert (response.status_code, response.json()) == (503, {"status": "failed"})
    assert_error(client.post("/v1/completions", json={"model": "chat", "prompt": "hi"}), 503,
                 type="service_unavailable", param=None, code="engine_not_ready", says="the engine died")


def test_models_lists_every_policy(client):
    cards = client.get("/v1/models").json()["data"]
    assert [card["id"] for card in cards] == list(POLICIES)
    for card in cards:
        policy = POLICIES[card["id"]]
        assert card["object"] == "model"
        assert card["base"] == "fake/base"
        assert card["description"] == policy.get("description", "")
        assert card["alpha"] == policy.get("alpha", {})
        assert card["experts"] == {pair: EXPERTS[pair] for pair in policy.get("alpha", {})}
        assert card["max_alpha"] == policy.get("max_alpha")


def test_a_policy_is_retrieved_by_name_as_it_is_listed(client, app):
    listed = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    for name in POLICIES:
        response = client.get(f"/v1/models/{name}")
        assert (response.status_code, response.json()) == (200, listed[name])
    assert_error(client.get("/v1/models/nope"), 404, type=INVALID, param="model", code="model_not_found",
                 says="'nope' does not exist")
    assert TestClient(app).get("/v1/models/chat").status_code == 401
    # The `openai` package's own call, through the in-process client.
    retrieved = openai.OpenAI(base_url="http://testserver/v1", api_key=API_KEY, http_client=client).models.retrieve("mix")
    assert (retrieved.id, retrieved.model_extra["alpha"]) == ("mix", POLICIES["mix"]["alpha"])


def test_the_schema_says_what_the_server_sends(client):
    """Streams as text/event-stream, metrics as text/plain, invalid input as our 400 (never
    FastAPI's 422), and the API key as a bearer token on /v1 only. `test_fuzz.py` checks answers against it."""
    spec = client.get("/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = spec["paths"][path]["post"]["responses"]
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
        assert "422" not in responses
        assert responses["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert set(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert spec["components"]["securitySchemes"] == {"apiKey": {"type": "http", "scheme": "bearer"}}
    secured = {path for path, operations in spec["paths"].items() for op in operations.values() if "security" in op}
    assert secured == {path for path in spec["paths"] if path.startswith("/v1/")} | {"/tokenize", "/detokenize"}


def test_tokenize_counts_a_prompt_as_generation_does(client):
    text = "hi there"
    counted = client.post("/tokenize", json={"model": "chat", "prompt": text, "return_token_strs": True}).json()
    assert counted == {"count": 1 + len(text), "max_model_len": MAX_MODEL_LEN, "tokens": [BOS, *map(ord, text)],
                       "token_strs": ["<s>", *text]}
    answered = client.post("/v1/completions", json={"model": "chat", "prompt": text}).json()
    assert answered["usage"]["prompt_tokens"] == counted["count"]
    bare = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert (bare["tokens"], bare["token_strs"]) == (list(map(ord, text)), None)


def test_tokenize_renders_a_chat_as_generation_does(client):
    counted = client.post("/tokenize", json={"model": "mix", "messages": MESSAGES}).json()
    assert counted["tokens"] == CHAT_PROMPT
    assert chat(client, "mix").json()["usage"]["prompt_tokens"] == counted["count"]
    open_ended = client.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert open_ended["tokens"] == [BOS, *map(ord, "user: hi\n")]


def test_detokenize_inverts_tokenize_and_refuses_ids_outside_the_vocabulary(client):
    tokens = client.post("/tokenize", json={"prompt": "héllo"}).json()["tokens"]
    assert client.post("/detokenize", json={"model": "chat", "tokens": tokens}).json() == {"prompt": "héllo"}
    assert_error(client.post("/detokenize", json={"tokens": [104, 0xD800]}), 400, type=INVALID, param="tokens[1]",
                 code="invalid_request", says="not in the base's vocabulary of 55296 tokens")
    assert_error(client.post("/detokenize", json={"tokens": [104, -1]}), 400, type=INVALID, param="tokens[1]",
                 code="invalid_value", says="greater than or equal to 0")


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/detokenize", {"model": "nope", "tokens": [104]}, 404, "model"),
    ("/tokenize", {"prompt": "x", "chat_template": "{{ x }}"}, 400, "chat_template"),  # vLLM's, not ours
    ("/tokenize", {"prompt": 3}, 400, "prompt"),
    ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("/tokenize", {"prompt": "x", "add_special_tokens": "yes"}, 400, "add_special_tokens"),
    ("/detokenize", {"tokens": ["104"]}, 400, "tokens[0]"),
])
def test_tokenization_refuses_what_generation_refuses(client, path, body, status, param):
    response = client.post(path, json=body)
    assert (response.status_code, response.json()["error"]["param"]) == (status, param), response.text
    assert TestClient(client.app).post(path, json=body).status_code == 401


def test_the_sdk_types_every_standard_field_the_server_takes():
    """`create(**fields)` refuses a keyword the SDK does not type; it must type every one we serve."""
    named = {"model", "steering", "stream"}  # create()'s own arguments
    assert set(ChatFields.__optional_keys__) == set(ChatCompletionRequest.model_fields) - named - {"messages"}
    assert set(CompletionFields.__optional_keys__) == set(CompletionRequest.model_fields) - named - {"prompt"}


@pytest.mark.parametrize(("model", "overrides", "alpha"), [
    ("base", None, {}),
    ("chat", None, {"chat": 1.0}),
    ("mix", None, {"chat": 0.5, "code": -0.5}),
    ("chat", {"alpha": {"chat": 1.5}}, {"chat": 1.5}),
    ("chat", {"alpha": {"chat": -2.0, "code": 0.5}}, {"chat": -2.0, "code": 0.5}),  # at the bound: allowed
])
def test_chat_answers_with_the_applied_steering_and_usage(client, model, overrides, alpha):
    response = chat(client, model, steering=overrides) if overrides else chat(client, model)
    assert response.status_code == 200, response.text
    body = response.json()
    row = (alpha.get("chat", 0.0), alpha.get("code", 0.0))
    assert body["object"] == "chat.completion" and body["model"] == model
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": answer(CHAT_PROMPT, row)},
                                "logprobs": None, "finish_reason": "stop", "stop_reason": None}]
    assert body["usage"] == {"prompt_tokens": len(CHAT_PROMPT), "completion_tokens": ANSWER_LEN,
                             "total_tokens": len(CHAT_PROMPT) + ANSWER_LEN}
    assert body["steering"] == {"policy": model, "alpha": alpha, "abstained": None, "confidence": None,
                                "decision": None, "abstention": None}


def test_steering_changes_the_answer(client):
    texts = {model: chat(client, model).json()["choices"][0]["message"]["content"] for model in ("base", "chat", "mix")}
    assert len(set(texts.values())) == 3


def test_max_tokens_cuts_the_answer_and_fills_the_context_exactly(client):
    cut = chat(client, "chat", max_tokens=2).json()
    assert cut["choices"][0]["message"]["content"] == answer(CHAT_PROMPT, (1.0, 0.0))[:2]
    assert cut["choices"][0]["finish_reason"] == "length"
    assert cut["usage"]["completion_tokens"] == 2
    assert chat(client, "chat", max_tokens=ROOM).status_code == 200


def test_chat_logprobs_are_each_tokens_with_its_top_alternatives(client):
    body = chat(client, "chat", logprobs=True, top_logprobs=2, max_tokens=3).json()
    text = answer(CHAT_PROMPT, (1.0, 0.0))[:3]
    content = body["choices"][0]["logprobs"]["content"]
    assert [entry["token"] for entry in content] == list(text)
    for k, entry in enumerate(content):
        p = token_prob(k)
        assert entry["logprob"] == pytest.approx(math.log(p))
        assert entry["bytes"] == [ord(text[k])]
        assert [(top["token"], top["logprob"]) for top in entry["top_logprobs"]] == [
            (text[k], pytest.approx(math.log(p))), ("C", pytest.approx(math.log((1 - p) / 20)))]


def test_completions_index_choices_by_prompt_then_choice(client):
    prompts = ["ab", "xyz"]
    body = client.post("/v1/completions", json={"model": "chat", "prompt": prompts, "n": 2, "max_tokens": 3,
                                                "logprobs": 1}).json()
    ids = [[BOS, *map(ord, p)] for p in prompts]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    for c in body["choices"]:
        text = answer(ids[c["index"] // 2], (1.0, 0.0), c["index"] % 2)[:3]
        assert (c["text"], c["finish_reason"]) == (text, "length")
        assert c["logprobs"]["tokens"] == list(text)
        assert c["logprobs"]["token_logprobs"] == pytest.approx([math.log(token_prob(k)) for k in range(3)])
        assert c["logprobs"]["text_offset"] == [0, 1, 2]
    assert body["usage"] == {"prompt_tokens": 3 + 4, "completion_tokens": 4 * 3, "total_tokens": 7 + 12}
    token_prompt = client.post("/v1/completions", json={"model": "chat", "prompt": ids[0]}).json()
    assert token_prompt["choices"][0]["text"] == answer(ids[0], (1.0, 0.0))


@pytest.mark.parametrize("include_usage", [True, False])
def test_chat_stream_ends_with_steering_then_done(client, include_usage):
    override = {"alpha": {"chat": 1.5}}
    response = chat(client, "chat", stream=True, steering=override, stream_options={"include_usage": include_usage})
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None, "stop_reason": None}]
    deltas = [c["choices"][0] for c in chunks[1:-1]]
    assert "".join(d["delta"]["content"] for d in deltas) == answer(CHAT_PROMPT, (1.5, 0.0))
    assert [d["finish_reason"] for d in deltas] == [None] * (ANSWER_LEN - 1) + ["stop"]
    last = chunks[-1]
    assert last["choices"] == []
    assert last["steering"]["alpha"] == {"chat": 1.5}
    usage = {"prompt_tokens": len(CHAT_PROMPT), "completion_tokens": ANSWER_LEN,
             "total_tokens": len(CHAT_PROMPT) + ANSWER_LEN}
    assert last["usage"] == (usage if include_usage else None)
    # The chunk that finishes the answer carries the block too (for clients that drop the last
    # chunk, which has no choices); no other chunk does.
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-2]["steering"] == last["steering"]
    assert all(c["usage"] is None and c["steering"] is None for c in chunks[:-2])
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["object"] == "chat.completion.chunk"


def test_completions_stream_interleaves_choices(client):
    response = client.post("/v1/completions", json={"model": "mix", "prompt": ["ab", "xyz"], "n": 2, "stream": True,
                                                    "stream_options": {"include_usage": True}})
    chunks = [json.loads(event) for event in sse_events(response)[:-1]]
    texts = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    row = (0.5, -0.5)
    assert texts == {2 * p + j: answer([BOS, *map(ord, prompt)], row, j)
                     for p, prompt in enumerate(["ab", "xyz"]) for j in range(2)}
    assert chunks[-1]["usage"]["completion_tokens"] == 4 * ANSWER_LEN
    assert chunks[-1]["steering"]["alpha"] == {"chat": 0.5, "code": -0.5}
    # Of the choices' chunks, only the one that finishes the last of the four carries the block.
    finishing = [i for i, chunk in enumerate(chunks[:-1]) if chunk["choices"][0]["finish_reason"] is not None]
    assert len(finishing) == 4 and finishing[-1] == len(chunks) - 2
    assert [i for i, chunk in enumerate(chunks[:-1]) if chunk["steering"]] == [finishing[-1]]
    assert chunks[-2]["steering"] == chunks[-1]["steering"]


def test_continuous_usage_counts_every_chunk_as_vllm_does(client):
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = [json.loads(e) for e in sse_events(chat(client, "chat", stream=True, stream_options=options))[:-1]]
    assert [c["usage"]["completion_tokens"] for c in chunks] == [0, *range(1, ANSWER_LEN + 1), ANSWER_LEN]
    assert {(c["usage"]["prompt_tokens"], c["usage"]["total_tokens"] - c["usage"]["completion_tokens"])
            for c in chunks} == {(len(CHAT_PROMPT), len(CHAT_PROMPT))}
    # Without include_usage it asks for nothing, as in vLLM.
    quiet = sse_events(chat(client, "chat", stream=True, stream_options={"continuous_usage_stats": True}))[:-1]
    assert all(json.loads(e)["usage"] is None for e in quiet)


def test_vllm_bench_serves_completion_request_is_served(client):
    """The body `vllm bench serve --backend openai` sends (vLLM 0.32), unchanged."""
    body = {"model": "chat", "prompt": "ab", "repetition_penalty": 1.0, "max_tokens": 4, "logprobs": None,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    chunks = [json.loads(e) for e in sse_events(client.post("/v1/completions", json=body))[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == answer([BOS, ord("a"), ord("b")], (1.0, 0.0))[:4]
    assert chunks[-1]["usage"]["completion_tokens"] == 4


def test_echo_puts_the_prompt_and_its_logprobs_first(client):
    """vLLM's echo: text, tokens and logprobs of the prompt, then of the answer; the prompt's first
    token has no logprob. lm-eval's loglikelihood requests read exactly these lists."""
    body = {"model": "chat", "prompt": "ab", "max_tokens": 2, "logprobs": 1, "echo": True}
    (choice,) = client.post("/v1/completions", json=body).json()["choices"]
    generated = answer([BOS, ord("a"), ord("b")], (1.0, 0.0))[:2]
    assert choice["text"] == "ab" + generated
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == ["", "a", "b", *generated], "BOS spells as nothing"
    assert logprobs["token_logprobs"] == pytest.approx(
        [None, math.log(PROMPT_PROB), math.log(PROMPT_PROB), math.log(token_prob(0)), math.log(token_prob(1))])
    assert logprobs["top_logprobs"][0] is None and logprobs["top_logprobs"][1] == {"a": pytest.approx(math.log(0.5))}
    assert logprobs["text_offset"] == [0, 0, 1, 2, 3]
    assert choice["prompt_logprobs"] is None, "only when asked for by name"


def test_echo_with_max_tokens_0_scores_the_prompt_alone(client):
    body = {"model": "chat", "prompt": [BOS, ord("x"), ord("y")], "max_tokens": 0, "logprobs": 0, "echo": True,
            "prompt_logprobs": 0}
    response = client.post("/v1/completions", json=body).json()
    (choice,) = response["choices"]
    assert choice["text"] == "xy" and choice["logprobs"]["tokens"] == ["", "x", "y"]
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx([math.log(PROMPT_PROB)] * 2)
    assert choice["prompt_logprobs"] == [None, *({str(t): {"logprob": pytest.approx(math.log(PROMPT_PROB)), "rank": 1,
                                                            "decoded_token": chr(t)}} for t in (ord("x"), ord("y")))]


def test_an_echoed_stream_sends_the_prompt_once_per_choice(client):
    body = {"model": "chat", "prompt": "ab", "max_tokens": 3, "n": 2, "echo": True, "stream": True}
    texts: dict[int, str] = {}
    for chunk in map(json.loads, sse_events(client.post("/v1/completions", json=body))[:-2]):
        for c in chunk["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    prompt = [BOS, ord("a"), ord("b")]
    assert texts == {j: "ab" + answer(prompt, (1.0, 0.0), j)[:3] for j in range(2)}


def test_chat_prompt_logprobs_cover_the_rendered_conversation(client):
    body = {"model": "chat", "messages": MESSAGES, "max_tokens": 1, "prompt_logprobs": 0}
    response = client.post("/v1/chat/completions", json=body).json()
    rendered = CharTokenizer().apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                                   return_dict=False)
    assert response["prompt_logprobs"][0] is None and len(response["prompt_logprobs"]) == len(rendered)
    assert [int(next(iter(step))) for step in response["prompt_logprobs"][1:]] == rendered[1:]


def test_chat_template_kwargs_reach_the_template_and_unread_ones_are_refused(client):
    """vLLM passes only the variables a template reads and drops the rest; a dropped one is refused here."""
    plain = chat(client, "chat", max_tokens=1).json()["usage"]["prompt_tokens"]
    given = chat(client, "chat", max_tokens=1, chat_template_kwargs={"persona": "pirate"}).json()
    assert given["usage"]["prompt_tokens"] == plain + len("pirate\n")
    tokens = client.post("/tokenize", json={"messages": MESSAGES, "chat_template_kwargs": {"persona": "pirate"}}).json()
    assert tokens["count"] == given["usage"]["prompt_tokens"], "counted as generation renders it"
    for key in ("thinking_budget", "add_generation_prompt", "messages"):
        assert_error(chat(client, "chat", chat_template_kwargs={key: True}), 400, type=INVALID,
                     param=f"chat_template_kwargs.{key}", code="invalid_request",
                     says="it reads ['enable_thinking', 'persona']")


def test_an_answer_the_engine_ends_with_an_error_is_a_500_or_the_constraints_400(client):
    """vLLM's finish_reason "error" never reaches a client as an answer: a 500 as under vllm serve,
    or, under a format constraint (what it asks the tokenizer cannot spell), a 400 naming it."""
    response = client.post("/v1/completions", json={"model": "chat", "prompt": "a\u0007", "max_tokens": 2})
    assert_error(response, 500, type="server_error", param=None, code="generation_failed", says="server log")
    constrained = client.post("/v1/completions", json={"model": "chat", "prompt": "a\u0007", "max_tokens": 2,
                                                        "response_format": {"type": "json_object"}})
    assert_error(constrained, 400, type=INVALID, param="response_format", code="invalid_request", says="cannot spell")


def test_vllms_sampling_extensions_reach_the_engine():
    request = CompletionRequest(model="chat", prompt="x", repetition_penalty=1.3, min_p=0.05,
                                include_stop_str_in_output=True, stop=["."])
    params = SamplingParams(**request.sampling())
    assert (params.repetition_penalty, params.min_p, params.include_stop_str_in_output) == (1.3, 0.05, True)


@pytest.mark.parametrize(("field", "value", "says"), [
    ("repetition_penalty", 0.0, "greater than 0"),
    ("min_p", 1.5, "less than or equal to 1"),
    ("min_p", "0.1", "valid number"),
    ("include_stop_str_in_output", 1, "valid boolean"),
])
def test_vllms_sampling_extensions_are_bounded_and_typed(client, field, value, says):
    assert_error(chat(client, "chat", **{field: value}), 400, type=INVALID, param=field, code="invalid_value", says=says)


SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}}


@pytest.mark.parametrize(("fields", "constraint"), [
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, {"json_object": True}),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}},
     {"json": SCHEMA}),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, {"choice": ["yes", "no"]}),
    ({"structured_outputs": {"regex": "[ab]+", "disable_any_whitespace": True}},
     {"regex": "[ab]+", "disable_any_whitespace": True}),
])
def test_structured_outputs_become_vllms_own_parameters(fields, constraint):
    """vLLM's conversion (`structured_outputs_from_response_format`)."""
    request = ChatCompletionRequest.model_validate({"model": "chat", "messages": MESSAGES, **fields})
    params = request.sampling()["structured_outputs"]
    if constraint is None:
        assert params is None
    else:
        set_fields = {k: v for k, v in vars(params).items() if not k.startswith("_") and v not in (None, False)}
        assert set_fields == constraint


@pytest.mark.parametrize(("fields", "param", "says"), [
    ({"response_format": {"type": "json_schema"}}, "response_format", "only then"),
    ({"response_format": {"type": "json_object", "json_schema": {"name": "a", "schema": {}}}}, "response_format",
     "only then"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}}, "response_format", "is required"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "Input should be"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "x": 1}}},
     "response_format.json_schema.x", "Extra inputs"),
    ({"structured_outputs": {"choice": ["a"], "regex": "a"}}, "structured_outputs", "only use one kind"),
    ({"structured_outputs": {}}, "structured_outputs", "must use one kind"),
    ({"structured_outputs": {"json": SCHEMA}, "response_format": {"type": "json_object"}}, "structured_outputs",
     "only use one kind"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "at least 1"),
])
def test_malformed_structured_outputs_are_400(client, fields, param, says):
    response = chat(client, "chat", **fields)
    assert response.status_code == 400, response.text
    assert (response.json()["error"]["param"], says in response.json()["error"]["message"]) == (param, True), response.text


def test_a_decision_policy_refuses_a_format_it_cannot_answer_in(client):
    assert_error(chat(client, "triage", response_format={"type": "json_object"}), 400, type=INVALID,
                 param="response_format", code="invalid_request", says="one of their labels")
    assert_error(chat(client, "triage", structured_outputs={"choice": ["yes"]}), 400, type=INVALID,
                 param="structured_outputs", code="invalid_request", says="one of their labels")
    assert chat(client, "triage", response_format={"type": "text"}).status_code == 200


Y, N = ord("y"), ord("n")  # the labels' first tokens
COSTS = [[0, DECISION["cost_fp"]], [DECISION["cost_fn"], 0]]  # rows: acting yes, no; columns: truly yes, no


@pytest.mark.parametrize(("model", "steering", "action"), [
    # label_prob at alpha 0: y (1 + 121 % 4) / 10 = 0.2, n (1 + 110 % 4) / 10 = 0.3, so p = [0.4, 0.6]
    ("triage", None, "no"),  # yes 3 * 0.6 = 1.8, no 1 * 0.4 = 0.4, abstain 0.5
    ("triage", {"costs": [[0, 0.1], [1, 0]]}, "yes"),  # yes 0.06
    ("triage", {"abstain_cost": 0.2}, "abstain"),
    ("triage", {"abstain_cost": 0.42}, "no"),
    # T = 2: p = [0.2 ** 0.5, 0.3 ** 0.5] / sum = [0.4495, 0.5505]; no costs 0.4495
    ("triage-calibrated", None, "no"),
    ("triage-calibrated", {"abstain_cost": 0.42}, "abstain"),
    # alpha chat 1 (shift 10): y (1 + 131 % 4) / 10 = 0.4, n (1 + 120 % 4) / 10 = 0.1, so p = [0.8, 0.2]
    ("triage-chat", None, "abstain"),  # yes 3 * 0.2 = 0.6, no 0.8, abstain 0.5
    ("triage-chat", {"abstain_cost": 0.7}, "yes"),
])
def test_decision_answers_with_the_bayes_action(client, model, steering, action):
    body = chat(client, model, steering=steering).json()
    overrides = steering or {}
    costs, abstain_cost = overrides.get("costs", COSTS), overrides.get("abstain_cost", DECISION["abstain_cost"])
    temperature = CALIBRATION_T if "calibration" in POLICIES[model] else 1.0
    row = (POLICIES[model].get("alpha", {}).get("chat", 0.0), 0.0)
    raw = [label_prob(Y, row), label_prob(N, row)]
    probs = [p / sum(raw) for p in raw]
    tempered = [p ** (1 / temperature) for p in raw]  # softmax(log p / T)
    calibrated = [p / sum(tempered) for p in tempered]
    expected = {"yes": costs[0][0] * calibrated[0] + costs[0][1] * calibrated[1],
                "no": costs[1][0] * calibrated[0] + costs[1][1] * calibrated[1], "abstain": abstain_cost}
    assert min(expected, key=expected.get) == action  # the table's hand computation, checked
    decision = body["steering"]["decision"]
    assert decision["action"] == action
    assert decision["probabilities"] == pytest.approx(dict(zip(["yes", "no"], probs)))
    assert decision["calibrated"] == pytest.approx(dict(zip(["yes", "no"], calibrated)))
    assert decision["label_mass"] == pytest.approx(sum(raw))
    assert decision["expected_costs"] == pytest.approx(expected)
    assert (decision["costs"], decision["abstain_cost"], decision["temperature"]) == (costs, abstain_cost, temperature)
    assert body["steering"]["abstained"] is (action == "abstain")
    assert body["steering"]["confidence"] == pytest.approx(max(calibrated))
    assert body["steering"]["alpha"] == POLICIES[model].get("alpha", {})
    content = "I don't know." if action == "abstain" else action
    assert body["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": content},
                                  "logprobs": None, "finish_reason": "stop", "stop_reason": None}
    assert body["usage"]["completion_tokens"] == 1


MEAN_CONFIDENCE = sum(token_prob(k) for k in range(ANSWER_LEN)) / ANSWER_LEN  # 0.9 * H(6) / 6 = 0.3675


@pytest.mark.parametrize(("threshold", "abstained"), [(None, False), (0.3, False), (0.5, True)])
def test_abstention_withholds_answers_below_the_threshold(client, threshold, abstained):
    steering = {"abstain_threshold": threshold} if threshold is not None else None
    body = chat(client, "qa", steering=steering).json()
    threshold = 0.2 if threshold is None else threshold
    assert MEAN_CONFIDENCE == pytest.approx(0.3675)
    assert body["steering"]["abstained"] is abstained
    assert body["steering"]["confidence"] == pytest.approx(MEAN_CONFIDENCE)
    assert body["steering"]["abstention"] == pytest.approx(
        {"score": "mean_prob", "raw": MEAN_CONFIDENCE, "confidence": MEAN_CONFIDENCE, "threshold": threshold})
    content = "Pass." if abstained else answer(CHAT_PROMPT, (1.0, 0.0))
    assert body["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": content},
                                  "logprobs": None, "finish_reason": "stop", "stop_reason": None}


def test_an_abstained_stream_sends_nothing_of_the_answer(client):
    response = chat(client, "qa", stream=True, steering={"abstain_threshold": 0.5})
    chunks = [json.loads(event) for event in sse_events(response)[:-1]]
    contents = [c["choices"][0]["delta"]["content"] for c in chunks if c["choices"]]
    assert contents == ["", "Pass."]
    assert chunks[-1]["steering"]["abstained"] is True


def test_metrics_count_requests_by_policy_and_status(client, engine):
    assert chat(client, "chat").status_code == 200
    assert chat(client, "chat", stream=True).status_code == 200
    assert chat(client, "nope").status_code == 404
    assert chat(client, "chat", steering={"alpha": {"chat": 9.0}}).status_code == 400
    assert chat(client, "chat", bogus=1).status_code == 400
    assert chat(client, "qa", steering={"abstain_threshold": 0.5}).status_code == 200
    assert chat(client, "triage").status_code == 200
    assert TestClient(client.app).get("/v1/models").status_code == 401
    text = client.get("/metrics").text

    def requests(policy, status, endpoint="chat"):
        return metric(text, "steer_requests_total", policy=policy, endpoint=endpoint, status=status)

    assert requests("chat", "200") == 2
    assert requests("<unknown>", "404") == 1
    assert requests("chat", "400") == 2
    assert requests("qa", "200") == requests("triage", "200") == 1
    assert requests("<unknown>", "401", endpoint="list_models") == 1
    assert metric(text, "steer_errors_total", policy="<unknown>", type="model_not_found") == 1
    assert metric(text, "steer_errors_total", policy="chat", type="invalid_steering") == 1
    assert metric(text, "steer_errors_total", policy="chat", type="invalid_value") == 1
    assert metric(text, "steer_errors_total", policy="<unknown>", type="invalid_api_key") == 1
    assert metric(text, "steer_abstentions_total", policy="qa") == 1
    assert metric(text, "steer_decisions_total", policy="triage", action="no") == 1
    assert metric(text, "steer_prompt_tokens_total", policy="chat") == 2 * len(CHAT_PROMPT)
    assert metric(text, "steer_generation_tokens_total", policy="chat") == 2 * ANSWER_LEN
    assert metric(text, "steer_request_latency_seconds_count", policy="chat", endpoint="chat") == 2
    assert metric(text, "steer_engine_unfinished_requests") == engine.num_unfinished_requests == 0


def test_http_metrics_are_vllm_serves(client):
    """prometheus-fastapi-instrumentator's series, as `vllm serve` exports them: by route template,
    method and status class, the gate's refusals included; /metrics and /health left out."""
    assert chat(client, "chat").status_code == chat(client, "mix", stream=True).status_code == 200
    assert chat(client, "nope").status_code == 404
    assert client.get("/v1/models/chat").status_code == 200
    assert TestClient(client.app).get("/v1/models/chat").status_code == 401
    assert client.get("/health").status_code == 200
    text = client.get("/metrics").text

    def http(handler, method, status):
        return metric(text, "http_requests_total", handler=handler, method=method, status=status)

    assert (http("/v1/chat/completions", "POST", "2xx"), http("/v1/chat/completions", "POST", "4xx")) == (2, 1)
    assert (http("/v1/models/{model}", "GET", "2xx"), http("/v1/models/{model}", "GET", "4xx")) == (1, 1)
    assert metric(text, "http_request_duration_seconds_count", handler="/v1/chat/completions", method="POST") == 3
    assert 'handler="/health"' not in text and 'handler="/metrics"' not in text


def test_the_openai_sdk_over_the_in_process_transport(app):
    async def run() -> None:
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fake")
        async with openai.AsyncOpenAI(base_url="http://fake/v1", api_key=API_KEY, max_retries=0,
                                      http_client=http) as client:
            assert [m.id async for m in client.models.list()] == list(POLICIES)
            completion = await client.chat.completions.create(
                model="chat", messages=MESSAGES, extra_body={"steering": {"alpha": {"chat": 1.5}}})
            assert completion.choices[0].message.content == answer(CHAT_PROMPT, (1.5, 0.0))
            assert completion.steering["alpha"] == {"chat": 1.5}
            stream = await client.chat.completions.create(model="mix", messages=MESSAGES, stream=True,
                                                          stream_options={"include_usage": True})
            chunks = [chunk async for chunk in stream]
            assert "".join(c.choices[0].delta.content for c in chunks if c.choices) == answer(CHAT_PROMPT, (0.5, -0.5))
            assert chunks[-1].usage.completion_tokens == ANSWER_LEN
            assert chunks[-1].steering["policy"] == "mix"
            with pytest.raises(openai.NotFoundError) as missing:
                await client.chat.completions.create(model="nope", messages=MESSAGES)
            assert (missing.value.status_code, missing.value.code, missing.value.param) == (404, "model_not_found",
                                                                                            "model")
            with pytest.raises(openai.BadRequestError) as beyond:
                await client.chat.completions.create(model="chat", messages=MESSAGES,
                                                     extra_body={"steering": {"alpha": {"chat": 3.0}}})
            assert beyond.value.param == "steering.alpha.chat"

    asyncio.run(run())
