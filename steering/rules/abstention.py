"""Abstention on a generated answer's confidence: below the threshold, the answer is withheld.

The score is a pure function of the answer's steered token log-probabilities (temperature 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SCORES = ("mean_prob", "min_prob", "first_prob")


def confidence_score(kind: str, token_logprobs: Sequence[float]) -> float:
    """A generated answer's confidence from its tokens' steered log-probabilities (temperature 1).

    `mean_prob`: mean token probability; `min_prob`: the least likely token's; `first_prob`: the
    first token's. An empty answer has confidence 0.
    """
    probs = np.exp(np.asarray(token_logprobs, dtype=np.float64))
    if probs.size == 0:
        return 0.0
    if kind == "mean_prob":
        return float(probs.mean())
    if kind == "min_prob":
        return float(probs.min())
    if kind == "first_prob":
        return float(probs[0])
    raise ValueError(f"unknown confidence score {kind!r}; known: {SCORES}")


@dataclass(frozen=True)
class Abstention:
    """An answer's confidence against the policy's threshold, as reported in `steering`."""

    score: str
    raw: float
    confidence: float  # calibrated
    threshold: float

    @property
    def abstained(self) -> bool:
        return self.confidence < self.threshold

    def report(self) -> dict:
        return {"score": self.score, "raw": self.raw, "confidence": self.confidence, "threshold": self.threshold}
