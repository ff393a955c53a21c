"""`steer serve`: serve a deployment over the OpenAI-compatible HTTP API until stopped."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from steering_cli.arguments import seconds

NO_CONFIG = """steer serve: --config is required: the deployment YAML to serve (see README, "The deployment config").
To serve the demo family instead: `steer demo run` (it trains the family once, about 10 minutes on 2 CPU
cores, then serves it on :8000), or `steer demo build` and then `steer serve --config <that folder>/deploy.yaml`."""


def add_to(commands) -> None:
    serve = commands.add_parser("serve", help="serve a deployment over an OpenAI-compatible HTTP API")
    serve.add_argument("--config", type=Path, help="deployment YAML (required; `steer demo run` serves the demo)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("STEER_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1 routes (default: $STEER_API_KEY)")
    serve.add_argument("--watch-config", type=seconds, metavar="SECONDS",
                       help="re-read the config every SECONDS and reload when it (or a calibration file it names) "
                            "changed, e.g. a mounted ConfigMap (default: reload only on SIGHUP or POST)")
    serve.add_argument("--max-body-bytes", type=int, help="refuse a larger request body with 413 (default: 16 MiB)")
    serve.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from steering_server.app import create_app
    from steering_server.settings import ServerSettings

    if args.config is None:
        print(NO_CONFIG, file=sys.stderr)
        return 2
    if args.api_key == "":  # e.g. a Secret with an empty value: refuse rather than guard with ""
        print("steer serve: the API key (--api-key or STEER_API_KEY) is empty; set one, or unset it to serve "
              "without a key", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("steer.server")
    settings = ServerSettings(config=args.config, host=args.host, port=args.port, api_key=args.api_key,
                              watch_config_seconds=args.watch_config,
                              **({"max_body_bytes": args.max_body_bytes} if args.max_body_bytes else {}))
    log.info("loading the deployment from %s", args.config)
    if args.api_key is None:
        log.warning("no API key (--api-key or STEER_API_KEY): anyone who reaches %s can use every policy",
                    settings.address)
    failures: list[BaseException] = []

    def stop(error: BaseException) -> None:
        failures.append(error)
        server.should_exit = True

    app = create_app(settings, on_engine_failure=stop)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                                           timeout_graceful_shutdown=settings.graceful_shutdown_seconds))
    server.run()
    return 1 if failures else 0
