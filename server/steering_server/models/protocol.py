"""GET /v1/models: every policy, listed as a model, with what it does after steering."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class AbstentionCard(BaseModel):
    """An abstention policy's rule: an answer whose calibrated confidence is below `threshold` is withheld."""

    score: str = Field(description="The confidence score, e.g. mean_prob.")
    threshold: float | None = Field(description="The calibrated confidence below which it abstains.")
    threshold_bounds: tuple[float, float] | None = Field(
        description="Per-request thresholds (steering.abstain_threshold) allowed within [low, high]; none if null.")
    message: str = Field(description="What an abstained answer says instead.")


class DecisionCard(BaseModel):
    """A decision policy's rule: the action of least expected cost over its labels."""

    labels: list[str]
    actions: list[str] = Field(description="The labels, then `abstain` where abstaining is an action.")
    costs: list[list[float]] = Field(description="Rows: the label acted on; columns: the true label.")
    abstain_cost: float | None
    max_cost: float | None = Field(description="Per-request costs allowed within [0, max_cost]; none if null.")
    claim: bool = Field(description="A claim check: each request gives steering.claim, the answer to check.")


class CertifiedRisk(BaseModel):
    """What the policy's calibration certifies, as a response's `steering.certified` says it."""

    risk: str
    epsilon: float
    delta: float
    n: int = Field(description="The calibration rows it was certified on.")
    threshold: float


class ModelCard(BaseModel):
    """A policy, listed as a model."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "steering"
    description: str
    base: str
    experts: dict[str, dict[str, str]] = Field(description="Expert pairs by name: tuned and untuned checkpoints.")
    alpha: dict[str, float]
    max_alpha: float | None
    kind: Literal["plain", "abstention", "decision"] = Field(
        description="What the policy does after steering: nothing more, withhold a weak answer, or decide.")
    abstention: AbstentionCard | None = Field(description="Abstention policies: the rule.")
    decision: DecisionCard | None = Field(description="Decision policies: the rule.")
    certified: CertifiedRisk | None = Field(description="A policy that states a risk: what it certifies.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
