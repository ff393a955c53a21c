"""The decision rules against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from steering.rules.abstention import Abstention, FirstStep, confidence_score, familiarity_profile
from steering.rules.decisions import (
    ABSTAIN,
    CostMatrix,
    bayes_action,
    bayes_decision,
    claim_label_logprobs,
    expected_costs,
    label_first_tokens,
)


@pytest.mark.parametrize(
    ("probs", "costs", "expected", "action"),
    [
        # 0-1 costs: the Bayes action is the argmax.
        ([0.7, 0.3], [[0, 1], [1, 0]], [0.3, 0.7], 0),
        # A missed positive costs 10x a false alarm: act "positive" from p = 1/11 on.
        ([0.2, 0.8], [[0, 1], [10, 0]], [0.8, 2.0], 0),
        # ...and the other way round: acting on the likelier label is the costlier choice.
        ([0.7, 0.3], [[0, 10], [1, 0]], [3.0, 0.7], 1),
        # Three labels, a costly first action: the second wins although the first is likelier.
        ([0.5, 0.3, 0.2], [[0, 5, 5], [1, 0, 1], [1, 1, 0]], [2.5, 0.7, 0.8], 1),
        # With an abstain row of cost 0.5 (Chow's rule), abstaining beats both labels.
        ([0.6, 0.4], [[0, 1], [1, 0], [0.5, 0.5]], [0.4, 0.6, 0.5], 0),
        ([0.55, 0.45], [[0, 2], [2, 0], [0.5, 0.5]], [0.9, 1.1, 0.5], 2),
    ],
)
def test_bayes_action_by_hand(probs, costs, expected, action):
    assert expected_costs(np.array(costs), np.array(probs)).tolist() == pytest.approx(expected)
    assert bayes_action(np.array(costs), np.array(probs)) == action


def test_decide_reports_raw_calibrated_mass_and_costs():
    logprobs = [math.log(0.3), math.log(0.1)]  # 40% of the next-token mass on the labels
    costs = CostMatrix(("yes", "no"), ((0.0, 10.0), (1.0, 0.0)), abstain_cost=0.5)
    decision = bayes_decision(logprobs, costs, temperature=2.0)
    assert decision.probabilities == pytest.approx((0.75, 0.25))
    # softmax(log p / 2) = sqrt(p) renormalised: sqrt(.3) / (sqrt(.3) + sqrt(.1))
    yes = math.sqrt(0.3) / (math.sqrt(0.3) + math.sqrt(0.1))
    assert decision.calibrated == pytest.approx((yes, 1 - yes))
    assert decision.label_mass == pytest.approx(0.4)
    assert decision.expected_costs == pytest.approx((10 * (1 - yes), yes, 0.5))  # yes ~ .634
    assert decision.action == ABSTAIN and decision.abstained
    assert decision.confidence == pytest.approx(yes)
    report = decision.report()
    assert report["expected_costs"] == pytest.approx({"yes": 10 * (1 - yes), "no": yes, "abstain": 0.5})
    assert report["action"] == "abstain"


def test_a_claim_is_the_first_of_two_labels():
    costs = CostMatrix(("yes", "no"), ((0.0, 10.0), (1.0, 0.0)))
    assert claim_label_logprobs(math.log(0.25)) == pytest.approx([math.log(0.25), math.log(0.75)])
    decision = bayes_decision(claim_label_logprobs(math.log(0.95)), costs)
    assert decision.probabilities == pytest.approx((0.95, 0.05)) and decision.label_mass == pytest.approx(1.0)
    # yes iff p >= 10 / 11
    assert decision.action == "yes"
    assert bayes_decision(claim_label_logprobs(math.log(0.9)), costs).action == "no"
    certain = bayes_decision(claim_label_logprobs(0.0), costs)  # the claim is all the model would say
    assert certain.probabilities == (1.0, 0.0) and certain.action == "yes"


def test_a_bias_after_the_temperature_is_platt_scaling_of_a_claim():
    costs = CostMatrix(("yes", "no"), ((0.0, 10.0), (1.0, 0.0)))
    p, a, b = 0.3, 0.5, 2.0
    decision = bayes_decision(claim_label_logprobs(math.log(p)), costs, temperature=1 / a, bias=(b, 0.0))
    yes = 1 / (1 + math.exp(-(a * math.log(p / (1 - p)) + b)))  # sigmoid(a logit(p) + b) ~ .66
    assert decision.calibrated == pytest.approx((yes, 1 - yes))
    assert decision.probabilities == pytest.approx((p, 1 - p)), "raw stays raw"
    assert decision.report()["bias"] == [b, 0.0] and decision.action == "no"


def test_binary_rule_switches_at_cost_ratio():
    # positive iff p >= c_fp / (c_fp + c_fn) = 1 / 4
    costs = CostMatrix(("pos", "neg"), ((0.0, 1.0), (3.0, 0.0)))
    assert bayes_decision([math.log(0.26), math.log(0.74)], costs).action == "pos"
    assert bayes_decision([math.log(0.24), math.log(0.76)], costs).action == "neg"


@pytest.mark.parametrize(
    ("kind", "want"), [("mean_prob", (0.5 + 0.25 + 1.0) / 3), ("min_prob", 0.25), ("first_prob", 0.5)]
)
def test_confidence_scores(kind, want):
    assert confidence_score(kind, [math.log(0.5), math.log(0.25), 0.0]) == pytest.approx(want)
    assert confidence_score(kind, []) == 0.0


def test_ensemble_scores_by_hand():
    # Steered top tokens 7 (0.6, chosen), 3 (0.3), 9 (0.05); the base alone gives them 0.2, 0.5, 0.05.
    step = FirstStep(7, {7: math.log(0.6), 3: math.log(0.3), 9: math.log(0.05)},
                     {7: math.log(0.2), 3: math.log(0.5), 9: math.log(0.05)})
    steered = [math.log(0.6), math.log(0.9)]
    assert confidence_score("base_prob", steered, step) == pytest.approx(0.2)
    assert confidence_score("base_agreement", steered, step) == pytest.approx(0.2 + 0.3 + 0.05)
    # The steered distribution itself, seen from the base: the agreement is the whole listed mass.
    same = FirstStep(7, step.steered, step.steered)
    assert confidence_score("base_agreement", steered, same) == pytest.approx(0.95)
    # Familiarity: the geometric mean of the base alone's prompt token probabilities.
    known = FirstStep(7, step.steered, step.base, [math.log(0.5), math.log(0.125)])
    assert confidence_score("base_familiarity", steered, known) == pytest.approx(0.25)
    assert confidence_score("base_familiarity", steered, FirstStep(7, {}, {}, [])) == 0.0
    with pytest.raises(ValueError, match="prompt log-probabilities"):
        confidence_score("base_familiarity", steered, step)
    assert confidence_score("base_prob", [], None) == 0.0, "an empty answer has confidence 0"
    with pytest.raises(ValueError, match="needs the base alone"):
        confidence_score("base_prob", steered)
    with pytest.raises(ValueError, match="unknown confidence score"):
        confidence_score("entropy", steered)


def test_the_fitted_familiarity_by_hand():
    # Levels one nat wide from -20 to 0, the last split at -0.1: one prompt token at each of six,
    # below -20 (level 0), [-16, -15) (5), [-9, -8) (12), [-3, -2) (18), [-1, -0.1) (20), >= -0.1 (21).
    prompt = [-25.0, -16.0, -9.0, -3.0, -0.5, -0.1]
    shares = np.zeros(22)
    shares[[0, 5, 12, 18, 20, 21]] = 1 / 6
    profile = familiarity_profile(prompt)
    assert profile.tolist() == pytest.approx([*shares, -53.6 / 6])
    # Weights on the share below -20 and on the mean, then the intercept.
    weights = [-3.0, *[0.0] * 21, 0.5, 2.0]
    step = FirstStep(7, {}, {}, prompt)
    want = 1 / (1 + math.exp(-(-3.0 / 6 + 0.5 * -53.6 / 6 + 2.0)))
    assert confidence_score("base_familiarity_fit", [math.log(0.9)], step, weights) == pytest.approx(want)
    assert confidence_score("base_familiarity_fit", [math.log(0.9)], FirstStep(7, {}, {}, []), weights) == 0.0
    for missing in (None, weights[:-1]):
        with pytest.raises(ValueError, match="needs 24 fitted weights"):
            confidence_score("base_familiarity_fit", [math.log(0.9)], step, missing)
    with pytest.raises(ValueError, match="'base_familiarity_fit' needs the base alone's prompt"):
        confidence_score("base_familiarity_fit", [math.log(0.9)], FirstStep(7, {}, {}), weights)


def test_abstention_switches_exactly_at_the_threshold():
    assert not Abstention("mean_prob", raw=0.4, confidence=0.4, threshold=0.4).abstained
    assert Abstention("mean_prob", raw=0.4, confidence=0.4, threshold=0.4000001).abstained


def test_labels_must_differ_in_their_first_token():
    encode = {"yes": [5], "yesterday": [5, 9], "no": [7], "": []}.__getitem__
    assert label_first_tokens(encode, ["yes", "no"]) == (5, 7)
    with pytest.raises(ValueError, match="share their first token"):
        label_first_tokens(encode, ["yes", "no", "yesterday"])
    with pytest.raises(ValueError, match="no tokens"):
        label_first_tokens(encode, ["yes", ""])
