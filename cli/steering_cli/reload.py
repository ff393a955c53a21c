"""`steer reload`: have a running server re-read its config, through the Python SDK."""

from __future__ import annotations

import argparse
import json
import sys

from steering_cli.arguments import add_server_arguments


def add_to(commands) -> None:
    reload = commands.add_parser(
        "reload", help="have a running server re-read its config: policies change, in-flight requests finish as they "
                       "began")
    add_server_arguments(reload)
    reload.add_argument("--json", action="store_true", help="print the server's report as JSON")
    reload.set_defaults(handler=run)


class ReloadFailed(Exception):
    """The server could not be reached, or it refused the reload (it keeps its running policies)."""


def reload_server(url: str, api_key: str | None, *, caller: str = "steer reload") -> dict:
    """Ask the server at `url` (its address, or the SDK's base URL) to re-read its config: its
    report, or `ReloadFailed`. The server logs `caller` (the user agent) as who reloaded."""
    from steering_client import APIConnectionError, APIStatusError, SteeringClient

    base_url = url.rstrip("/") if url.rstrip("/").endswith("/v1") else f"{url.rstrip('/')}/v1"
    try:
        with SteeringClient(base_url=base_url, api_key=api_key, max_retries=0, timeout=60,
                            default_headers={"User-Agent": caller}) as client:
            return client.models.reload().model_dump()
    except APIConnectionError as error:
        raise ReloadFailed(f"cannot reach the server at {base_url}/admin/reload: {error.message}") from None
    except APIStatusError as error:
        message = (error.body or {}).get("error", {}).get("message", error.message) if isinstance(error.body, dict) \
            else error.message
        raise ReloadFailed(f"the server refused the reload ({error.status_code} {error.code}: {message}); "
                           "it keeps serving its running policies") from None


def describe(report: dict) -> str:
    """The changes, a line each, as the server reported them."""
    from steering.config import PolicyChanges

    return PolicyChanges.from_report(report).describe(one_line=False)


def run(args: argparse.Namespace) -> int:
    try:
        report = reload_server(args.url, args.api_key)
    except ReloadFailed as error:
        print(f"steer reload: {error}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else describe(report))
    return 0
