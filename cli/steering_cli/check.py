"""`steer check`: every check `steer serve` makes before its engine starts, without starting one."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_to(commands) -> None:
    check = commands.add_parser(
        "check", help="check a deployment config as `steer serve` does on this machine, without starting an engine")
    check.add_argument("--config", required=True, type=Path, help="deployment YAML")
    check.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """The YAML, calibration files, checkpoints (configs and tokenizers, not weights), the executor,
    and vLLM's engine config (on CPU, the KV cache against this machine's memory). A refusal exits
    2, naming the field, as serve does."""
    from steering.config import digest, load_deployment
    from steering.engine import engine_config

    deployment = load_deployment(args.config)
    kv_cache = engine_config(deployment).cache_config.kv_cache_memory_bytes
    print(f"{args.config}: ok, config {digest(deployment)}")
    print(f"  base: {deployment.base}")
    for name, pair in deployment.experts.items():
        print(f"  expert pair {name}: {pair.tuned} - {pair.untuned}")
    print(f"  policies: {', '.join(deployment.policies)}")
    if kv_cache is not None:
        print(f"  KV cache: {kv_cache / 2**30:.3f} GiB per worker")
    return 0
