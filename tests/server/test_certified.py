"""A policy that states a risk serves the threshold its calibration certifies, and says what it
certifies in the `steering` block (in process, over the fake engine's documented numbers)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from steering_server.app import create_app
from steering_server.settings import ServerSettings

from steering.config import parse_deployment
from tests.server.fake_engine import FakeEngine, label_prob, token_prob
from tests.server.test_protocol import API_KEY, MAX_MODEL_LEN

METHOD = "Learn-then-Test"


def certificate(risk: str, threshold: float) -> dict:
    return {"risk": risk, "epsilon": 0.1, "delta": 0.1, "threshold": threshold, "n": 200, "coverage": 0.5,
            "method": METHOD}


def client(threshold: float) -> TestClient:
    decision = {"labels": ["yes", "no"], "cost_fp": 1.0, "cost_fn": 1.0, "risk": {"epsilon": 0.1, "delta": 0.1}}
    abstain = {"score": "mean_prob", "risk": {"epsilon": 0.1, "delta": 0.1}, "message": "Pass."}
    policies = {
        "verify": {"decision": decision, "calibration": {
            "kind": "decision", "policy": "verify", "labels": ["yes", "no"],
            "certificate": certificate("false positive among positive", threshold)}},
        "qa": {"abstain": abstain, "calibration": {
            "kind": "abstention", "policy": "qa", "score": "mean_prob", "threshold": threshold,
            "certificate": certificate("error among answered", threshold)}},
    }
    engine = FakeEngine(parse_deployment({"base": "fake/base", "policies": policies}), max_model_len=MAX_MODEL_LEN)
    app = create_app(ServerSettings(config=Path("unused"), api_key=API_KEY), engine=engine)
    return TestClient(app, headers={"Authorization": f"Bearer {API_KEY}"})


def test_a_certified_decision_says_yes_exactly_when_p_yes_reaches_the_threshold():
    p_yes = label_prob(ord("y"), (0.0,)) / (label_prob(ord("y"), ()) + label_prob(ord("n"), ()))  # 0.2 / 0.5
    for threshold, action in ((p_yes - 0.05, "yes"), (p_yes + 0.05, "no")):
        body = client(threshold).post("/v1/completions", json={"model": "verify", "prompt": "hi"}).json()
        decision = body["steering"]["decision"]
        assert decision["calibrated"]["yes"] == p_yes and decision["threshold"] == threshold
        assert decision["action"] == body["choices"][0]["text"] == action
        assert body["steering"]["certified"] == {"risk": "false positive among positive", "epsilon": 0.1,
                                                 "delta": 0.1, "n": 200, "threshold": threshold}


def test_a_certified_abstention_withholds_below_its_certified_threshold_and_says_so():
    confidence = sum(token_prob(k) for k in range(4)) / 4  # mean_prob of a 4-token answer
    for threshold, abstained in ((confidence - 0.01, False), (confidence + 0.01, True)):
        body = client(threshold).post("/v1/completions", json={"model": "qa", "prompt": "hi", "max_tokens": 4}).json()
        assert body["steering"]["abstained"] is abstained
        assert (body["choices"][0]["text"] == "Pass.") is abstained
        assert body["steering"]["certified"]["risk"] == "error among answered"
        assert body["steering"]["certified"]["threshold"] == threshold
