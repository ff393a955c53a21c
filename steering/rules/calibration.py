"""Calibration maps used at serve time, as read from the files `steer calibrate` writes; numpy only.

Decision policies calibrate label probabilities with a temperature, and claim checks with a bias
on the claim too: `softmax(z / T + bias)` (for a claim check, Platt scaling of its probability).
Abstention policies calibrate a confidence score in (0, 1) with Platt scaling on its logit:
`sigmoid(a * logit(s) + b)`; a fitted score's weights come in the same file. The fits live with
the job (`steering_tools.metrics`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from steering.rules.abstention import FITTED_SCORES, FITTED_WEIGHTS

EPS = 1e-12
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]  # the one definition; config and protocol import it


class Certificate(BaseModel):
    """What a calibration certifies (Learn-then-Test): with probability at least 1 - delta over the
    calibration rows, the `risk` of answers given at `threshold` is at most `epsilon`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    risk: Literal["error among answered", "false positive among positive"]
    epsilon: Annotated[FiniteFloat, Field(gt=0, lt=1)]
    delta: Annotated[FiniteFloat, Field(gt=0, lt=1)]
    threshold: Annotated[FiniteFloat, Field(ge=0, le=1)]  # on the calibrated confidence (or p of the positive label)
    n: int  # calibration rows it was certified on
    coverage: Annotated[FiniteFloat, Field(ge=0, le=1)]  # share of them answered (said positive) at the threshold
    method: str

    def report(self) -> dict:
        """What the policy certifies, as the response's `steering.certified` says it."""
        return {"risk": self.risk, "epsilon": self.epsilon, "delta": self.delta, "n": self.n,
                "threshold": self.threshold}


class Calibration(BaseModel):
    """A calibration file: the fitted map, and the threshold fitted with it where one is used."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["decision", "abstention"]
    policy: str
    temperature: Annotated[FiniteFloat, Field(gt=0)] = 1.0  # decision
    labels: list[str] | None = None  # decision: the labels it was fitted for
    bias: list[FiniteFloat] | None = None  # decision: added per label after the temperature (claim checks)
    score: str | None = None  # abstention: the score it was fitted for
    weights: list[FiniteFloat] | None = None  # abstention with a fitted score: its weights, intercept last
    platt_a: FiniteFloat = 1.0  # abstention
    platt_b: FiniteFloat = 0.0
    threshold: Annotated[FiniteFloat, Field(ge=0, le=1)] | None = None
    certificate: Certificate | None = None  # a stated risk, certified (its threshold serves)
    fitted_on: int = 0

    @model_validator(mode="after")
    def _fits_its_policy(self) -> Calibration:
        if self.bias is not None and len(self.bias) != len(self.labels or ()):
            raise ValueError(f"bias has {len(self.bias)} entries; the labels are {self.labels}")
        fitted = self.kind == "abstention" and self.score in FITTED_SCORES
        if fitted and len(self.weights or ()) != FITTED_WEIGHTS:
            raise ValueError(f"score {self.score!r} needs {FITTED_WEIGHTS} weights, intercept last; "
                             f"the file has {len(self.weights or ())}")
        if not fitted and self.weights is not None:
            raise ValueError(f"weights are for the fitted scores {FITTED_SCORES}, not for score {self.score!r}")
        return self

    def confidence(self, score: float) -> float:
        """Calibrated probability that an answer with this raw score is right."""
        return float(platt(np.asarray([score]), self.platt_a, self.platt_b)[0])

    @classmethod
    def read(cls, path: str | Path) -> Calibration:
        return cls.model_validate(json.loads(Path(path).read_text()))

    def write(self, path: str | Path) -> None:
        """Write whole or not at all: a server reloading meanwhile reads the old file or the new."""
        path = Path(path)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(self.model_dump_json(indent=2))
        os.replace(partial, path)


def platt(scores: np.ndarray, a: float, b: float) -> np.ndarray:
    """sigmoid(a * logit(score) + b), scores clipped away from 0 and 1."""
    clipped = np.clip(np.asarray(scores, dtype=np.float64), EPS, 1 - EPS)
    return 1.0 / (1.0 + np.exp(-(a * np.log(clipped / (1 - clipped)) + b)))
