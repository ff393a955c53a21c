"""Fitting calibration maps and judging probabilities: what `steer calibrate` and the benchmarks use.

The fits minimise the negative log-likelihood; the metrics take `probs` [N, K] with integer
`labels` [N], or binary confidences [N] with `correct` [N].
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import log_softmax, logit
from scipy.stats import rankdata

from steering.rules.calibration import EPS


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising the NLL of `labels` under softmax(logits / T). logits: [N, K]."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)

    def nll(log_t: float) -> float:
        return -log_softmax(logits / np.exp(log_t), axis=-1)[np.arange(len(labels)), labels].mean()

    return float(np.exp(minimize_scalar(nll, bounds=(-5.0, 5.0), method="bounded").x))


def fit_platt(scores: np.ndarray, correct: np.ndarray) -> tuple[float, float]:
    """(a, b) minimising the NLL of `correct` under sigmoid(a * logit(score) + b)."""
    return fit_logistic(logit(np.clip(np.asarray(scores, dtype=np.float64), EPS, 1 - EPS)), correct)


def fit_logistic(x: np.ndarray, correct: np.ndarray, *, min_slope: float | None = None) -> tuple[float, float]:
    """(a, b) minimising the NLL of `correct` under sigmoid(a * x + b), a >= `min_slope` if given."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)

    def nll(ab: np.ndarray) -> float:
        z = ab[0] * x + ab[1]
        return float(np.mean(np.logaddexp(0.0, z) - y * z))

    result = minimize(nll, x0=np.array([1.0, 0.0]), method="L-BFGS-B", bounds=[(min_slope, None), (None, None)])
    return float(result.x[0]), float(result.x[1])


def fit_weights(features: np.ndarray, correct: np.ndarray, *, l2: float = 1.0) -> list[float]:
    """Logistic regression of `correct` on `features` [N, F]: F weights then the intercept,
    minimising the NLL plus `l2` times the squared weights of the standardized features (summed,
    not averaged, so the penalty fades as rows grow). A feature constant on the rows gets weight 0."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    varies = scale > 0
    z = np.where(varies, (x - mean) / np.where(varies, scale, 1.0), 0.0)

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        logits = z @ w[:-1] + w[-1]
        residual = 1.0 / (1.0 + np.exp(-logits)) - y
        penalty = l2 * float(w[:-1] @ w[:-1])
        value = float(np.sum(np.logaddexp(0.0, logits) - y * logits)) + penalty
        return value, np.append(z.T @ residual + 2 * l2 * w[:-1], residual.sum())

    w = minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B").x
    # Back to the raw features: w·(x - mean)/scale + c = (w/scale)·x + (c - w·mean/scale).
    weights = np.where(varies, w[:-1] / np.where(varies, scale, 1.0), 0.0)
    return [*map(float, weights), float(w[-1] - weights @ mean)]


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    probs = np.asarray(probs, dtype=np.float64)
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], EPS, 1.0)).mean())


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over examples of sum_k (p_k - [k = y])^2."""
    probs = np.asarray(probs, dtype=np.float64)
    onehot = np.eye(probs.shape[1])[labels]
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def binary_probs(confidence: np.ndarray) -> np.ndarray:
    """[N, 2] = [P(wrong), P(right)], so the multi-class metrics apply to abstention scores."""
    confidence = np.asarray(confidence, dtype=np.float64)
    return np.stack([1 - confidence, confidence], axis=1)


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error over equal-width bins (lo, hi] of confidence (0 joins the first)."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(total)


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> list[dict]:
    """Per-bin count, mean confidence and accuracy: the reliability diagram's data."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        mask = which == b
        rows.append({
            "bin": [b / bins, (b + 1) / bins],
            "count": int(mask.sum()),
            "confidence": float(confidence[mask].mean()) if mask.any() else None,
            "accuracy": float(correct[mask].mean()) if mask.any() else None,
        })
    return rows


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Answer the k most confident (k = 1..N): coverage k/N and the error rate among them."""
    order = np.argsort(-np.asarray(confidence, dtype=np.float64), kind="stable")
    errors = 1.0 - np.asarray(correct, dtype=np.float64)[order]
    k = np.arange(1, len(order) + 1)
    return k / len(order), np.cumsum(errors) / k


def aurc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Area under the risk-coverage curve: the mean of the risks at coverage 1/N, ..., N/N."""
    return float(risk_coverage(confidence, correct)[1].mean())


def risk_at_coverage(confidence: np.ndarray, correct: np.ndarray, levels=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)) -> list[dict]:
    """The risk-coverage table: error rate when answering the most confident share `level`."""
    coverage, risk = risk_coverage(confidence, correct)
    rows = []
    for level in levels:
        k = max(1, int(np.ceil(level * len(coverage) - 1e-9)))
        rows.append({"coverage": float(coverage[k - 1]), "risk": float(risk[k - 1])})
    return rows


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve: the chance a random positive scores above a random negative (ties
    count half); None when either class is empty."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    ranks = rankdata(scores)  # ties share their mean rank
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
