"""`steer bench perf --workload router`: one steered replica answered directly, against vLLM's router
in front of it alone and in front of two replicas, interleaved round after round (`rounds`).

On a 2-core machine two replicas cannot scale (they share the cores): what this measures here is
the router's own overhead (one replica behind it, against the same replica direct) and that two
replicas behind it keep the throughput; on a machine with a core set per replica the second ratio
is where scale-out shows.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from steering_tools.bench.perf import (
    PRESETS,
    _deployment,
    _machine,
    _started,
    _warm_up,
    equal_requests,
    kv_cache_bytes,
    load,
    make_models,
)
from steering_tools.bench.rounds import describe, interleaved, spread
from steering_tools.router import start_router
from steering_tools.server_process import free_port

DIRECT, ONE, TWO = "direct, 1 replica", "router, 1 replica", "router, 2 replicas"


def run(*, preset: str = "cpu", concurrency: tuple[int, ...] = (8,), requests: int = 32, prompt_tokens: int = 64,
        max_tokens: int = 64, rounds: int = 5, eager: bool = False, work: Path | None = None) -> dict:
    """Throughput and time to first token of each system at each concurrency level, over `rounds`
    interleaved rounds."""
    root = Path(work or tempfile.mkdtemp(prefix="steer-bench-router-"))
    max_model_len = prompt_tokens + max_tokens + 16
    models = make_models(root, *PRESETS[preset], max_model_len)
    jobs = equal_requests(np.random.default_rng(0), models["tokens"], requests, prompt_tokens, max_tokens)
    engine = {"dtype": "float32", "max_model_len": max_model_len, "enforce_eager": eager,
              "kv_cache_memory_bytes": kv_cache_bytes(models, max_model_len, max(concurrency))}
    steer = [sys.executable, "-m", "steering_cli", "serve", "--config",
             str(_deployment(models, root, steered=True, engine=engine))]
    with _started(steer, root / "replica-0.log") as first, _started(steer, root / "replica-1.log") as second, \
            _router([first.url], root / "router-1.log") as one, \
            _router([first.url, second.url], root / "router-2.log") as two:
        urls = {DIRECT: first.url, ONE: one.url, TWO: two.url}
        for url in urls.values():
            asyncio.run(load(url, "bench", _warm_up(jobs), 4, from_arrival=False))
        loads = interleaved({name: lambda url=url: [asyncio.run(load(url, "bench", jobs, c, from_arrival=False))
                                                    for c in concurrency]
                             for name, url in urls.items()}, rounds)
    report = _machine(models, preset, None) | {
        "workload": "router", "requests": requests, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
        "concurrency": list(concurrency), "rounds": rounds,
        "systems": {name: [[asdict(r) | {"tokens_per_second": r.tokens_per_second} for r in levels]
                           for levels in runs] for name, runs in loads.items()},
    }
    direct = loads[DIRECT]
    measures = (("throughput", "tokens_per_second"), ("median TTFT", "ttft_ms"))
    report["ratios"] = {f"{name} / {DIRECT}: {measure}, c={c}": spread([getattr(r[i], attr) / getattr(d[i], attr)
                                                                         for r, d in zip(loads[name], direct)])
                        for name in (ONE, TWO) for measure, attr in measures for i, c in enumerate(concurrency)}
    return report


def _router(worker_urls: list[str], log: Path):
    return start_router(worker_urls, port=free_port(), log=log, prometheus_port=free_port())


def summary(report: dict) -> str:
    lines = [f"{report['device']}; {report['requests']} requests of {report['prompt_tokens']} prompt + "
             f"{report['max_tokens']} output tokens at each concurrency {report['concurrency']}; "
             f"{report['rounds']} rounds, interleaved, the order reversed every other round"]
    for name, runs in report["systems"].items():
        for i, c in enumerate(report["concurrency"]):
            tps = [levels[i]["tokens_per_second"] for levels in runs]
            ttft = [levels[i]["ttft_ms"] for levels in runs]
            lines.append(f"{name:22} c={c:<3} tok/s median {np.median(tps):8.1f} (range {min(tps):.1f}-"
                         f"{max(tps):.1f}); TTFT median {np.median(ttft):7.1f} ms")
    lines += [f"{label}: {describe(ratio)}" for label, ratio in report["ratios"].items()]
    return "\n".join(lines)
