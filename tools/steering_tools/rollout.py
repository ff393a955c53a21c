"""Rolling a new calibration out (`steer calibrate --apply`): the file a policy names, replaced only by one that
keeps the config valid."""

from __future__ import annotations

from pathlib import Path

import yaml

from steering.config import read_deployment
from steering.errors import ConfigError


def named_calibration(config: Path, policy: str) -> Path:
    """The calibration file `policies.<policy>.calibration` names in the YAML, which `--apply` replaces.

    A policy that names none is refused: the YAML is the operator's (often generated, or mounted
    from a ConfigMap), so `--apply` rewrites the calibration file, never the config.
    """
    raw = yaml.safe_load(config.read_text()) or {}
    named = ((raw.get("policies") or {}).get(policy) or {}).get("calibration")
    if not isinstance(named, str):
        raise ConfigError(f"policies.{policy}.calibration",
                          f"--apply replaces the calibration file a policy names, and this one names none: add "
                          f"`calibration: {policy}.calibration.json` to policies.{policy} in {config}, then run again")
    path = Path(named).expanduser()
    return path if path.is_absolute() else (config.parent / path).resolve()


def keep_if_valid(config: Path, calibration: Path, previous: bytes | None) -> None:
    """Check the config with the new calibration file as a reload would; restore the old file if it fails."""
    try:
        read_deployment(config)
    except ConfigError:
        if previous is None:
            calibration.unlink(missing_ok=True)
        else:
            calibration.write_bytes(previous)
        raise
