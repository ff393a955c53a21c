"""Argument types and options more than one subcommand takes."""

from __future__ import annotations

import argparse
import os

DEFAULT_URL = "http://127.0.0.1:8000/v1"


def alpha_override(text: str) -> tuple[str, float]:
    """`PAIR=VALUE`, an expert pair's alpha."""
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected PAIR=VALUE, got {text!r}")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alpha for {name!r} is not a number: {value!r}") from None


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The running server a command talks to, as the SDK is pointed at one."""
    parser.add_argument("--url", default=os.environ.get("STEER_BASE_URL", DEFAULT_URL),
                        help=f"the server, as the SDK's base URL (default: $STEER_BASE_URL, else {DEFAULT_URL})")
    parser.add_argument("--api-key", default=os.environ.get("STEER_API_KEY"),
                        help="the server's API key (default: $STEER_API_KEY)")
