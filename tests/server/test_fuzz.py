"""The HTTP API fuzzed from its own published OpenAPI schema with schemathesis: no input gets a
5xx, schema-invalid input is refused, and every answer (status, content type, headers, body) is
what the schema says.

Twice: in process over `FakeEngine` with many examples (seconds), then against the real server
on the fixture family with a few, its generation lengths kept short so the engine's time goes to
variety. Generated policy names are mostly swapped for served ones, so requests get past the
404 and into planning, steering and decisions; some keep their random name.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import hypothesis.strategies as st
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from steering_server.app import create_app
from steering_server.settings import ServerSettings

from steering.config import parse_deployment
from tests.live_server import API_KEY as LIVE_API_KEY
from tests.server.fake_engine import FakeEngine
from tests.server.test_protocol import API_KEY, EXPERTS, MAX_MODEL_LEN, POLICIES

LIVE_POLICIES = ["base", "chat", "mix", "triage", "triage-calibrated", "qa", "qa-first", "qa-base", "qa-agree",
                 "qa-familiar", "qa-profile", "check"]
# What the server may refuse although the schema allows it: a bound the schema cannot state
# (an alpha beyond the policy's max_alpha, a prompt longer than the context, a seed past int64
# that JSON's float bound lets through), so schema-valid input is not required to be accepted.
CHECKS = {"excluded_checks": [schemathesis.checks.positive_data_acceptance]}
SETTINGS = {"suppress_health_check": list(HealthCheck), "deadline": None, "derandomize": True, "database": None}


def served_names(schema: schemathesis.BaseSchema, policies: list[str], *, short: bool) -> None:
    """Hooks on `schema`: a generated string `model` becomes one of `policies` (or stays random);
    with `short`, lengths and counts are capped so a real engine answers quickly."""

    def name(model: object) -> st.SearchStrategy:
        return st.sampled_from([*policies, model]) if isinstance(model, str) else st.just(model)

    def message(m: object) -> object:
        """A message made to keep the rules of its role (content, tool_call_id, tool_calls); a
        value of the wrong type is left as it is, so negative cases stay negative."""
        if not isinstance(m, dict):
            return m
        m = {**m}
        if m.get("role") in ("system", "developer", "user") and isinstance(m.get("tool_calls"), list):
            m["role"] = "assistant"  # kept, not dropped: a negative case may hide inside the calls
        if m.get("role") == "tool":
            m.setdefault("tool_call_id", "call-0")
        elif isinstance(m.get("tool_call_id"), str):
            m.pop("tool_call_id")
        if m.get("content") is None and not m.get("tool_calls"):
            m["content"] = "hi"
        return m

    @schema.hook
    def flatmap_body(context, body):
        if not isinstance(body, dict):
            return st.just(body)
        # Most bodies are made to keep the rules across fields that a schema cannot state, so
        # they get past them into planning; a random share of requests still breaks each one.
        if isinstance(body.get("messages"), list):
            body = {**body, "messages": [message(m) for m in body["messages"]]}
        if "tools" not in body:
            body.pop("tool_choice", None)
        if isinstance(body.get("chat_template_kwargs"), dict):
            body.pop("chat_template_kwargs")
        if body.get("stream") is True:
            body.pop("prompt_logprobs", None)
        if body.get("max_tokens") == 0:
            body["echo"] = True
        if short:
            body = {**body, **{field: min(value, 8) for field in ("max_tokens", "max_completion_tokens", "min_tokens")
                               if type(value := body.get(field)) is int}}
            if type(body.get("n")) is int:
                body["n"] = min(body["n"], 2)
        return name(body.get("model")).map(lambda model: {**body, "model": model} if "model" in body else body)

    @schema.hook
    def flatmap_path_parameters(context, parameters):
        if not isinstance(parameters, dict) or "model" not in parameters:
            return st.just(parameters)
        return name(parameters["model"]).map(lambda model: {**parameters, "model": model})


def fake_app():
    # Feedback on: /v1/feedback is in the schema, and fuzzed like the rest.
    store = Path(tempfile.mkdtemp(prefix="fuzz-feedback-")) / "feedback.sqlite"
    deployment = parse_deployment({"base": "fake/base", "experts": EXPERTS, "policies": POLICIES,
                                   "feedback": {"store": str(store), "secret": "fuzz-secret-0123456789"}})
    engine = FakeEngine(deployment, max_model_len=MAX_MODEL_LEN)
    return create_app(ServerSettings(config=Path("unused"), api_key=API_KEY), engine=engine)


in_process = schemathesis.openapi.from_asgi("/openapi.json", fake_app())
served_names(in_process, list(POLICIES), short=False)
STATUSES: Counter[tuple[str, int]] = Counter()


@in_process.parametrize()
@settings(max_examples=80, **SETTINGS)
def test_no_input_breaks_the_server_or_its_schema(case):
    response = case.call_and_validate(headers={"Authorization": f"Bearer {API_KEY}"}, **CHECKS)
    STATUSES[case.operation.label, response.status_code] += 1


def test_the_fuzzer_reached_answers_and_refusals():
    """Against hollow fuzzing: the generation endpoints were answered (200) and refused (400, 404).
    Runs after the fuzz test above, which counts what it saw."""
    assert STATUSES, "the fuzz test above did not run first"
    generation = ("POST /v1/chat/completions", "POST /v1/completions")
    assert {status for (label, status) in STATUSES if label == "POST /v1/feedback"} >= {400}, STATUSES
    for operation in generation:
        assert {200, 400} <= {status for (label, status) in STATUSES if label == operation}, STATUSES
    assert any(STATUSES[operation, 404] for operation in generation), STATUSES


@pytest.fixture(scope="module")
def live_schema(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    served_names(schema, LIVE_POLICIES, short=True)
    return schema


# Drawn with hypothesis directly: schemathesis's `from_fixture` breaks on pytest 9 (it sets a node's
# private `_nodeid`), and the real server is a session fixture.
@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=str)
def test_no_input_breaks_the_real_server(live_schema, server, mode):
    seen: Counter[int] = Counter()

    @given(case=live_schema.as_strategy(generation_mode=mode))
    @settings(max_examples=40, **SETTINGS)
    def fuzz(case):
        response = case.call_and_validate(headers={"Authorization": f"Bearer {LIVE_API_KEY}"}, timeout=120, **CHECKS)
        seen[response.status_code] += 1

    fuzz()
    assert server.metric("steer_requests_total", status="500") == 0
    # Against hollow fuzzing: valid input got answers, invalid input (a bad key among it) refusals.
    reached = {200, 400} if mode == schemathesis.GenerationMode.POSITIVE else {400, 401}
    assert reached <= set(seen), seen
