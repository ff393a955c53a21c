"""`steer demo`: build the demo family, or serve it and show what each policy does."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

BUILD_MINUTES = "about 10 minutes"  # measured on 2 cores: README, "The demo family"


def add_to(commands) -> None:
    demo = commands.add_parser("demo", help="the demo family: build it, or serve it and show each policy")
    demo_commands = demo.add_subparsers(dest="demo_command", required=True)
    build = demo_commands.add_parser("build", help="train and calibrate the demo family (cached)")
    build.add_argument("--out", type=Path, help="folder (default: a cache folder named by the recipe)")
    build.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    run_ = demo_commands.add_parser("run", help="build if missing, serve in the background, send examples")
    run_.add_argument("--port", type=int, default=8000)
    demo.set_defaults(handler=run)


def demo_family(out: Path | None = None, force: bool = False) -> Path:
    """The built demo family's folder, built first where it is missing or stale."""
    from steering_tools.demo_family import Recipe, build, default_dir, is_built

    recipe = Recipe()
    folder = out or default_dir(recipe)
    if force or not is_built(folder, recipe):
        print(f"building the demo family in {folder} ({BUILD_MINUTES} on 2 CPU cores; each finished stage "
              "is kept, so an interrupted build resumes)", flush=True)
    return asyncio.run(build(folder, recipe=recipe, force=force))


def run(args: argparse.Namespace) -> int:
    if args.demo_command == "build":
        print(f"the demo family is ready in {demo_family(args.out, args.force)}")
        return 0
    from steering_tools.demo import run as show

    return show(demo_family(), args.port)
