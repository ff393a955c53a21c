"""`steering.trace` in the protocol, in process over the fake engine: every number against a hand
computation from the fake model's rules (tests/server/fake_engine.py); the live engine's numbers
against the transformers reference are in tests/engine/test_trace.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from steering_server.app import create_app
from steering_server.settings import ServerSettings

from steering.config import parse_deployment
from tests.server.fake_engine import ANSWER_LEN, FLIP, FLIP_PROB, PROMPT_PROB, FakeEngine, token_prob, view_prob
from tests.server.test_protocol import (
    API_KEY,
    EXPERTS,
    INVALID,
    MAX_MODEL_LEN,
    POLICIES,
    ROOM,
    assert_error,
    chat,
    sse_events,
)

TRACE = {"trace": True}


@pytest.fixture
def client() -> TestClient:
    engine = FakeEngine(parse_deployment({"base": "fake/base", "experts": EXPERTS, "policies": POLICIES}),
                        max_model_len=MAX_MODEL_LEN)
    app = create_app(ServerSettings(config=Path("unused"), api_key=API_KEY), engine=engine)
    return TestClient(app, headers={"Authorization": f"Bearer {API_KEY}"})


def expected_trace(answer: str, contributions: dict[str, float]) -> list[dict]:
    """The fake's trace of an answer: its tokens' steered logprobs, the base view's, and a flip to
    FLIP where a token's id is even."""
    return [{"token": c, "token_id": ord(c), "logprob": math.log(token_prob(k)), "base_logprob": math.log(PROMPT_PROB),
             "contributions": contributions,
             "flip": {"token": chr(FLIP), "token_id": FLIP, "base_logprob": math.log(FLIP_PROB)}
             if ord(c) % 2 == 0 else None}
            for k, c in enumerate(answer)]


def contribution(alpha: float, pair: int) -> float:
    """alpha * (log p_tuned - log p_untuned) under the fake's views of pair `pair`."""
    return alpha * (math.log(view_prob(1 + 2 * pair)) - math.log(view_prob(2 + 2 * pair)))


MIX = {"chat": contribution(0.5, 0), "code": contribution(-0.5, 1)}  # the `mix` policy's alphas


def assert_trace(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for entry, want in zip(got, expected):
        assert entry.keys() == want.keys()
        exact = ("token", "token_id", "flip")
        assert {k: entry[k] for k in exact} == {k: want[k] for k in exact}
        assert entry["logprob"] == pytest.approx(want["logprob"])
        assert entry["base_logprob"] == pytest.approx(want["base_logprob"])
        assert entry["contributions"] == pytest.approx(want["contributions"])


def test_each_answer_token_is_traced(client):
    response = chat(client, "mix", steering=TRACE)
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    assert_trace(choice["trace"], expected_trace(choice["message"]["content"], MIX))
    assert any(e["flip"] for e in choice["trace"]) and not all(e["flip"] for e in choice["trace"])


def test_no_trace_unless_asked(client):
    (choice,) = chat(client, "mix").json()["choices"]
    assert "trace" not in choice


def test_a_pair_at_alpha_zero_contributes_nothing(client):
    response = chat(client, "chat", steering={"alpha": {"chat": 0.0}, **TRACE})
    (choice,) = response.json()["choices"]
    assert_trace(choice["trace"], expected_trace(choice["message"]["content"], {}))


def test_a_stream_traces_each_chunk_s_own_tokens(client):
    whole = chat(client, "mix", steering=TRACE).json()["choices"][0]
    with client.stream("POST", "/v1/chat/completions",
                       json={"model": "mix", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                             "steering": TRACE}) as response:
        response.read()
        events = [json.loads(e) for e in sse_events(response) if e != "[DONE]"]
    traced = [c for e in events for c in e["choices"] if c["delta"].get("content")]
    assert len(traced) == ANSWER_LEN
    for c in traced:
        assert [e["token"] for e in c["trace"]] == list(c["delta"]["content"])
    assert [e for c in traced for e in c["trace"]] == whole["trace"]
    assert all("trace" not in c for e in events for c in e["choices"] if not c["delta"].get("content"))


def test_completions_trace_every_choice(client):
    response = client.post("/v1/completions", json={"model": "mix", "prompt": ["hi", "yo"], "n": 2, "steering": TRACE})
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert len(choices) == 4
    for choice in choices:
        assert_trace(choice["trace"], expected_trace(choice["text"], MIX))


def test_echo_alone_traces_nothing(client):
    response = client.post("/v1/completions", json={"model": "mix", "prompt": "hi", "echo": True, "max_tokens": 0,
                                                    "steering": TRACE})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["trace"] == []


def test_an_abstention_traces_the_answer_it_gives_and_nothing_it_withholds(client):
    answered = chat(client, "qa", steering={"abstain_threshold": 0.1, **TRACE}).json()
    assert answered["steering"]["abstained"] is False
    (choice,) = answered["choices"]
    assert_trace(choice["trace"], expected_trace(choice["message"]["content"], {"chat": contribution(1.0, 0)}))
    withheld = chat(client, "qa", steering={"abstain_threshold": 0.9, **TRACE}).json()
    assert withheld["steering"]["abstained"] is True
    assert withheld["choices"][0]["message"]["content"] == "Pass." and withheld["choices"][0]["trace"] == []


def test_a_decision_is_not_traced(client):
    assert_error(chat(client, "triage", steering=TRACE), 400, type=INVALID, param="steering.trace",
                 code="invalid_request", says="decision policies generate no answer to trace")


def test_a_trace_needs_one_position_after_the_answer(client):
    assert chat(client, "mix", max_tokens=ROOM - 1, steering=TRACE).status_code == 200
    assert_error(chat(client, "mix", max_tokens=ROOM, steering=TRACE), 400, type=INVALID, param="max_tokens",
                 code="invalid_request", says="leave no room to trace the answer")
