"""Rolling a change out to a running server: `steer reload`, and `steer calibrate --apply`."""

from __future__ import annotations

from pathlib import Path

import httpx
import yaml

from steering.config import read_deployment
from steering.errors import ConfigError

DEFAULT_URL = "http://127.0.0.1:8000/v1"


class ReloadFailed(Exception):
    """The server could not be reached, or it refused the reload (it keeps its running policies)."""


def reload_url(url: str) -> str:
    """The reload endpoint of a server given as the SDK's base URL (`…/v1`) or its address."""
    url = url.rstrip("/")
    return f"{url}/admin/reload" if url.endswith("/v1") else f"{url}/v1/admin/reload"


def reload_server(url: str, api_key: str | None, *, caller: str = "steer reload", timeout: float = 60) -> dict:
    """Ask the server at `url` to re-read its config; its report (`ReloadResponse`), or `ReloadFailed`.
    The server logs `caller` (as the user agent) as who reloaded."""
    headers = {"User-Agent": caller, **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    endpoint = reload_url(url)
    try:
        response = httpx.post(endpoint, headers=headers, timeout=timeout)
    except httpx.TransportError as error:
        raise ReloadFailed(f"cannot reach the server at {endpoint}: {error}") from None
    if response.is_success:
        return response.json()
    try:
        error = response.json()["error"]
        detail = f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        detail = response.text[:500]
    raise ReloadFailed(f"the server refused the reload ({response.status_code} {detail}); "
                       "it keeps serving its running policies")


def describe(report: dict) -> str:
    """One line per change, as the server logs it."""
    if report["status"] == "unchanged":
        return f"unchanged: the server already serves config {report['digest']}"
    lines = [f"reloaded: config {report['previous_digest']} -> {report['digest']}"]
    lines += [f"  added {name}" for name in report["added"]]
    lines += [f"  removed {name}" for name in report["removed"]]
    lines += [f"  changed {name}: {', '.join(fields)}" for name, fields in report["changed"].items()]
    return "\n".join(lines)


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
