"""vLLM's router (`vllm-router`, from PyPI) in front of `steer serve` replicas, started as this
project runs it: the tests, `steer bench perf --workload router` and deploy/ use the same flags.

What the flags buy when a replica dies: the router checks each replica's /health every second and
takes it out after 2 failures (back in after 1 success); a request that fails on a replica is
retried on another, up to 3 times, 50 ms apart at first; 2 failures in a row open the replica's
circuit breaker for 5 s, so new requests go to the others meanwhile.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from steering_tools.server_process import ServerProcess

ROUTER_OPTIONS = (
    "--policy", "round_robin",
    "--health-check-endpoint", "/health", "--health-check-interval-secs", "1", "--health-check-timeout-secs", "2",
    "--health-failure-threshold", "2", "--health-success-threshold", "1",
    "--retry-max-retries", "3", "--retry-initial-backoff-ms", "50", "--retry-max-backoff-ms", "500",
    "--cb-failure-threshold", "2", "--cb-success-threshold", "1", "--cb-timeout-duration-secs", "5",
    "--worker-startup-timeout-secs", "900",
)


def router_command(worker_urls: Sequence[str], *, port: int, prometheus_port: int | None = None,
                   api_key: str | None = None) -> list[str]:
    """`vllm-router` over `worker_urls`, listening on loopback at `port`.

    `api_key`: the replicas' key. The router passes a client's `Authorization` on the routes it
    knows (completions, chat, models) and drops it on the others, where it sends this key instead:
    without it, /v1/feedback through the router is refused by replicas that check a key."""
    router = shutil.which("vllm-router", path=str(Path(sys.executable).parent)) or "vllm-router"
    metrics = ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(prometheus_port)] if prometheus_port else []
    key = ["--api-key", api_key] if api_key else []
    return [router, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *worker_urls, *ROUTER_OPTIONS,
            *metrics, *key]


def start_router(worker_urls: Sequence[str], *, port: int, log: Path, timeout: float = 900,
                 prometheus_port: int | None = None, api_key: str | None = None) -> ServerProcess:
    """The router, started and polled on /health until it answers (its replicas are up)."""
    command = router_command(worker_urls, port=port, prometheus_port=prometheus_port, api_key=api_key)
    return ServerProcess.start(command, port=port, log=log).wait_ready(timeout)
