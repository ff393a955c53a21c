"""What the playground reads and is served, in process over `FakeEngine`: each policy's rule on its
model card, and the page's files under their Content-Security-Policy, without the API key.
The page itself runs in a real browser in `tests/playground/`."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from steering_server.app import create_app
from steering_server.settings import ServerSettings

from steering.config import parse_deployment
from tests.server.fake_engine import FakeEngine
from tests.server.test_certified import certificate
from tests.server.test_protocol import API_KEY, EXPERTS, MAX_MODEL_LEN, POLICIES

CALIBRATED = {
    "qa-certified": {"abstain": {"score": "mean_prob", "risk": {"epsilon": 0.1, "delta": 0.1}, "message": "Pass."},
                     "calibration": {"kind": "abstention", "policy": "qa-certified", "score": "mean_prob",
                                     "threshold": 0.7, "certificate": certificate("error among answered", 0.7)}},
    "qa-fitted": {"abstain": {"score": "first_prob"},
                  "calibration": {"kind": "abstention", "policy": "qa-fitted", "score": "first_prob",
                                  "threshold": 0.4}},
    "check": {"alpha": {"chat": 1.0}, "decision": {"labels": ["true", "false"], "cost_fp": 4.0, "cost_fn": 1.0,
                                                   "claim": True}},
}


def make_client(api_key: str | None = API_KEY) -> TestClient:
    deployment = parse_deployment({"base": "fake/base", "experts": EXPERTS, "policies": {**POLICIES, **CALIBRATED}})
    app = create_app(ServerSettings(config=Path("unused"), api_key=api_key),
                     engine=FakeEngine(deployment, max_model_len=MAX_MODEL_LEN))
    return TestClient(app, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})


@pytest.fixture(scope="module")
def cards() -> dict[str, dict]:
    return {card["id"]: card for card in make_client().get("/v1/models").json()["data"]}


def test_a_card_says_the_kind_of_each_policy(cards):
    assert {name: card["kind"] for name, card in cards.items()} == {
        "base": "plain", "chat": "plain", "mix": "plain", "triage": "decision", "triage-calibrated": "decision",
        "triage-chat": "decision", "qa": "abstention", "qa-certified": "abstention", "qa-fitted": "abstention",
        "check": "decision"}
    plain = cards["chat"]
    assert (plain["abstention"], plain["decision"], plain["certified"]) == (None, None, None)


def test_an_abstention_card_has_the_threshold_served_and_its_bounds(cards):
    assert cards["qa"]["abstention"] == {"score": "mean_prob", "threshold": 0.2, "threshold_bounds": [0.1, 0.9],
                                         "message": "Pass."}
    # No threshold in the config: the calibration file's serves, and the card says it.
    assert cards["qa-fitted"]["abstention"] == {"score": "first_prob", "threshold": 0.4, "threshold_bounds": None,
                                                "message": "I don't know."}
    assert (cards["qa"]["decision"], cards["qa"]["certified"]) == (None, None)


def test_a_decision_card_has_the_actions_and_costs(cards):
    assert cards["triage"]["decision"] == {"labels": ["yes", "no"], "actions": ["yes", "no", "abstain"],
                                           "costs": [[0.0, 3.0], [1.0, 0.0]], "abstain_cost": 0.5,
                                           "max_cost": 10.0, "claim": False}
    assert cards["check"]["decision"] == {"labels": ["true", "false"], "actions": ["true", "false"],
                                          "costs": [[0.0, 4.0], [1.0, 0.0]], "abstain_cost": None,
                                          "max_cost": None, "claim": True}
    assert cards["triage"]["abstention"] is None


def test_a_card_states_the_certified_risk_as_a_response_does(cards):
    client = make_client()
    body = client.post("/v1/completions", json={"model": "qa-certified", "prompt": "hi", "max_tokens": 4}).json()
    assert cards["qa-certified"]["certified"] == body["steering"]["certified"] == {
        "risk": "error among answered", "epsilon": 0.1, "delta": 0.1, "n": 200, "threshold": 0.7}
    assert cards["qa-certified"]["abstention"]["threshold"] == 0.7
    assert client.get("/v1/models/qa-certified").json() == cards["qa-certified"]


CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@pytest.mark.parametrize(("path", "content_type"), [
    ("/playground", "text/html"), ("/playground/app.js", "text/javascript"), ("/playground/app.css", "text/css"),
    ("/playground/favicon.svg", "image/svg+xml"), ("/playground/server.json", "application/json"),
])
def test_the_page_and_its_files_load_without_the_key_under_a_strict_policy(path, content_type):
    response = make_client(api_key=None).get(path, headers={})
    anonymous = TestClient(make_client().app).get(path)
    for answer in (response, anonymous):
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith(content_type)
        assert answer.headers["content-security-policy"] == CSP
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["x-frame-options"] == "DENY"


def test_the_page_is_told_whether_to_ask_for_a_key():
    assert TestClient(make_client().app).get("/playground/server.json").json() == {"keyed": True}
    assert make_client(api_key=None).get("/playground/server.json").json() == {"keyed": False}


def test_the_page_loads_nothing_inline_and_nothing_from_another_host():
    page = make_client().get("/playground").text
    assert "<style" not in page and " style=" not in page and "<script>" not in page
    assert "http://" not in page and "https://" not in page
    script = make_client().get("/playground/app.js").text
    assert not [api for api in ("localStorage", "sessionStorage", "indexedDB", "document.cookie") if api in script]


def test_only_the_page_s_own_files_are_served_and_none_is_in_the_api_schema():
    client = make_client()
    for path in ("/playground/index.html", "/playground/api_router.py", "/playground/..%2Fapi_router.py"):
        assert client.get(path).status_code == 404
    assert not [path for path in client.get("/openapi.json").json()["paths"] if path.startswith("/playground")]
