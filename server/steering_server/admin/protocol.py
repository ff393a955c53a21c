"""POST /v1/admin/reload: what a reload changed."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ReloadResponse(BaseModel):
    """What `POST /v1/admin/reload` changed; requests admitted before it finish on their old policy."""

    object: Literal["config.reload"] = "config.reload"
    status: Literal["reloaded", "unchanged"]
    digest: str = Field(description="The active config's digest (also `steer_config_info` in /metrics).")
    previous_digest: str
    added: list[str]
    removed: list[str]
    changed: dict[str, list[str]] = Field(description="Changed policies, each with the fields that changed.")
    policies: list[str] = Field(description="Every policy served from now on.")


