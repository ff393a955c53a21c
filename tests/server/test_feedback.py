"""Outcomes fed back, in process over the fake engine: every decision and abstention carries a
feedback id any replica with the secret verifies; outcomes are kept once, refused when forged,
expired or conflicting, counted for reliability, and refitted on."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from steering_server.app import create_app
from steering_server.settings import ServerSettings
from steering_tools import metrics as fits
from steering_tools.calibrate import calibrate_from_feedback, split
from steering_tools.server_process import ServerProcess, free_port

from steering.config import digest, parse_deployment, read_deployment
from steering.errors import ConfigError
from steering.feedback import FeedbackStore, FeedbackTokens
from tests.server.fake_engine import FakeEngine, label_prob, token_prob
from tests.server.test_protocol import API_KEY, EXPERTS, INVALID, MAX_MODEL_LEN, POLICIES, assert_error, metric

SECRET = "s3cret-s3cret-s3cret"


def config(store: Path, **feedback) -> dict:
    return {"base": "fake/base", "experts": EXPERTS, "policies": POLICIES,
            "feedback": {"store": str(store), "secret": SECRET, **feedback}}


def replica(raw: dict, **settings) -> TestClient:
    engine = FakeEngine(parse_deployment(raw), max_model_len=MAX_MODEL_LEN)
    app = create_app(ServerSettings(config=Path("unused"), api_key=API_KEY, **settings), engine=engine)
    return TestClient(app, headers={"Authorization": f"Bearer {API_KEY}"})


@pytest.fixture
def client(tmp_path) -> TestClient:
    return replica(config(tmp_path / "feedback.sqlite"))


def ask(client: TestClient, model: str, **fields) -> dict:
    response = client.post("/v1/completions", json={"model": model, "prompt": "hi", **fields})
    assert response.status_code == 200, response.text
    return response.json()


def send(client: TestClient, id_: str, outcome: str):
    return client.post("/v1/feedback", json={"id": id_, "outcome": outcome})


def test_decisions_and_abstentions_carry_a_feedback_id_and_nothing_else_does(client):
    assert ask(client, "triage")["steering"]["feedback_id"]
    assert ask(client, "qa", max_tokens=3)["steering"]["feedback_id"]
    assert "feedback_id" not in ask(client, "chat")["steering"]
    assert "feedback_id" not in ask(client, "qa", steering={"evidence": "score"})["steering"], "a calibration's"
    stream = client.post("/v1/completions", json={"model": "triage", "prompt": "hi", "stream": True}).text
    last = json.loads([line for line in stream.split("\n\n") if line.startswith("data: {")][-1][6:])
    assert last["steering"]["feedback_id"]


def test_an_outcome_is_kept_once_against_the_config_it_was_made_under(client, tmp_path):
    id_ = ask(client, "qa", max_tokens=3)["steering"]["feedback_id"]
    first = send(client, id_, "correct")
    assert first.status_code == 200 and first.json()["status"] == "recorded"
    assert first.json()["digest"] == digest(parse_deployment(config(tmp_path / "feedback.sqlite")))
    assert send(client, id_, "correct").json()["status"] == "already recorded", "the same body again is idempotent"
    assert_error(send(client, id_, "incorrect"), 409, type=INVALID, param="outcome", code="outcome_conflict",
                 says="already has the outcome 'correct'")
    (kept,) = FeedbackStore(tmp_path / "feedback.sqlite").outcomes()
    assert (kept.policy, kept.outcome, kept.bound["score"]) == ("qa", "correct", "mean_prob")


@pytest.mark.parametrize(("tamper", "says"), [
    (lambda id_: id_[:-2] + ("AA" if not id_.endswith("AA") else "BB"), "signature does not match"),
    (lambda id_: "x" + id_, "signature does not match"),
    (lambda id_: "not an id at all", "malformed"),
    (lambda id_: FeedbackTokens("another-secret-0123456789", ttl_seconds=60).issue(
        json.loads(__import__("base64").urlsafe_b64decode(id_.split(".")[0] + "==="))), "signature does not match"),
])
def test_a_forged_or_malformed_id_is_refused(client, tamper, says):
    id_ = ask(client, "triage")["steering"]["feedback_id"]
    assert_error(send(client, tamper(id_), "yes"), 400, type=INVALID, param="id", code="invalid_feedback", says=says)


def test_an_expired_id_is_refused(tmp_path):
    client = replica(config(tmp_path / "feedback.sqlite", ttl_days=1e-9))
    id_ = ask(client, "triage")["steering"]["feedback_id"]
    assert_error(send(client, id_, "yes"), 400, type=INVALID, param="id", code="invalid_feedback", says="expired")


def test_an_outcome_the_response_cannot_take_is_refused_by_field(client):
    decision = ask(client, "triage")["steering"]["feedback_id"]
    assert_error(send(client, decision, "maybe"), 400, type=INVALID, param="outcome", code="invalid_feedback",
                 says="its true label, one of ['yes', 'no']")
    abstention = ask(client, "qa", max_tokens=3)["steering"]["feedback_id"]
    assert_error(send(client, abstention, "yes"), 400, type=INVALID, param="outcome", code="invalid_feedback",
                 says="'correct' or 'incorrect'")


def test_any_replica_with_the_secret_takes_an_id_another_issued(tmp_path):
    first, second = (replica(config(tmp_path / f"replica-{i}.sqlite")) for i in range(2))
    id_ = ask(first, "triage")["steering"]["feedback_id"]
    assert send(second, id_, "no").json()["status"] == "recorded"


def test_feedback_on_and_no_secret_refuses_to_start(tmp_path, monkeypatch):
    monkeypatch.delenv("STEER_FEEDBACK_SECRET", raising=False)
    raw = config(tmp_path / "feedback.sqlite")
    del raw["feedback"]["secret"]
    with pytest.raises(ConfigError) as refused:
        replica(raw)
    assert refused.value.field == "feedback.secret"
    monkeypatch.setenv("STEER_FEEDBACK_SECRET", SECRET)
    assert ask(replica(raw), "triage")["steering"]["feedback_id"]


def test_the_default_store_lies_beside_the_yaml_file(tmp_path):
    raw = config(tmp_path / "feedback.sqlite")
    del raw["feedback"]["store"]
    assert parse_deployment(raw, root=tmp_path).feedback.store == str((tmp_path / "feedback.sqlite").resolve())


def test_without_a_feedback_section_the_endpoint_says_so(tmp_path):
    client = replica({"base": "fake/base", "experts": EXPERTS, "policies": POLICIES})
    assert "feedback_id" not in ask(client, "triage")["steering"]
    assert_error(send(client, "x.y", "yes"), 400, type=INVALID, param=None, code="invalid_request",
                 says="takes no feedback")


def test_the_reliability_series_count_each_outcome_by_hand(client):
    """qa answers 3 tokens at the fake's probabilities: confidence (0.9 + 0.45 + 0.3) / 3 = 0.55."""
    confidence = sum(token_prob(k) for k in range(3)) / 3
    answered = [ask(client, "qa", max_tokens=3)["steering"] for _ in range(3)]
    withheld = ask(client, "qa", max_tokens=3, steering={"abstain_threshold": 0.9})["steering"]
    assert withheld["abstained"] and not answered[0]["abstained"]
    for steering, outcome in zip([*answered, withheld], ["correct", "incorrect", "incorrect", "correct"]):
        assert send(client, steering["feedback_id"], outcome).status_code == 200
    text = client.get("/metrics").text
    assert metric(text, "steer_feedback_total", policy="qa", bin="0.5") == 4
    assert metric(text, "steer_feedback_correct_total", policy="qa", bin="0.5") == 2
    assert metric(text, "steer_feedback_confidence_total", policy="qa", bin="0.5") == pytest.approx(4 * confidence)
    brier = 2 * (confidence - 1) ** 2 + 2 * confidence ** 2
    assert metric(text, "steer_feedback_brier_total", policy="qa") == pytest.approx(brier)
    assert metric(text, "steer_feedback_over_answering_total", policy="qa") == 2
    assert metric(text, "steer_feedback_over_abstaining_total", policy="qa") == 1
    # A decision: its top calibrated label against the truth; the label probabilities are the fake's.
    decision = ask(client, "triage")["steering"]
    p_no = decision["decision"]["calibrated"]["no"]
    assert p_no == pytest.approx(label_prob(ord("n"), ()) / (label_prob(ord("y"), ()) + label_prob(ord("n"), ())))
    assert send(client, decision["feedback_id"], "no").status_code == 200
    text = client.get("/metrics").text
    assert metric(text, "steer_feedback_correct_total", policy="triage", bin=f"{math.floor(p_no * 10) / 10:.1f}") == 1


def test_a_refit_from_the_outcomes_of_two_replicas_fits_what_calibrate_fits(tmp_path):
    """Platt scaling of qa's raw scores against the outcomes, the two replicas' stores merged."""
    stores = [tmp_path / f"replica-{i}.sqlite" for i in range(2)]
    clients = [replica(config(store)) for store in stores]
    raw, correct = [], []
    for i in range(40):
        client = clients[i % 2]
        steering = ask(client, "qa", prompt="hi" + "x" * (i % 7), max_tokens=1 + i % 5)["steering"]
        right = (i * 7) % 3 != 0
        assert send(client, steering["feedback_id"], "correct" if right else "incorrect").status_code == 200
        if i % 10 == 0:  # sent again to the other replica: its id verifies there, into its own store
            again = send(clients[1 - i % 2], steering["feedback_id"], "correct" if right else "incorrect")
            assert (again.status_code, again.json()["status"]) == (200, "recorded")
        raw.append(steering["abstention"]["raw"])
        correct.append(right)
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(config(stores[0])))
    result = asyncio.run(calibrate_from_feedback(read_deployment(path), "qa", stores, tmp_path / "qa.json"))
    recorded = sorted(zip(raw, correct))  # the store's order is by time; the fit's rows are the same set
    fit, _ = split(40, 0.5, 0)
    first = {}  # per response, the outcome recorded first
    for r in sorted((r for store in stores for r in FeedbackStore(store).outcomes()), key=lambda r: r.recorded):
        first.setdefault(r.key, r)
    assert sorted((r.bound["raw"], r.outcome == "correct") for r in first.values()) == recorded
    ordered = sorted((r.recorded, r.bound["raw"], r.outcome == "correct") for r in first.values())
    scores = np.array([row[1] for row in ordered])
    truth = np.array([row[2] for row in ordered], dtype=float)
    a, b = fits.fit_platt(scores[fit], truth[fit])
    calibration = json.loads(result.calibration_path.read_text())
    assert (calibration["platt_a"], calibration["platt_b"]) == (a, b)
    assert result.report["rows"] == 40 and math.isfinite(a)
    assert result.report["skipped"] == ["4 outcomes sent again to another replica (the first recorded kept)"]


def test_outcomes_acknowledged_before_a_sigkill_are_all_kept(tmp_path):
    """A server killed with SIGKILL in the middle of a stream of feedback loses nothing it answered 2xx."""
    store = tmp_path / "feedback.sqlite"
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(config(store)))
    port = free_port()
    server = ServerProcess.start([sys.executable, "-m", "tests.server.fake_server", str(path), str(port)], port=port,
                                 log=tmp_path / "server.log").wait_ready(60)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    acknowledged: list[str] = []
    try:
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
            ids = [http.post("/v1/completions", json={"model": "triage", "prompt": f"hi {i}"}).json()["steering"]
                   ["feedback_id"] for i in range(200)]

        def feed(chunk: list[str]) -> None:
            with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
                for id_ in chunk:
                    try:
                        if http.post("/v1/feedback", json={"id": id_, "outcome": "yes"}).status_code == 200:
                            acknowledged.append(id_)
                    except httpx.TransportError:
                        return  # the server is gone

        workers = [threading.Thread(target=feed, args=(ids[i::4],)) for i in range(4)]
        for worker in workers:
            worker.start()
        while len(acknowledged) < 60:
            time.sleep(0.005)
        server.process.send_signal(signal.SIGKILL)
        for worker in workers:
            worker.join(timeout=30)
    finally:
        server.process.kill()
    assert 60 <= len(acknowledged) < 200, "killed in the middle of the stream"
    kept = {row[0] for row in sqlite3.connect(store).execute("SELECT id FROM outcomes")}
    assert {hashlib.sha256(id_.encode()).hexdigest() for id_ in acknowledged} <= kept
