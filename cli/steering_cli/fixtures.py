"""`steer fixtures`: a tiny random model family and its deploy.yaml (no model hub needed)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_to(commands) -> None:
    fixtures = commands.add_parser("fixtures", help="build a tiny random model family and its deploy.yaml")
    fixtures.add_argument("--out", required=True, type=Path)
    fixtures.add_argument("--family", choices=["llama", "qwen2"], default="llama")
    fixtures.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from steering_tools.fixtures import LLAMA_FAMILY, QWEN2_FAMILY, build_family, write_deployment

    spec = {"llama": LLAMA_FAMILY, "qwen2": QWEN2_FAMILY}[args.family]
    family = build_family(spec, args.out)
    path = write_deployment(family, args.out / "deploy.yaml")
    print(f"wrote the {args.family} fixture family and {path}")
    return 0
