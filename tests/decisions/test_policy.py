"""Decision and abstention policies: bad config fails at start-up, clearly; overrides stay in bounds."""

from __future__ import annotations

import json

import pytest
import yaml

from steering.config import load_deployment, parse_deployment
from steering.errors import ConfigError, InvalidSteering
from steering.policy import Overrides, Policies

DECISION = {"labels": ["yes", "no"], "costs": [[0, 10], [1, 0]], "abstain_cost": 0.5, "max_cost": 20}
ABSTAIN = {"score": "mean_prob", "threshold": 0.4, "threshold_bounds": [0.2, 0.8], "message": "Not sure."}


def config(family: dict, **policies) -> dict:
    return {"base": family["base"], "experts": family["experts"], "policies": policies}


def resolved(deployment, tokenizer) -> Policies:
    return Policies.build(deployment, lambda text: tokenizer.encode(text, add_special_tokens=False))


def refused(family, field: str, reason: str, **policies) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_deployment(config(family, **policies))
    assert caught.value.field == field
    assert reason in caught.value.reason


def test_cost_matrix_of_the_wrong_shape(llama_family):
    bad = {**DECISION, "costs": [[0, 10, 3], [1, 0, 3]]}
    refused(llama_family, "policies.triage.decision", "must be a 2 x 2 matrix", triage={"decision": bad})
    refused(llama_family, "policies.triage.decision", "must be a 2 x 2 matrix",
            triage={"decision": {**DECISION, "costs": [[0, 1]]}})


def test_cost_forms(llama_family):
    refused(llama_family, "policies.t.decision", "either costs", t={"decision": {"labels": ["a", "b"]}})
    refused(llama_family, "policies.t.decision", "not both",
            t={"decision": {**DECISION, "cost_fp": 1, "cost_fn": 2}})
    refused(llama_family, "policies.t.decision", "exactly 2 labels",
            t={"decision": {"labels": ["a", "b", "c"], "cost_fp": 1, "cost_fn": 2}})
    refused(llama_family, "policies.t.decision", "distinct", t={"decision": {**DECISION, "labels": ["a", "a"]}})
    binary = parse_deployment(config(llama_family, t={"decision": {"labels": ["pos", "neg"], "cost_fp": 1, "cost_fn": 9}}))
    assert binary.policies["t"].decision.cost_matrix().costs == ((0.0, 1.0), (9.0, 0.0))


def test_negative_or_too_high_threshold(llama_family):
    refused(llama_family, "policies.qa.abstain.threshold", "greater than or equal to 0",
            qa={"abstain": {**ABSTAIN, "threshold": -0.1}})
    refused(llama_family, "policies.qa.abstain.threshold", "less than or equal to 1",
            qa={"abstain": {**ABSTAIN, "threshold": 1.5}})
    refused(llama_family, "policies.qa.abstain.threshold", "required", qa={"abstain": {"score": "min_prob"}})
    refused(llama_family, "policies.qa.abstain.score", "Input should be", qa={"abstain": {**ABSTAIN, "score": "vibes"}})
    refused(llama_family, "policies.qa.abstain", "low <= high",
            qa={"abstain": {**ABSTAIN, "threshold_bounds": [0.8, 0.2]}})


def test_a_claim_check_has_two_labels_and_needs_no_label_tokens(llama_family, tokenizer):
    refused(llama_family, "policies.check.decision", "exactly 2 labels",
            check={"decision": {**DECISION, "claim": True, "labels": ["a", "b", "c"], "costs": [[0] * 3] * 3}})
    # Labels that share a first token are fine: a claim check scores the claim, not the labels.
    deployment = parse_deployment(config(llama_family, check={"decision": {**DECISION, "claim": True,
                                                                           "labels": ["the model", "the moon"]}}))
    rule = resolved(deployment, tokenizer)["check"].rule
    assert rule.checks_claims and rule.label_token_ids == ()


def test_a_claim_goes_to_a_claim_check_only(llama_family, tokenizer):
    deployment = parse_deployment(config(llama_family, check={"decision": {**DECISION, "claim": True}},
                                         triage={"decision": DECISION}, qa={"abstain": ABSTAIN}))
    policies = resolved(deployment, tokenizer)
    steering = policies["check"].resolve(Overrides(claim=" Quellton", costs=[[0, 2], [3, 0]]))
    assert steering.claim == " Quellton" and steering.rule.checks_claims
    assert steering.rule.costs.matrix().tolist() == [[0, 2], [3, 0], [0.5, 0.5]]
    for policy, claim, reason in (("check", None, "give steering.claim"), ("check", " ", "the claim is empty"),
                                  ("triage", "yes", "does not check claims"), ("qa", "yes", "does not check claims")):
        with pytest.raises(InvalidSteering, match=reason) as caught:
            policies[policy].resolve(Overrides(claim=claim))
        assert caught.value.param == "steering.claim"
    assert policies["triage"].resolve().claim is None


def test_a_policy_abstains_or_decides(llama_family):
    refused(llama_family, "policies.both", "either abstains or decides", both={"abstain": ABSTAIN, "decision": DECISION})


def test_labels_that_share_a_first_token_are_refused_at_load(llama_family, tmp_path):
    path = tmp_path / "deploy.yaml"
    labels = {**DECISION, "labels": ["the model", "the moon"]}
    path.write_text(yaml.safe_dump(config(llama_family, triage={"decision": labels})))
    with pytest.raises(ConfigError) as caught:
        load_deployment(path)
    assert caught.value.field == "policies.triage.decision.labels"
    assert "share their first token" in caught.value.reason


def test_calibration_files_are_loaded_and_must_fit_the_policy(llama_family, tokenizer, tmp_path):
    good = {"kind": "decision", "policy": "triage", "temperature": 1.7, "labels": ["yes", "no"]}
    (tmp_path / "calib.json").write_text(json.dumps(good))
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(config(llama_family, triage={"decision": DECISION, "calibration": "calib.json"})))
    assert resolved(load_deployment(path), tokenizer)["triage"].rule.temperature == 1.7
    (tmp_path / "calib.json").write_text(json.dumps({**good, "bias": [0.25, 0.0]}))
    rule = resolved(load_deployment(path), tokenizer)["triage"].resolve(Overrides(costs=[[0, 1], [1, 0]])).rule
    assert (rule.temperature, rule.bias) == (1.7, (0.25, 0.0)), "a cost override keeps the calibration"

    for bad in ({**good, "labels": ["no", "yes"]}, {**good, "bias": [0.25]}):
        (tmp_path / "calib.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError) as caught:
            load_deployment(path)
        assert caught.value.field == "policies.triage.calibration"
    path.write_text(yaml.safe_dump(config(llama_family, triage={"decision": DECISION, "calibration": "missing.json"})))
    with pytest.raises(ConfigError, match="policies.triage.calibration: .*cannot read calibration file"):
        load_deployment(path)


def test_a_calibrated_threshold_stands_in_for_a_missing_one(llama_family, tokenizer, tmp_path):
    calibration = {"kind": "abstention", "policy": "qa", "score": "min_prob", "platt_a": 2.0, "platt_b": 0.5, "threshold": 0.3}
    (tmp_path / "qa.json").write_text(json.dumps(calibration))
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(config(llama_family, qa={"abstain": {"score": "min_prob"}, "calibration": "qa.json"})))
    policy = resolved(load_deployment(path), tokenizer)["qa"]
    assert policy.resolve().rule.threshold == 0.3


def test_a_fitted_score_needs_its_weights_from_a_calibration_file(llama_family, tokenizer, tmp_path):
    path = tmp_path / "deploy.yaml"
    fitted = {"abstain": {"score": "base_familiarity_fit", "threshold": 0.5}}
    path.write_text(yaml.safe_dump(config(llama_family, qa=fitted)))
    with pytest.raises(ConfigError) as caught:
        load_deployment(path)
    assert caught.value.field == "policies.qa.calibration" and "steer calibrate" in caught.value.reason
    calibration = {"kind": "abstention", "policy": "qa", "score": "base_familiarity_fit", "weights": [0.1] * 24}
    (tmp_path / "qa.json").write_text(json.dumps(calibration))
    path.write_text(yaml.safe_dump(config(llama_family, qa={**fitted, "calibration": "qa.json"})))
    assert resolved(load_deployment(path), tokenizer)["qa"].rule.calibration.weights == [0.1] * 24
    for bad, reason in (({**calibration, "weights": [0.1] * 23}, "needs 24 weights, intercept last; the file has 23"),
                        ({**calibration, "weights": None}, "the file has 0"),
                        ({**calibration, "score": "base_familiarity"}, "weights are for the fitted scores")):
        (tmp_path / "qa.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=reason) as caught:
            load_deployment(path)
        assert caught.value.field == "policies.qa.calibration"


def test_threshold_and_cost_overrides_stay_within_bounds(llama_family, tokenizer):
    deployment = parse_deployment(config(llama_family, qa={"abstain": ABSTAIN}, triage={"decision": DECISION},
                                         fixed={"decision": {**DECISION, "max_cost": None}}))
    policies = resolved(deployment, tokenizer)
    qa, triage = policies["qa"], policies["triage"]

    def threshold(policy, value):
        return policy.resolve(Overrides(abstain_threshold=value)).rule.threshold

    def costs(policy, matrix, abstain_cost):
        return policy.resolve(Overrides(costs=matrix, abstain_cost=abstain_cost)).rule.costs

    assert qa.resolve().rule.threshold == 0.4
    assert threshold(qa, 0.8) == 0.8
    with pytest.raises(InvalidSteering, match="outside this policy's bounds"):
        threshold(qa, 0.9)
    with pytest.raises(InvalidSteering, match="does not abstain"):
        threshold(triage, 0.5)
    assert costs(triage, [[0, 2], [3, 0]], 1.0).matrix().tolist() == [[0, 2], [3, 0], [1, 1]]
    with pytest.raises(InvalidSteering, match=r"outside this policy's bounds \[0, 20"):
        costs(triage, [[0, 21], [3, 0]], None)
    with pytest.raises(InvalidSteering, match="2 x 2"):
        costs(triage, [[0, 2, 1], [3, 0, 1]], None)
    with pytest.raises(InvalidSteering, match="finite"):
        costs(triage, None, float("nan"))
    with pytest.raises(InvalidSteering, match="does not allow cost overrides"):
        costs(policies["fixed"], [[0, 1], [1, 0]], None)
    with pytest.raises(InvalidSteering, match="makes no decisions"):
        costs(qa, [[0, 1], [1, 0]], None)


def test_label_token_ids_are_resolved_once_at_start_up(llama_family, tokenizer):
    policies = resolved(parse_deployment(config(llama_family, triage={"decision": DECISION})), tokenizer)
    rule = policies["triage"].rule
    assert rule.label_token_ids == (tokenizer.encode("yes", add_special_tokens=False)[0],
                                    tokenizer.encode("no", add_special_tokens=False)[0])
    assert policies["triage"].resolve(Overrides(abstain_cost=0.7)).rule.label_token_ids is rule.label_token_ids
