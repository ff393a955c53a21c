"""The Bayes action over a label set: `argmin_a sum_y C[a, y] p(y|x)`, pure numpy.

The model's probabilities stay plain; the user's costs come after. Abstaining can be an action of
constant cost (Chow's rule).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ABSTAIN = "abstain"


def softmax(z: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, stable for any finite input."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def label_probabilities(label_logprobs: Sequence[float], temperature: float = 1.0,
                        bias: Sequence[float] | None = None) -> np.ndarray:
    """p(y|x) over the labels alone: softmax(log p(first token of y) / T + bias)."""
    z = np.asarray(label_logprobs, dtype=np.float64) / temperature
    return softmax(z if bias is None else z + np.asarray(bias, dtype=np.float64))


def claim_label_logprobs(claim_logprob: float) -> list[float]:
    """A claim check's two labels: [log p, log (1 - p)], p the probability that the answer is the claim."""
    logprob = min(float(claim_logprob), 0.0)
    return [logprob, float(np.log(-np.expm1(logprob))) if logprob < 0 else -np.inf]


def expected_costs(costs: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """[A] expected cost of each action: costs [A, K] (actions x true labels) times probs [K]."""
    return np.asarray(costs, dtype=np.float64) @ np.asarray(probs, dtype=np.float64)


def bayes_action(costs: np.ndarray, probs: np.ndarray) -> int:
    """The action of least expected cost (the first one on ties)."""
    return int(np.argmin(expected_costs(costs, probs)))


@dataclass(frozen=True)
class CostMatrix:
    """Costs of acting on each label (rows) when each label is true (columns); abstaining optional."""

    labels: tuple[str, ...]
    costs: tuple[tuple[float, ...], ...]  # [K, K]
    abstain_cost: float | None = None

    @property
    def actions(self) -> tuple[str, ...]:
        return self.labels + ((ABSTAIN,) if self.abstain_cost is not None else ())

    def matrix(self) -> np.ndarray:
        """[A, K]: the label rows, then a constant abstain row when abstaining is allowed."""
        rows = [list(row) for row in self.costs]
        if self.abstain_cost is not None:
            rows.append([self.abstain_cost] * len(self.labels))
        return np.asarray(rows, dtype=np.float64)


@dataclass(frozen=True)
class Decision:
    """What was decided and why, as reported in a response's `steering.decision`."""

    labels: tuple[str, ...]
    probabilities: tuple[float, ...]  # raw: renormalised over the labels
    calibrated: tuple[float, ...]
    label_mass: float  # how much of the next-token distribution the labels held
    temperature: float
    bias: tuple[float, ...] | None
    costs: CostMatrix
    expected_costs: tuple[float, ...]  # one per action
    action: str
    threshold: float | None = None  # a certified threshold on calibrated p(labels[0]) chose the action

    @property
    def abstained(self) -> bool:
        return self.action == ABSTAIN

    @property
    def confidence(self) -> float:
        return max(self.calibrated)

    def report(self) -> dict:
        return {
            "labels": list(self.labels),
            "probabilities": dict(zip(self.labels, self.probabilities)),
            "calibrated": dict(zip(self.labels, self.calibrated)),
            "label_mass": self.label_mass,
            "temperature": self.temperature,
            "bias": None if self.bias is None else list(self.bias),
            "costs": [list(row) for row in self.costs.costs],
            "abstain_cost": self.costs.abstain_cost,
            "expected_costs": dict(zip(self.costs.actions, self.expected_costs)),
            "action": self.action,
        } | ({"threshold": self.threshold} if self.threshold is not None else {})


def bayes_decision(label_logprobs: Sequence[float], costs: CostMatrix, temperature: float = 1.0,
                   bias: Sequence[float] | None = None, threshold: float | None = None) -> Decision:
    """The Bayes action from the labels' steered log-probabilities, calibrated by `temperature` and
    `bias`; with a certified `threshold` (a yes/no decision under a stated risk), labels[0] iff its
    calibrated probability reaches it, labels[1] otherwise."""
    logprobs = np.asarray(label_logprobs, dtype=np.float64)
    calibrated = label_probabilities(logprobs, temperature, bias)
    matrix = costs.matrix()
    action = costs.actions[bayes_action(matrix, calibrated)]
    if threshold is not None:
        action = costs.labels[0] if calibrated[0] >= threshold else costs.labels[1]
    return Decision(
        labels=costs.labels,
        probabilities=tuple(label_probabilities(logprobs).tolist()),
        calibrated=tuple(calibrated.tolist()),
        label_mass=float(np.exp(logprobs).sum()),
        temperature=temperature,
        bias=None if bias is None else tuple(float(b) for b in bias),
        costs=costs,
        expected_costs=tuple(expected_costs(matrix, calibrated).tolist()),
        action=action,
        threshold=threshold,
    )


def label_first_tokens(encode, labels: Sequence[str]) -> tuple[int, ...]:
    """Each label's first token id (`encode`: text -> ids, no special tokens); labels must differ there.

    A label is scored by its first token's probability, so two labels that start with the same
    token could not be told apart.
    """
    firsts = []
    for label in labels:
        ids = encode(label)
        if not ids:
            raise ValueError(f"label {label!r} encodes to no tokens")
        firsts.append(ids[0])
    for i, j in ((i, j) for i in range(len(labels)) for j in range(i + 1, len(labels))):
        if firsts[i] == firsts[j]:
            raise ValueError(
                f"labels {labels[i]!r} and {labels[j]!r} share their first token (id {firsts[i]}); "
                "labels are told apart by their first token"
            )
    return tuple(firsts)
