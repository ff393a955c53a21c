"""A stated risk, certified by Learn-then-Test: the threshold keeps it on new rows as often as
promised, a risk the rows cannot certify is refused saying so, and a policy serves only the
risk its calibration certifies."""

from __future__ import annotations

import numpy as np
import pytest
from steering_tools.calibrate import certify

from steering.config import RiskTarget, parse_deployment
from steering.errors import ConfigError

EPSILON, DELTA = 0.15, 0.1


def calibrated_rows(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Confidences that are calibrated: an answer at confidence c is right with probability c."""
    confidence = rng.beta(6, 1, size=n)
    return confidence, rng.uniform(size=n) < confidence


def test_the_certified_threshold_keeps_the_risk_on_new_rows_as_often_as_promised():
    violations, refused, splits = 0, 0, 300
    for seed in range(splits):
        rng = np.random.default_rng(seed)
        try:
            certificate = certify(*calibrated_rows(rng, 400), RiskTarget(epsilon=EPSILON, delta=DELTA),
                                  "error among answered")
        except ConfigError:  # nothing served with a claim: no violation, but the test must not go hollow
            refused += 1
            continue
        confidence, correct = calibrated_rows(rng, 4000)
        answered = confidence >= certificate.threshold
        violations += float(1 - correct[answered].mean()) > EPSILON
    assert refused <= splits // 10
    # At most delta, up to sampling error over the splits (3 standard errors).
    assert violations / splits <= DELTA + 3 * np.sqrt(DELTA * (1 - DELTA) / splits)


def test_the_certificate_says_what_it_certifies_on_its_rows():
    confidence, correct = calibrated_rows(np.random.default_rng(7), 400)
    certificate = certify(confidence, correct, RiskTarget(epsilon=EPSILON, delta=DELTA), "error among answered")
    answered = confidence >= certificate.threshold
    assert (certificate.epsilon, certificate.delta, certificate.n) == (EPSILON, DELTA, 400)
    assert certificate.coverage == answered.mean() > 0
    assert 1 - correct[answered].mean() <= EPSILON, "on its own rows the error among answered is below epsilon"


def test_a_risk_the_rows_cannot_certify_is_refused_saying_so():
    confidence, correct = calibrated_rows(np.random.default_rng(0), 30)
    with pytest.raises(ConfigError) as refused:
        certify(confidence, correct, RiskTarget(epsilon=0.01, delta=0.05), "error among answered")
    assert refused.value.field == "data"
    assert "cannot certify error among answered <= 0.01 at delta 0.05 on the 30 held-out rows" in refused.value.reason
    assert "no epsilon below" in refused.value.reason


CERTIFIED = {"kind": "abstention", "policy": "qa", "score": "mean_prob", "platt_a": 1.0, "platt_b": 0.0,
             "threshold": 0.8, "certificate": {"risk": "error among answered", "epsilon": 0.1, "delta": 0.1,
                                               "threshold": 0.8, "n": 200, "coverage": 0.4, "method": "LTT"}}


def deployment(abstain: dict, calibration: dict | None) -> dict:
    policy = {"abstain": abstain} | ({"calibration": calibration} if calibration else {})
    return {"base": "fake/base", "policies": {"qa": policy}}


@pytest.mark.parametrize(("abstain", "calibration", "says"), [
    ({"risk": {"epsilon": 0.1}}, None, "required: a stated risk is kept by the threshold its calibration certifies"),
    ({"risk": {"epsilon": 0.05, "delta": 0.1}}, CERTIFIED, "certifies epsilon 0.1 at delta 0.1, and the policy states 0.05"),
    ({"risk": {"epsilon": 0.1}}, {**CERTIFIED, "certificate": None}, "certifies no risk"),
    ({"risk": {"epsilon": 0.1}, "threshold": 0.5}, CERTIFIED, "set neither threshold nor threshold_bounds"),
])
def test_a_policy_serves_only_the_risk_its_calibration_certifies(abstain, calibration, says):
    with pytest.raises(ConfigError) as refused:
        parse_deployment(deployment(abstain, calibration))
    assert says in str(refused.value)


def test_a_certified_policy_serves_its_certified_threshold():
    served = parse_deployment(deployment({"risk": {"epsilon": 0.1, "delta": 0.1}}, CERTIFIED))
    assert served.policies["qa"].calibration.certificate.threshold == 0.8
