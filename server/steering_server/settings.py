"""How `steer serve` runs: the deployment file, the address, the API key, the limits."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field


class ServerSettings(BaseModel):
    config: Path | None = None  # the deployment YAML; unused when the app is handed an engine
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = Field(default=None, min_length=1)
    graceful_shutdown_seconds: float = 60.0
    watch_config_seconds: float | None = Field(
        default=None, gt=0, description="Re-read the config this often and reload when it changed (None: never).")
    max_body_bytes: int = Field(default=16 * 2**20, gt=0, description="A larger request body is refused (413).")

    @property
    def address(self) -> str:
        return f"http://{self.host}:{self.port}"
