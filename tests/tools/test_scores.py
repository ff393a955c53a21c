"""One scoring implementation: `steer calibrate` reads the same scores the server reports for the
same rows, because both admit the policy and run its kind (in process, over the fake engine)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

from fastapi.testclient import TestClient
from steering_server.app import create_app
from steering_server.settings import ServerSettings
from steering_tools.calibrate import Row, abstention_answers, decision_logprobs, raw_scores

from steering.admission import Admission
from steering.config import parse_deployment
from steering.rules.decisions import label_probabilities
from tests.server.fake_engine import BOS, EOS, PROMPT_PROB, FakeEngine, label_prob
from tests.server.test_protocol import API_KEY, EXPERTS, MAX_MODEL_LEN, POLICIES

CHECK = {"alpha": {"chat": 1.0}, "decision": {"claim": True, "labels": ["true", "false"], "cost_fp": 4.0,
                                              "cost_fn": 1.0}}
PROMPTS = ["hi", "the moon", "every cat", "a river reads"]


def served():
    engine = FakeEngine(parse_deployment({"base": "fake/base", "experts": EXPERTS,
                                          "policies": {**POLICIES, "check": CHECK}}), max_model_len=MAX_MODEL_LEN)
    client = TestClient(create_app(ServerSettings(config=Path("unused"), api_key=API_KEY), engine=engine),
                        headers={"Authorization": f"Bearer {API_KEY}"})
    return Admission(engine), client


def test_calibrate_reads_the_abstention_scores_the_server_reports():
    admission, client = served()
    rows = [Row(prompt=prompt, answer="x") for prompt in PROMPTS]
    answers, _ = asyncio.run(abstention_answers(admission, "qa", rows, max_tokens=4))
    calibrated = raw_scores("mean_prob", answers)
    served_raw = [client.post("/v1/completions", json={"model": "qa", "prompt": prompt, "max_tokens": 4,
                                                       "temperature": 0.0}).json()["steering"]["abstention"]["raw"]
                  for prompt in PROMPTS]
    assert calibrated.tolist() == served_raw
    assert len(set(served_raw)) == 1 and served_raw[0] == sum(0.9 / (k + 1) for k in range(4)) / 4  # by hand


def test_calibrate_reads_the_label_logprobs_the_server_decides_on():
    admission, client = served()
    logprobs = asyncio.run(decision_logprobs(admission, "triage", [Row(prompt=p, label="yes") for p in PROMPTS]))
    for prompt, row in zip(PROMPTS, logprobs):
        decision = client.post("/v1/completions", json={"model": "triage", "prompt": prompt}).json()
        probabilities = decision["steering"]["decision"]["probabilities"]
        assert label_probabilities(row).tolist() == [probabilities["yes"], probabilities["no"]]
        assert math.isclose(math.exp(row[0]), label_prob(ord("y"), (0.0, 0.0)))  # the fake's, by hand


def test_a_claim_check_runs_in_process_and_calibrate_reads_the_same_claim():
    """The claim's tokens at PROMPT_PROB each (the fake's prompt logprobs), then the end of text."""
    admission, client = served()
    claim = " moon"
    body = client.post("/v1/completions", json={"model": "check", "prompt": "hi", "steering": {"claim": claim}}).json()
    row = (1.0,) + (0.0,)  # the check policy's alpha row: chat 1, code 0
    want = len(claim) * math.log(PROMPT_PROB) + math.log(label_prob(EOS, row))
    decision = body["steering"]["decision"]
    assert decision["claim"] == claim and math.isclose(decision["claim_logprob"], want, rel_tol=1e-12)
    assert body["usage"]["prompt_tokens"] == len([BOS, *"hi"]) + len(claim)
    (calibrated,) = asyncio.run(decision_logprobs(admission, "check", [Row(prompt="hi", label="true", claim=claim)]))
    assert calibrated[0] == want and math.isclose(calibrated[1], math.log(-math.expm1(want)))


def test_evidence_is_served_only_behind_an_api_key():
    engine = FakeEngine(parse_deployment({"base": "fake/base", "experts": EXPERTS, "policies": POLICIES}),
                        max_model_len=MAX_MODEL_LEN)
    open_door = TestClient(create_app(ServerSettings(config=Path("unused")), engine=engine))
    refused = open_door.post("/v1/completions", json={"model": "qa", "prompt": "hi", "steering": {"evidence": "score"}})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "steering.evidence"
    _, client = served()
    body = client.post("/v1/completions", json={"model": "qa", "prompt": "hi", "max_tokens": 3,
                                                "steering": {"evidence": "score", "abstain_threshold": 0.9}}).json()
    assert body["steering"]["evidence"]["token_logprobs"] == [math.log(0.9 / (k + 1)) for k in range(3)]
    assert body["choices"][0]["text"] != "Pass.", "a calibration's request withholds nothing"
    plain = client.post("/v1/completions", json={"model": "qa", "prompt": "hi", "max_tokens": 3}).json()
    assert "evidence" not in plain["steering"]
