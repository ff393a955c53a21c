"""GET /v1/models: every policy, listed as a model."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


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


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


