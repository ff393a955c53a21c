"""Calibration fits and metrics against known values and hand computations."""

from __future__ import annotations

import numpy as np
import pytest
from steering_tools.metrics import (
    aurc,
    auroc,
    binary_probs,
    brier,
    ece,
    fit_logistic,
    fit_platt,
    fit_temperature,
    fit_weights,
    nll,
    risk_at_coverage,
    risk_coverage,
)

from steering.rules.calibration import platt
from steering.rules.decisions import softmax


def test_fit_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(20_000, 4))
    true_t = 2.0
    labels = np.array([rng.choice(4, p=p) for p in softmax(logits / true_t)])
    assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.05)


def test_fit_platt_recovers_known_parameters():
    rng = np.random.default_rng(1)
    scores = rng.uniform(0.02, 0.98, size=20_000)
    correct = rng.uniform(size=scores.size) < platt(scores, 1.7, -0.4)
    a, b = fit_platt(scores, correct)
    assert (a, b) == pytest.approx((1.7, -0.4), abs=0.08)


def test_fit_weights_is_a_logistic_regression_on_the_raw_features():
    rng = np.random.default_rng(2)
    x = rng.normal(loc=[3.0, -1.0], scale=[2.0, 0.5], size=(5_000, 2))
    correct = rng.uniform(size=len(x)) < 1 / (1 + np.exp(-(0.8 * x[:, 0] - 2.0 * x[:, 1] - 1.5)))
    constant = np.c_[x, np.full(len(x), 4.0)]  # a feature that never varies gets weight 0
    weights = fit_weights(constant, correct, l2=0.0)
    assert weights == pytest.approx([0.8, -2.0, 0.0, -1.5], abs=0.15)
    # Unpenalized on one feature, it is the one-feature fit.
    assert fit_weights(x[:, :1], correct, l2=0.0) == pytest.approx(list(fit_logistic(x[:, 0], correct)), abs=1e-4)
    # The penalty shrinks the weights towards 0, the intercept not.
    shrunk = fit_weights(x, correct, l2=2_000.0)
    assert abs(shrunk[0]) < abs(weights[0]) and abs(shrunk[1]) < abs(weights[1])


def test_ece_by_hand():
    # Two bins: (0, .5] holds .2 and .4 (mean .3, accuracy .5); (.5, 1] holds .9 and .95 (.925, .5).
    assert ece([0.2, 0.4, 0.9, 0.95], [0, 1, 1, 0], bins=2) == pytest.approx(0.5 * 0.2 + 0.5 * 0.425)
    assert ece([0.0, 1.0], [0, 1], bins=10) == 0.0


def test_brier_and_nll_by_hand():
    probs = np.array([[0.7, 0.3], [0.4, 0.6]])
    labels = np.array([0, 0])
    assert brier(probs, labels) == pytest.approx(((0.09 + 0.09) + (0.36 + 0.36)) / 2)
    assert nll(probs, labels) == pytest.approx(-(np.log(0.7) + np.log(0.4)) / 2)
    assert binary_probs(np.array([0.8])).tolist() == [[pytest.approx(0.2), 0.8]]


def test_risk_coverage_and_aurc_by_hand():
    confidence, correct = [0.9, 0.6, 0.8, 0.7], [1, 1, 0, 1]
    coverage, risk = risk_coverage(confidence, correct)
    # most confident first: .9 right, .8 wrong, .7 right, .6 right
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk.tolist() == pytest.approx([0.0, 0.5, 1 / 3, 0.25])
    assert aurc(confidence, correct) == pytest.approx((0 + 0.5 + 1 / 3 + 0.25) / 4)
    table = risk_at_coverage(confidence, correct, levels=(0.5, 1.0))
    assert table == [{"coverage": 0.5, "risk": 0.5}, {"coverage": 1.0, "risk": 0.25}]


def test_auroc_by_hand():
    # Positives score .35 and .8, negatives .1 and .4: of the 4 pairs, 3 are ranked right.
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([0.5, 0.5, 0.9], [1, 0, 1]) == pytest.approx((0.5 + 1.0) / 2), "a tie counts half"
    assert auroc([0.2, 0.9], [1, 0]) == 0.0
    assert auroc([0.3, 0.7], [1, 1]) is None, "no negatives: undefined"
