"""`steer calibrate`: fit a decision or abstention policy's calibration from labelled rows, and
with `--apply` roll it out to a running server."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from steering_cli.arguments import add_server_arguments


def add_to(commands) -> None:
    calibrate = commands.add_parser("calibrate", help="fit a decision or abstention policy's calibration from "
                                                      "labelled JSONL")
    calibrate.add_argument("--config", required=True, type=Path, help="deployment YAML")
    calibrate.add_argument("--policy", required=True)
    source = calibrate.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help='JSONL rows: {"prompt" | "messages", "label" | "answer"}')
    source.add_argument("--from-feedback", type=Path, nargs="+", metavar="STORE",
                        help="refit on the outcomes fed back to the servers that kept these feedback stores (several "
                             "replicas' merge); no engine, no server")
    calibrate.add_argument("--out", type=Path,
                           help="calibration file (default: <config dir>/<policy>.calibration.json)")
    calibrate.add_argument("--seed", type=int, default=0, help="seed of the fit / held-out split")
    calibrate.add_argument("--fit-fraction", type=float, default=0.5)
    calibrate.add_argument("--max-tokens", type=int, default=32, help="answer length for abstention policies")
    calibrate.add_argument("--bins", type=int, default=10, help="confidence bins for ECE and the reliability plot")
    calibrate.add_argument("--apply", action="store_true",
                           help="replace the calibration file the policy names in the config, then reload the "
                                "server at --url (or --server): the recalibrated policy serves from its next request")
    calibrate.add_argument("--server", metavar="URL",
                           help="score the rows through this running server's API (its base URL, …/v1) instead of "
                                "an engine of its own: nothing is loaded here (needs the server's --api-key)")
    calibrate.add_argument("--parallel", type=int, default=8, help="--server: rows in flight at once")
    add_server_arguments(calibrate)
    calibrate.set_defaults(handler=lambda args: asyncio.run(run(args)))


async def run(args: argparse.Namespace) -> int:
    from steering_tools import rollout
    from steering_tools.calibrate import ServerScores, calibrate, calibrate_from_feedback, summary

    from steering.config import load_deployment, read_deployment
    from steering.errors import ConfigError
    from steering_cli.reload import ReloadFailed, describe, reload_server

    # With --server or --from-feedback no model runs here: only the YAML is read.
    remote = args.server or args.from_feedback
    deployment = (read_deployment if remote else load_deployment)(args.config, calibrating=True)
    server = ServerScores(args.server, args.api_key, args.parallel) if args.server else None
    out = args.out or args.config.parent / f"{args.policy}.calibration.json"
    if args.apply:  # refused before any engine starts
        named = rollout.named_calibration(args.config, args.policy)
        if args.out and args.out.resolve() != named:
            raise ConfigError("--out", f"--apply replaces the file policies.{args.policy}.calibration names "
                                       f"({named}); leave out --out")
        out = named
    previous = out.read_bytes() if args.apply and out.exists() else None
    if args.from_feedback:
        result = await calibrate_from_feedback(deployment, args.policy, args.from_feedback, out, seed=args.seed,
                                               fit_fraction=args.fit_fraction, bins=args.bins)
    else:
        result = await calibrate(deployment, args.policy, args.data, out, seed=args.seed,
                                 fit_fraction=args.fit_fraction, max_tokens=args.max_tokens, bins=args.bins,
                                 server=server)
    print(summary(result))
    if not args.apply:
        print(f"to use it, set `calibration: {out}` in policies.{args.policy} of {args.config}, then "
              "`steer reload` (or rerun with --apply)")
        return 0
    rollout.keep_if_valid(args.config, out, previous)
    try:
        report = reload_server(args.server or args.url, args.api_key, caller="steer calibrate --apply")
    except ReloadFailed as error:
        print(f"steer calibrate: wrote {out}, but {error}; the server serves the old calibration until it "
              "reloads (`steer reload`, or SIGHUP)", file=sys.stderr)
        return 1
    print(describe(report))
    return 0
