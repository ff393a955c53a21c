"""`steer calibrate` end to end: real engine, labelled JSONL, calibration file, report, plots."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from steering_tools import metrics
from steering_tools.calibrate import is_correct, read_rows, split
from steering_tools.fixtures import corpus

from steering.config import load_deployment
from steering.errors import ConfigError
from steering.rules.abstention import familiarity_profile
from steering.rules.calibration import Calibration
from steering.rules.decisions import softmax
from tests.live_server import API_KEY

STEER = str(Path(sys.executable).parent / "steer")
LABELS = ["yes", "no", "cat"]
ALPHA = {"chat": 1.0}
TRUE_TEMPERATURE = 3.0
CLAIM_LABELS = ["true", "false"]
CLAIM_PLATT = (0.3, 5.0)  # the truth's p(true) from the claim's probability p: sigmoid(0.3 logit p + 5)


def logit_of(logprob: float) -> float:
    return logprob - math.log(-math.expm1(logprob))


def sigmoid(x: float, a: float, b: float) -> float:
    return 1 / (1 + math.exp(-(a * x + b)))


def test_malformed_rows_are_reported_with_their_line_and_skipped(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([
        '{"prompt": "a", "label": "yes"}',
        "not json",
        '{"prompt": "b"}',
        "",
        '{"prompt": "c", "messages": [{"role": "user", "content": "c"}], "label": "no"}',
        '[1, 2]',
        '{"messages": [{"role": "user", "content": "d"}], "label": "maybe", "id": 7}',
        '{"messages": [{"role": "user", "content": "e"}], "label": "no", "id": 8}',
    ]))
    data = read_rows(path, lambda r: None if r.label in LABELS else f"label {r.label!r} is not one of {LABELS}")
    assert data.line_numbers == [1, 8]
    assert [s.split(":")[0] for s in data.skipped] == ["line 2", "line 3", "line 5", "line 6", "line 7"]
    assert "not JSON" in data.skipped[0]
    assert "label None" in data.skipped[1]
    assert "exactly one of prompt and messages" in data.skipped[2]
    assert "'maybe' is not one of" in data.skipped[4]


def test_split_is_seeded_and_disjoint():
    fit, held = split(10, 0.5, seed=3)
    again = split(10, 0.5, seed=3)
    assert (fit.tolist(), held.tolist()) == (again[0].tolist(), again[1].tolist())
    assert sorted(fit.tolist() + held.tolist()) == list(range(10))
    assert split(10, 0.5, seed=4)[0].tolist() != fit.tolist()


@pytest.mark.parametrize(
    ("generated", "answer", "right"),
    [("Paris", "paris", True), ("Paris. It is big", "paris", True), ("Parisian", "paris", False),
     (" no ", "No.", True), ("yes", "no", False)],
)
def test_answers_are_matched_at_word_boundaries(generated, answer, right):
    assert is_correct(generated, answer) is right


@pytest.fixture(scope="module")
def calibration_setup(llama_family, llama_reference, tokenizer, tmp_path_factory):
    """A deployment with a decision and an abstention policy, and labelled data for each."""
    root = tmp_path_factory.mktemp("calibrate")
    config = {
        "base": llama_family["base"],
        "experts": llama_family["experts"],
        "policies": {
            "triage": {"alpha": ALPHA,
                       "decision": {"labels": LABELS, "costs": [[0, 1, 1], [1, 0, 1], [1, 1, 0]], "abstain_cost": 0.6}},
            "qa": {"alpha": ALPHA, "abstain": {"score": "mean_prob", "threshold": 0.5}},
            "qa-base": {"alpha": ALPHA, "abstain": {"score": "base_prob", "threshold": 0.5}},
            # Served only with the weights `steer calibrate` fits; calibrating it needs none.
            "qa-profile": {"alpha": ALPHA, "abstain": {"score": "base_familiarity_fit", "threshold": 0.5}},
            "check": {"alpha": ALPHA, "decision": {"claim": True, "labels": CLAIM_LABELS, "cost_fp": 4, "cost_fn": 1}},
        },
        "engine": {"dtype": "float32", "max_model_len": 256, "enforce_eager": True, "kv_cache_gib": 0.25},
    }
    (root / "deploy.yaml").write_text(yaml.safe_dump(config))
    prompts = corpus()[::9][:160]
    ids = [tokenizer.encode(p) for p in prompts]
    label_ids = [tokenizer.encode(label, add_special_tokens=False)[0] for label in LABELS]
    logprobs = llama_reference.next_token_logprobs(ids, [ALPHA] * len(ids))[:, label_ids].numpy()
    rng = np.random.default_rng(0)
    truth = [LABELS[rng.choice(3, p=softmax(z / TRUE_TEMPERATURE))] for z in logprobs]
    rows = [json.dumps({"prompt": p, "label": y}) for p, y in zip(prompts, truth)]
    rows.insert(5, "{broken")
    (root / "labels.jsonl").write_text("\n".join(rows))
    # Abstention data: the policy's own greedy answer for half the prompts, a wrong one for the rest.
    answers = llama_reference.generate(ids[:40], [ALPHA] * 40, max_tokens=6)
    qa = [{"prompt": p, "answer": tokenizer.decode(a, skip_special_tokens=True) if i % 2 else "zebra crossing"}
          for i, (p, a) in enumerate(zip(prompts[:40], answers))]
    (root / "answers.jsonl").write_text("\n".join(json.dumps(row) for row in qa))
    # Claims: each prompt's own greedy answer or another prompt's. The reference's probability of
    # each (its tokens, then EOS) is far from calibrated for the truth drawn from CLAIM_PLATT of it.
    claims = [tokenizer.decode(answers[i if i % 2 else (i + 1) % 40][:3]) for i in range(40)]
    assert all(claim.strip() for claim in claims)
    said = [sum(llama_reference.completion_logprobs(
        p, tokenizer.encode(claim, add_special_tokens=False) + [tokenizer.eos_token_id], ALPHA))
        for p, claim in zip(ids, claims)]
    truth = [CLAIM_LABELS[0] if rng.random() < sigmoid(logit_of(z), *CLAIM_PLATT) else CLAIM_LABELS[1] for z in said]
    rows = [{"prompt": p, "claim": claim, "label": y} for p, claim, y in zip(prompts, claims, truth)]
    rows.insert(3, {"prompt": prompts[0], "label": "true"})  # no claim: skipped, by line
    (root / "claims.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    (root / "claims.reference.json").write_text(json.dumps(said))
    return root


def run_calibrate(root: Path, policy: str, data: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [STEER, "calibrate", "--config", str(root / "deploy.yaml"), "--policy", policy, "--data", str(root / data),
         "--out", str(root / f"{policy}.json"), *extra],
        capture_output=True, text=True, timeout=600,
    )


def calibrated(root: Path, policy: str, data: str, *extra: str) -> tuple[str, Calibration, dict]:
    """A successful `steer calibrate` run: what it printed, the calibration file and the report."""
    result = run_calibrate(root, policy, data, *extra)
    assert result.returncode == 0, result.stderr
    report = json.loads((root / f"{policy}.report.json").read_text())
    return result.stdout, Calibration.read(root / f"{policy}.json"), report


def served_config(root: Path, *policies: str) -> dict:
    """The setup's deployment with only `policies`: a server refuses `qa-profile` until it is fitted."""
    config = yaml.safe_load((root / "deploy.yaml").read_text())
    config["policies"] = {name: config["policies"][name] for name in policies}
    return config


def test_calibrating_a_decision_policy(calibration_setup):
    root = calibration_setup
    printed, calibration, report = calibrated(root, "triage", "labels.jsonl")
    assert "skipped line 6: not JSON" in printed
    assert calibration.kind == "decision" and calibration.labels == LABELS
    assert calibration.temperature == pytest.approx(report["temperature"])
    assert report["rows"] == 160 and report["fit_rows"] + report["held_out_rows"] == 160
    # Labels were drawn at temperature 3: the fit must soften the model, and help on held-out data.
    assert calibration.temperature > 1.5
    assert report["calibrated"]["nll"] < report["raw"]["nll"]
    assert report["calibrated"]["ece"] < report["raw"]["ece"]
    assert set(report["expected_cost"]) == {"argmax", "bayes_raw", "bayes_calibrated", "always_abstain"}
    assert report["expected_cost"]["always_abstain"] == 0.6
    assert {r["coverage"] for r in report["raw"]["risk_coverage"]} >= {1.0}
    for plot in ("triage.reliability.png", "triage.risk-coverage.png"):
        assert (root / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The file plugs into the policy.
    config = served_config(root, "triage")
    config["policies"]["triage"]["calibration"] = "triage.json"
    (root / "calibrated.yaml").write_text(yaml.safe_dump(config))
    assert load_deployment(root / "calibrated.yaml").policies["triage"].calibration.temperature == calibration.temperature


@pytest.mark.parametrize(("policy", "score", "other"), [("qa", "mean_prob", "qa-base"), ("qa-base", "base_prob", "qa"),
                                                       ("qa-profile", "base_familiarity_fit", "qa")])
def test_calibrating_an_abstention_policy(calibration_setup, llama_reference, tokenizer, policy, score, other):
    root = calibration_setup
    printed, calibration, report = calibrated(root, policy, "answers.jsonl", "--max-tokens", "6")
    assert calibration.kind == "abstention" and calibration.score == score == report["score"]
    assert calibration.threshold == report["threshold"]
    # Odd rows carry the policy's own greedy answer (right), even rows a wrong one: whatever the score.
    _, held = split(40, 0.5, seed=0)
    assert report["raw"]["accuracy"] == pytest.approx(float(np.mean(held % 2)))
    assert set(report["expected_cost"]) == {"always_answer", "bayes_raw", "bayes_calibrated", "fitted_threshold",
                                            "always_abstain"}
    assert "wrote" in printed
    fit, _ = split(40, 0.5, seed=0)
    if score == "base_familiarity_fit":
        # The weights are the logistic fit, on the fit rows, of right (odd rows) on the profile of
        # the base alone's prompt logprobs; the rows were written from the corpus's first prompts.
        prompts = [json.loads(line)["prompt"] for line in (root / "answers.jsonl").read_text().splitlines()]
        profiles = [familiarity_profile(llama_reference.prompt_logprobs(tokenizer.encode(prompts[i]), {})) for i in fit]
        assert calibration.weights == report["weights"] == pytest.approx(
            metrics.fit_weights(np.stack(profiles), fit % 2), abs=1e-3)
        assert f"{score} weights: " in printed
        # The fit is the calibration: no Platt map on top, so raw and calibrated agree.
        assert (calibration.platt_a, calibration.platt_b) == (1.0, 0.0)
        assert report["calibrated"]["ece"] == pytest.approx(report["raw"]["ece"])
    else:
        assert calibration.weights is None and report["weights"] is None
    # The file plugs into the policy it was fitted for, and is refused by one with another score.
    config = served_config(root, policy, other)
    config["policies"][policy]["calibration"] = f"{policy}.json"
    (root / "fitted.yaml").write_text(yaml.safe_dump(config))
    assert load_deployment(root / "fitted.yaml").policies[policy].calibration.score == score
    config["policies"][other]["calibration"] = f"{policy}.json"
    (root / "mismatched.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=f"score {score!r}, not for score"):
        load_deployment(root / "mismatched.yaml")


def test_calibrating_a_claim_check(calibration_setup):
    root = calibration_setup
    printed, calibration, report = calibrated(root, "check", "claims.jsonl")
    assert "skipped line 4: no claim (this policy checks claims)" in printed
    assert calibration.kind == "decision" and calibration.labels == CLAIM_LABELS and report["rows"] == 40
    # Platt scaling of the claims' probabilities on the fit rows, stored as T = 1 / a and a bias b on the claim.
    said = json.loads((root / "claims.reference.json").read_text())
    rows = [json.loads(line) for line in (root / "claims.jsonl").read_text().splitlines()]
    truth = np.array([row["label"] == "true" for row in rows if "claim" in row])
    assert 0.2 < truth.mean() < 0.8, "the drawn truth is mixed"
    fit, _ = split(40, 0.5, seed=0)
    a, b = metrics.fit_logistic(np.array([logit_of(z) for z in said])[fit], truth[fit], min_slope=1e-3)
    assert (calibration.temperature, *calibration.bias) == pytest.approx((1 / a, b, 0.0), rel=1e-2, abs=1e-2)
    assert report["bias"] == calibration.bias
    assert report["calibrated"]["nll"] < report["raw"]["nll"]


def test_an_unlabelled_policy_cannot_be_calibrated(calibration_setup, tmp_path):
    root = calibration_setup
    config = yaml.safe_load((root / "deploy.yaml").read_text())
    config["policies"]["plain"] = {"alpha": ALPHA}
    (tmp_path / "deploy.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "labels.jsonl").write_text((root / "labels.jsonl").read_text())
    result = run_calibrate(tmp_path, "plain", "labels.jsonl")
    assert result.returncode == 2
    assert "policies.plain: only decision and abstention policies are calibrated" in result.stderr


def test_calibrates_own_engine_dies_with_it(calibration_setup):
    """`steer calibrate` killed with SIGKILL (its engine up and scoring) leaves no engine process behind."""
    root = calibration_setup
    command = [STEER, "calibrate", "--config", str(root / "deploy.yaml"), "--policy", "qa", "--data",
               str(root / "answers.jsonl"), "--out", str(root / "killed.json")]
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not any("EngineCore" in " ".join(child.cmdline()) or "EngineCore" in child.name()
                      for child in psutil.Process(job.pid).children(recursive=True)):
            assert job.poll() is None and time.monotonic() < deadline, "the engine never started"
            time.sleep(0.5)
        engine = {child.pid for child in psutil.Process(job.pid).children(recursive=True)}
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=30)
        deadline = time.monotonic() + 30
        while alive := [pid for pid in engine if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]:
            assert time.monotonic() < deadline, f"engine processes {alive} outlived steer calibrate"
            time.sleep(0.2)
    finally:
        job.kill()


@pytest.mark.parametrize(("policy", "data"), [("qa-profile", "answers.jsonl"), ("check", "claims.jsonl"),
                                              ("triage", "labels.jsonl")])
def test_calibrating_through_the_server_writes_the_file_the_in_process_fit_writes(calibration_setup, server, policy,
                                                                                  data):
    """The server holds the only engine: `--server` scores every row there (the policy run by its
    kind, its evidence returned) and fits exactly what an engine of its own would have given."""
    root = calibration_setup
    files = {}
    for way, extra in (("in-process", []), ("server", ["--server", f"{server.url}/v1", "--api-key", API_KEY])):
        out = root / f"{policy}.{way}.json"
        result = subprocess.run([STEER, "calibrate", "--config", str(root / "deploy.yaml"), "--policy", policy,
                                 "--data", str(root / data), "--out", str(out), *extra],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        files[way] = out.read_bytes()
    assert files["server"] == files["in-process"]


def test_a_server_refusal_is_shown_with_the_servers_message_and_the_rows_line(calibration_setup, server, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "the moon", "answer": "x"}\n\n{"prompt": "' + "the moon " * 1500 + '", "answer": "x"}\n')
    result = subprocess.run([STEER, "calibrate", "--config", str(calibration_setup / "deploy.yaml"), "--policy", "qa",
                             "--data", str(data), "--out", str(tmp_path / "qa.json"), "--server", f"{server.url}/v1",
                             "--api-key", API_KEY], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert "--server: line 3: the server refused it (400): the prompt has" in result.stderr
    assert "this model's context is 1024" in result.stderr
