"""A stated risk, certified by Learn-then-Test: the threshold keeps it on new rows as often as
promised, a risk the rows cannot certify is refused saying so, and a policy serves only the
risk its calibration certifies."""

from __future__ import annotations

import numpy as np
import pytest
from steering_tools.calibrate import certify

from steering.config import RiskTarget, parse_deployment
from steering.errors import ConfigError
from steering.policy import Policies

EPSILON, DELTA = 0.15, 0.1


def calibrated_rows(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Confidences that are calibrated: an answer at confidence c is right with probability c."""
    confidence = rng.beta(6, 1, size=n)
    return confidence, rng.uniform(size=n) < confidence


def test_the_certified_threshold_keeps_the_risk_on_new_rows_as_often_as_promised():
    violations, refused, splits = 0, 0, 200
    for seed in range(splits):
        rng = np.random.default_rng(seed)
        try:
            certificate = certify(*calibrated_rows(rng, 400), RiskTarget(epsilon=EPSILON, delta=DELTA),
                                  "error among answered", learn=calibrated_rows(rng, 400))
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
    rng = np.random.default_rng(7)
    confidence, correct = calibrated_rows(rng, 400)
    certificate = certify(confidence, correct, RiskTarget(epsilon=EPSILON, delta=DELTA), "error among answered",
                          learn=calibrated_rows(rng, 400))
    answered = confidence >= certificate.threshold
    assert (certificate.epsilon, certificate.delta, certificate.n) == (EPSILON, DELTA, 400)
    assert certificate.coverage == answered.mean() > 0
    assert 1 - correct[answered].mean() <= EPSILON, "on its own rows the error among answered is below epsilon"


def test_a_risk_the_rows_cannot_certify_is_refused_saying_so():
    rng = np.random.default_rng(0)
    confidence, correct = calibrated_rows(rng, 30)
    with pytest.raises(ConfigError) as refused:
        certify(confidence, correct, RiskTarget(epsilon=0.01, delta=0.05), "error among answered",
                learn=calibrated_rows(rng, 30))
    assert refused.value.field == "data"
    assert "cannot certify error among answered <= 0.01 at delta 0.05 on the 30 held-out rows" in refused.value.reason
    # 30 rows all answered and all right: Hoeffding's p-value (its tight form, exp(-n KL(0 || epsilon)))
    # is (1 - epsilon)^30, which reaches 0.05 at epsilon = 1 - 0.05^(1/30) = 0.0950 (Bentkus' is
    # e times as large); the first level of the 0.001 grid past it is 0.096.
    assert "certify no epsilon below 0.096)" in refused.value.reason


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


def test_a_stated_risk_is_fitted_the_first_time_withholding_nothing_meanwhile():
    """`steer calibrate` reads the config before any calibration file exists: the policy collects."""
    fitting = parse_deployment(deployment({"score": "base_familiarity_fit", "risk": {"epsilon": 0.1}}, None),
                               calibrating=True)
    rule = Policies.build(fitting, lambda text: [ord(c) for c in text])["qa"].rule
    assert (rule.threshold, rule.at_first_token) == (None, False)


def bench_rows(n: int, seed: int = 0):
    """Answers as `steer bench quality` holds them (a one-token answer's steered logprob; `mean_prob`
    reads its probability) and whether each is right, calibrated as above."""
    confidence, correct = calibrated_rows(np.random.default_rng(seed), n)
    return [([float(np.log(c))], None) for c in confidence], correct.astype(float)


def test_the_bench_checks_the_stated_risk_split_by_split_by_hand():
    from steering_tools.bench import risk
    from steering_tools.calibrate import fit_abstention, split

    from steering.config import PolicyConfig
    from steering.rules.calibration import platt

    epsilon = 0.25  # certifiable on every split of these rows: the first one is checked by hand
    config = PolicyConfig.model_validate({"abstain": {"score": "mean_prob", "risk": {"epsilon": epsilon,
                                                                                     "delta": DELTA}}})
    answers, correct = bench_rows(800)
    report = risk.guarantee("qa", config, answers, correct, splits=40, seed=3)
    assert (report["splits"], report["rows"], report["epsilon"], report["delta"]) == (40, 800, epsilon, DELTA)
    assert (report["judged"], report["refused"]) == (40, 0)

    # The first split again, by hand: half the rows calibrate (fit, then certify on their other
    # half), the other half judge the certified threshold and the cost-fitted one.
    order = np.random.default_rng(3).permutation(800)
    calibration_rows, test_rows = order[:400], order[400:]
    fit, held = split(400, 0.5, seed=0)
    calibration, fitted_report, _ = fit_abstention("qa", config, [answers[i] for i in calibration_rows],
                                                   correct[calibration_rows], fit, held, bins=10)
    confidence = platt(np.exp([answers[i][0][0] for i in test_rows]), calibration.platt_a, calibration.platt_b)
    answered = confidence >= calibration.threshold
    assert calibration.threshold == calibration.certificate.threshold
    assert report["test_risks"][0] == pytest.approx(1 - correct[test_rows][answered].mean())
    assert report["certified_coverages"][0] == pytest.approx(answered.mean())
    assert report["fitted_coverages"][0] == pytest.approx(np.mean(confidence >= fitted_report["threshold"]))
    exceeded = sum(r > epsilon for r in report["test_risks"])
    assert report["exceeded"] == exceeded and report["exceeded_share"] == exceeded / report["judged"]
    assert report["coverage"]["given_up"] == pytest.approx(
        np.mean(np.array(report["fitted_coverages"]) - report["certified_coverages"]))
    # Calibrated rows keep the guarantee: the binomial test does not reject "at most delta".
    assert report["holds"] is True and report["p_value"] >= 0.05


def test_the_bench_reports_a_risk_nothing_certifies_as_refused_on_every_split():
    from steering_tools.bench import risk

    from steering.config import PolicyConfig

    config = PolicyConfig.model_validate({"abstain": {"score": "mean_prob", "risk": {"epsilon": 0.01,
                                                                                     "delta": 0.01}}})
    report = risk.guarantee("qa", config, *bench_rows(60), splits=5)
    assert (report["refused"], report["judged"], report["exceeded_share"], report["holds"]) == (5, 0, None, None)
