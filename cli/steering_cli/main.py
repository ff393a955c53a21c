"""`steer`: try a policy, serve a deployment, reload its policies, calibrate a policy, run the demo and the benchmarks.

Each subcommand is a module of this package; it imports what it runs (the server, the tools) only
when it runs."""

from __future__ import annotations

import argparse
import os
import sys

from steering_cli import bench, calibrate, check, complete, demo, fixtures, reload, serve

COMMANDS = (complete, serve, check, calibrate, reload, demo, bench, fixtures)
TOOLS_EXTRA = {"scipy", "matplotlib", "tqdm", "mapie", "sklearn"}  # what the tools need beyond serving (pyproject's `tools`)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steer", description=__doc__.split("\n")[0].replace("`", ""))
    parser.add_argument("-v", "--verbose", action="store_true", help="show vLLM's own logs")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_to(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # stdout is the command's output (e.g. --json); logs go to stderr, vLLM's only with -v.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if not args.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from steering.errors import SteeringError

    try:
        return args.handler(args)
    except SteeringError as error:
        print(f"steer: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        if error.name not in TOOLS_EXTRA:
            raise
        print(f"steer {args.command}: needs the `tools` extra ({error.name} is missing): "
              "pip install 'steering-service[tools]'", file=sys.stderr)
        return 2
