"""Abstention on a generated answer's confidence: below the threshold, the answer is withheld.

Two families of scores, all at temperature 1:
- from the answer's steered token log-probabilities alone (`STEERED_SCORES`);
- from the ensemble the engine holds (`ENSEMBLE_SCORES`): the base alone's view of the prompt
  and of the answer's first step, beside the steered one. The base holds the knowledge and the
  small pairs the format, so where the base alone is unsure, the steering overrules it, or the
  question itself is strange to the base, the answer is weak. `base_familiarity_fit` is the one
  fitted score: how the base's surprise at the prompt spreads over levels (`familiarity_profile`),
  weighed by a logistic fit on labelled answers that `steer calibrate` writes with its calibration.
  These cost extra single-token engine requests per answer, the base alone on the prompt: one for
  `base_prob` and the familiarity scores, one per token of the steered top AGREEMENT_TOKENS (the
  greedy token among them) for `base_agreement`, all but the first reading the prompt from the
  prefix cache where it holds a whole block (`SteeringEngine.caches_prompt`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

STEERED_SCORES = ("mean_prob", "min_prob", "first_prob")
ENSEMBLE_SCORES = ("base_prob", "base_agreement", "base_familiarity", "base_familiarity_fit")
# Scores weighed by a fit on labelled answers: without the weights they are undefined.
FITTED_SCORES = ("base_familiarity_fit",)
# Scores that read the base alone's prompt log-probabilities.
PROMPT_SCORES = ("base_familiarity", "base_familiarity_fit")
SCORES = STEERED_SCORES + ENSEMBLE_SCORES
# Scores known once the answer's first token is: the answer can stream (or stop) from there on.
FIRST_STEP_SCORES = ("first_prob", *ENSEMBLE_SCORES)
# `base_agreement` compares the two distributions over the steered one's most likely tokens:
# vLLM's default `max_logprobs`.
AGREEMENT_TOKENS = 20
# `familiarity_profile`: the levels of the base's surprise at a prompt token, as log-probability
# edges: one nat wide from -20 to 0, the last split at -0.1 (nearly certain). A name the base
# never read costs it about 8-16 nats a token; a format it never saw, about as much or more; its
# own prose, under 1. The fit learns which levels mark a question the base does not know.
PROFILE_EDGES = (*map(float, range(-20, 0)), -0.1)
PROFILE_FEATURES = len(PROFILE_EDGES) + 2  # a share per level, then the mean log-probability
FITTED_WEIGHTS = PROFILE_FEATURES + 1  # and the intercept


def extra_requests(kind: str) -> int:
    """The single-token engine requests a score adds to a greedy answer: the base alone, once per
    token whose logprob it reads (the greedy token is the steered top one)."""
    return AGREEMENT_TOKENS if kind == "base_agreement" else int(kind in ENSEMBLE_SCORES)


@dataclass(frozen=True)
class FirstStep:
    """The answer's first step as the steered and the base-alone distributions see it.

    `steered`: log-probabilities of the steered distribution's top tokens (the chosen one among
    them); `base`: the base alone's log-probabilities of the same tokens; `prompt`: the base
    alone's log-probability of each prompt token after the first, given those before it (for
    `base_familiarity` only).
    """

    token: int
    steered: Mapping[int, float]
    base: Mapping[int, float]
    prompt: Sequence[float] | None = None

    def as_json(self) -> dict:
        """The step as JSON (token ids as keys become strings); `of_json` reads it back exactly."""
        return {"token": self.token, "steered": {str(t): v for t, v in self.steered.items()},
                "base": {str(t): v for t, v in self.base.items()},
                "prompt": None if self.prompt is None else list(self.prompt)}

    @classmethod
    def of_json(cls, data: Mapping) -> FirstStep:
        return cls(int(data["token"]), {int(t): float(v) for t, v in data["steered"].items()},
                   {int(t): float(v) for t, v in data["base"].items()},
                   None if data.get("prompt") is None else [float(v) for v in data["prompt"]])

    def base_prob(self) -> float:
        """The base alone's probability of the answer's first token."""
        return float(np.exp(self.base[self.token]))

    def agreement(self) -> float:
        """The probability mass both distributions give the steered top tokens: sum of min(p_steered, p_base).

        1 minus the total variation distance between the two, restricted to those tokens; 0 when
        the steering moved all the mass to tokens the base alone does not expect.
        """
        return float(sum(min(np.exp(logprob), np.exp(self.base[token])) for token, logprob in self.steered.items()))

    def familiarity(self) -> float:
        """The base alone's mean per-token probability of the prompt (geometric): how well the base
        knows what it is asked about. A one-token prompt is unknown: 0."""
        prompt = self._prompt("base_familiarity")
        return float(np.exp(np.mean(prompt))) if len(prompt) else 0.0

    def fitted_familiarity(self, weights: Sequence[float]) -> float:
        """`fitted_score` of the prompt's `familiarity_profile`; a one-token prompt is unknown: 0."""
        prompt = self._prompt("base_familiarity_fit")
        return fitted_score(familiarity_profile(prompt), weights) if len(prompt) else 0.0

    def _prompt(self, kind: str) -> Sequence[float]:
        if self.prompt is None:
            raise ValueError(f"score {kind!r} needs the base alone's prompt log-probabilities")
        return self.prompt


def familiarity_profile(prompt_logprobs: Sequence[float]) -> np.ndarray:
    """[PROFILE_FEATURES]: the share of prompt tokens at each level of the base's surprise
    (log-probability below PROFILE_EDGES[0], between consecutive edges, above the last), then the
    mean log-probability. A prompt with no scored token has none at any level and mean 0."""
    logprobs = np.asarray(prompt_logprobs, dtype=np.float64)
    if not logprobs.size:
        return np.zeros(PROFILE_FEATURES)
    levels = np.searchsorted(PROFILE_EDGES, logprobs, side="right")
    shares = np.bincount(levels, minlength=len(PROFILE_EDGES) + 1) / logprobs.size
    return np.append(shares, logprobs.mean())


def fitted_score(features: np.ndarray, weights: Sequence[float]) -> float:
    """sigmoid(weights · features + intercept), the intercept last in `weights`."""
    weights = np.asarray(weights, dtype=np.float64)
    return float(1.0 / (1.0 + np.exp(-(features @ weights[:-1] + weights[-1]))))


def confidence_score(kind: str, token_logprobs: Sequence[float], first_step: FirstStep | None = None,
                     weights: Sequence[float] | None = None) -> float:
    """A generated answer's confidence, from its tokens' steered log-probabilities (temperature 1)
    and, for the ensemble scores, its `first_step`; a fitted score's `weights` (intercept last)
    come from its calibration.

    `mean_prob`: mean token probability; `min_prob`: the least likely token's; `first_prob`: the
    first token's; `base_prob`: the base alone's probability of the first token;
    `base_agreement`: `FirstStep.agreement`; `base_familiarity`: `FirstStep.familiarity`;
    `base_familiarity_fit`: `FirstStep.fitted_familiarity`. An empty answer has confidence 0.
    """
    if kind not in SCORES:
        raise ValueError(f"unknown confidence score {kind!r}; known: {SCORES}")
    probs = np.exp(np.asarray(token_logprobs, dtype=np.float64))
    if probs.size == 0:
        return 0.0
    if kind in ENSEMBLE_SCORES:
        if first_step is None:
            raise ValueError(f"score {kind!r} needs the base alone's view of the first step")
        if kind in FITTED_SCORES:
            if weights is None or len(weights) != FITTED_WEIGHTS:
                raise ValueError(f"score {kind!r} needs {FITTED_WEIGHTS} fitted weights (`steer calibrate`)")
            return first_step.fitted_familiarity(weights)
        return {"base_prob": first_step.base_prob, "base_agreement": first_step.agreement,
                "base_familiarity": first_step.familiarity}[kind]()
    if kind == "mean_prob":
        return float(probs.mean())
    if kind == "min_prob":
        return float(probs.min())
    return float(probs[0])


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
