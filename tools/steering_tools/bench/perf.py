"""`steer bench perf`: what steering costs in speed, measured in one run on one machine.

Random-weight models of chosen sizes (a base and one expert pair), the same requests, greedy,
`ignore_eos`, streamed over HTTP with the same load generator for:
- `vllm serve` on the base alone (prices our server layer),
- `steer serve` with a base-only deployment (no experts),
- `steer serve` with the base and the pair, steered (alpha 1),
and the transformers reference implementation (steered, in static batches) on the same requests.
Two workloads: `equal` (every prompt and output the same length, all sent at once: the static
batcher's best case) and `mixed` (lengths drawn from a wide range, Poisson arrivals: where
continuous batching earns its keep). At each concurrency: output tokens/s, time to first token,
inter-token and end-to-end latency, and what each server's engine counted meanwhile (vLLM's own
counters: preemptions, steps, prefill and decode time). The FLOPs-ideal ratio
`base / (base + experts)` comes from parameter counts. Every server is started once and kept up;
the systems are then measured side by side at each level, round after round, the order reversed
every other round (`rounds`), and each ratio is reported as its median and spread over rounds.

A third, `decisions`, prices the decision layer on one steered server: a yes/no decision and a
claim check against one plain steered step, and an answer under each first-step abstention score,
and the same answer traced (`steering.trace`), against the same answer unscored. The scores are
made of single-token engine requests (`SteeringEngine.next_token_logprobs`), the trace of one
prefill per view, so their cost is latency, which no count of requests shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
import torch
import yaml
from transformers import AutoConfig

from steering.memory import WORKER_RUNTIME_BYTES, GiB, MiB, kv_bytes_per_token
from steering.rules.abstention import FIRST_STEP_SCORES, FITTED_SCORES, extra_requests
from steering_tools.bench.rounds import caveat, describe, interleaved, spread
from steering_tools.fixtures import Shape, save_model, train_tokenizer
from steering_tools.server_process import ServerProcess, free_port

PRESETS = {
    # base ~10x each expert in parameters; head_dim 64 / 32 (the CPU kernels need >= 32)
    "cpu": (Shape("llama", hidden=512, heads=8, kv_heads=4, layers=8), Shape("llama", hidden=128, heads=4, kv_heads=2, layers=4)),
    # The cpu preset's experts with head_dim 64: the same parameters and KV bytes in half the heads
    # (whether attention costs by heads, not FLOPs, where contexts are long).
    "cpu-hd64": (Shape("llama", hidden=512, heads=8, kv_heads=4, layers=8),
                 Shape("llama", hidden=128, heads=2, kv_heads=1, layers=4)),
    "tiny": (Shape("llama", hidden=128, heads=4, kv_heads=2, layers=2), Shape("llama", hidden=64, heads=2, kv_heads=1, layers=2)),
    "gpu": (Shape("llama", hidden=2048, heads=16, kv_heads=8, layers=16), Shape("llama", hidden=512, heads=8, kv_heads=4, layers=8)),
}
VOCAB = 8192
T = TypeVar("T")
WORKLOADS = ("equal", "mixed", "decisions")
VLLM, BASE_ONLY, STEERED = "vllm serve, base", "steer serve, base only", "steer serve, steered"
SHARED, COPIED = "steer serve, 2 pairs, untuned shared", "steer serve, 2 pairs, untuned copied"
REFERENCE = "reference, steered"
# vLLM's Prometheus series, on `vllm serve` and `steer serve` alike, read before and after each load.
# Prefill (scheduled to first token), decode and queue times are summed over requests.
ENGINE_SERIES = {
    "preemptions": "vllm:num_preemptions_total",
    "steps": "vllm:iteration_tokens_total_count",
    "step_tokens": "vllm:iteration_tokens_total_sum",
    "prompt_tokens": "vllm:prompt_tokens_total",
    "cached_prompt_tokens": "vllm:prefix_cache_hits_total",
    "queue_s": "vllm:request_queue_time_seconds_sum",
    "prefill_s": "vllm:request_prefill_time_seconds_sum",
    "decode_s": "vllm:request_decode_time_seconds_sum",
}


@dataclass(frozen=True)
class Request:
    """One benchmark request: its prompt, its own output length, and when it arrives (s after the start)."""

    prompt: list[int]
    output_tokens: int
    arrival: float = 0.0


@dataclass
class Trace:
    """One request as served: its latencies count from `origin`; times in s since the run started."""

    origin: float
    token_times: list[float]
    tokens: int


@dataclass
class Load:
    concurrency: int
    requests: int
    tokens: int
    seconds: float  # makespan: from the first arrival to the last token
    ttft_ms: float  # median time to first token
    itl_ms: float  # median gap between tokens
    ttft_p90_ms: float
    e2e_ms: float  # median time to last token
    request_ttft_ms: list[float] = field(default_factory=list)  # each request's, in request order
    request_tpot_ms: list[float] = field(default_factory=list)  # each request's time per token after its first
    engine: dict[str, float] | None = None  # what the server's engine counted over this load (`ENGINE_SERIES`)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @classmethod
    def measure(cls, concurrency: int, traces: list[Trace]) -> Load:
        ttfts = [t.token_times[0] - t.origin for t in traces]
        tpots = [(t.token_times[-1] - t.token_times[0]) / (t.tokens - 1) if t.tokens > 1 else math.nan for t in traces]
        gaps = np.concatenate([np.diff(t.token_times) for t in traces])
        e2es = [t.token_times[-1] - t.origin for t in traces]

        def ms(values, q: float = 50) -> float:
            return 1000 * float(np.percentile(values, q))

        return cls(concurrency, len(traces), sum(t.tokens for t in traces), max(t.token_times[-1] for t in traces),
                   ms(ttfts), ms(gaps) if gaps.size else math.nan, ms(ttfts, 90), ms(e2es),
                   [1000 * t for t in ttfts], [1000 * t for t in tpots])


@dataclass
class Calls:
    """Whole requests, not streamed, at one concurrency: what a caller waits for each answer."""

    concurrency: int
    requests: int
    seconds: float  # makespan
    latency_ms: float  # median, from sending to the whole response
    latency_p90_ms: float

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds


def equal_requests(rng: np.random.Generator, vocab: int, count: int, prompt_tokens: int,
                   max_tokens: int) -> list[Request]:
    """`count` random prompts of `prompt_tokens`, each answered with `max_tokens`, all arriving at once."""
    return [Request(rng.integers(10, vocab, size=prompt_tokens).tolist(), max_tokens) for _ in range(count)]


def mixed_requests(rng: np.random.Generator, vocab: int, count: int, lengths: tuple[int, int],
                   rate: float) -> list[Request]:
    """Prompt and output lengths uniform in `lengths` (inclusive); Poisson arrivals at `rate`/s, the first at 0."""
    low, high = lengths
    if not 0 < low <= high:
        raise ValueError(f"lengths must satisfy 0 < MIN <= MAX, got {low} {high}")
    if not rate > 0:
        raise ValueError(f"rate must be positive (inf: all at once), got {rate}")
    prompt_lengths, output_lengths = rng.integers(low, high + 1, size=(2, count))
    gaps = rng.exponential(1 / rate, size=count) if math.isfinite(rate) else np.zeros(count)
    arrivals = np.cumsum(gaps) - gaps[0]
    return [Request(rng.integers(10, vocab, size=p).tolist(), int(o), float(a))
            for p, o, a in zip(prompt_lengths, output_lengths, arrivals)]


def fresh_prompts(rng: np.random.Generator, vocab: int, jobs: list[Request], rounds: int,
                  concurrency: tuple[int, ...]) -> dict[int, list[list[Request]]]:
    """Each level's requests in each round: `jobs`' lengths and arrivals, with prompts never sent before,
    so no server finds one in its prefix cache (every system gets the same ones)."""
    return {c: [[replace(r, prompt=rng.integers(10, vocab, size=len(r.prompt)).tolist()) for r in jobs]
                for _ in range(rounds)] for c in concurrency}


def parameters(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(int(np.prod(f.get_slice(name).get_shape())) for name in f.keys())


def make_models(root: Path, base: Shape, expert: Shape, max_model_len: int) -> dict:
    """Random base and expert pair with a padded vocabulary, sharing one small tokenizer."""
    tokenizer = train_tokenizer()

    def padded(shape: Shape) -> Shape:
        return replace(shape, vocab_pad=VOCAB - len(tokenizer), max_positions=max(shape.max_positions, max_model_len))

    save_model(padded(base), tokenizer, root / "base", seed=1)
    save_model(padded(expert), tokenizer, root / "untuned", seed=2)
    save_model(padded(expert), tokenizer, root / "tuned", seed=3)
    return {"base": root / "base", "tuned": root / "tuned", "untuned": root / "untuned", "tokens": len(tokenizer)}


def add_sharing_models(models: dict, root: Path, expert: Shape) -> None:
    """A second fine-tune of the same untuned model, and a byte-for-byte copy of that untuned
    model under another path: naming the copy makes a deployment that cannot share it."""
    tokenizer = train_tokenizer()
    shape = replace(expert, vocab_pad=VOCAB - len(tokenizer),
                    max_positions=AutoConfig.from_pretrained(models["untuned"]).max_position_embeddings)
    save_model(shape, tokenizer, root / "tuned2", seed=4)
    shutil.copytree(models["untuned"], root / "untuned-copy", dirs_exist_ok=True)
    models.update(tuned2=root / "tuned2", untuned_copy=root / "untuned-copy")


def engine_counters(metrics: str) -> dict[str, float]:
    """`ENGINE_SERIES` from a Prometheus text page, each summed over its labels."""
    series = {name: key for key, name in ENGINE_SERIES.items()}
    totals = dict.fromkeys(ENGINE_SERIES, 0.0)
    for line in metrics.splitlines():
        if (key := series.get(line.split("{", 1)[0].split(" ", 1)[0])) is not None:
            totals[key] += float(line.rsplit(" ", 1)[1])
    return totals


def kv_cache_bytes(models: dict, max_model_len: int, sequences: int) -> int:
    """KV bytes for `sequences` full-length sequences of every model in `models` together (float32)."""
    configs = [AutoConfig.from_pretrained(models[name]) for name in ("base", "tuned", "untuned")]
    configs += [AutoConfig.from_pretrained(models[name]) for name in ("tuned2", "untuned_copy") if name in models]
    return kv_bytes_per_token(configs, dtype_bytes=4) * max_model_len * sequences + 64 * MiB


async def load(url: str, model: str, requests: list[Request], concurrency: int, *, from_arrival: bool) -> Load:
    """Stream each request from its arrival, at most `concurrency` at a time; latencies count from
    its arrival (so waiting for a slot counts) or, `from_arrival` off, from when it was sent."""
    slots = asyncio.Semaphore(concurrency)

    async def send(http: httpx.AsyncClient, request: Request, started: float) -> Trace:
        await asyncio.sleep(request.arrival - (time.perf_counter() - started))
        async with slots:
            sent = time.perf_counter() - started
            body = {"model": model, "prompt": request.prompt, "max_tokens": request.output_tokens,
                    "temperature": 0.0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            times, tokens = [], 0
            async with http.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
                    if event.get("choices"):
                        times.append(time.perf_counter() - started)
        return Trace(request.arrival if from_arrival else sent, times, tokens)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as http:
        started = time.perf_counter()
        traces = await asyncio.gather(*(send(http, request, started) for request in requests))
    return Load.measure(concurrency, list(traces))


def reference_load(reference, requests: list[Request], concurrency: int, *, from_arrival: bool) -> Load:
    """The transformers reference, steered, in static batches of up to `concurrency` requests in
    arrival order: a batch starts once its last request has arrived and the previous batch is done,
    and runs until its longest request is; each request counts only its own tokens. Latencies count
    from arrival or, `from_arrival` off, from the batch's start."""
    free_at, traces = 0.0, []  # on the run's clock; arrivals are waited for on it, not slept through
    for i in range(0, len(requests), concurrency):
        batch = requests[i : i + concurrency]
        start = max(free_at, batch[-1].arrival)
        steps = _step_times(reference, batch)
        traces += [Trace(r.arrival if from_arrival else start, [start + s for s in steps[: r.output_tokens]],
                         r.output_tokens) for r in batch]
        free_at = start + steps[-1]
    return Load.measure(concurrency, traces)


@torch.inference_mode()
def _step_times(reference, batch: list[Request]) -> list[float]:
    """Seconds from the batch's start to each greedy step, until its longest request is done."""
    outputs = [[] for _ in batch]
    started, times = time.perf_counter(), []
    steps = reference.steered_logits([r.prompt for r in batch], [{"pair": 1.0}] * len(batch), outputs,
                                     max(r.output_tokens for r in batch))
    for logits in steps:
        for row, token in enumerate(logits.argmax(dim=-1).tolist()):
            outputs[row].append(token)
        times.append(time.perf_counter() - started)
    return times


# The decisions workload, a row per kind of call: the policy it asks, its body beyond the prompt,
# whether it generates the workload's answer (else one step), and the plain row it is held against.
PLAIN_STEP, PLAIN_ANSWER = "plain steered step", "plain steered answer"
LABELS, COSTS = ["yes", "no"], {"cost_fp": 10, "cost_fn": 1}


@dataclass(frozen=True)
class Call:
    policy: str
    body: dict
    answers: bool
    against: str | None


# A fitted score sends what `base_familiarity` sends (and needs a calibration file): not timed apart.
TIMED_SCORES = tuple(score for score in FIRST_STEP_SCORES if score not in FITTED_SCORES)
DECISION_CALLS = {
    PLAIN_STEP: Call("bench", {"max_tokens": 1, "temperature": 0.0}, False, None),
    f"yes/no decision ({len(LABELS)} requests)": Call("decide", {}, False, PLAIN_STEP),
    "claim check (1 per end token)": Call("check", {"steering": {"claim": " yes"}}, False, PLAIN_STEP),
    PLAIN_ANSWER: Call("bench", {}, True, None),
    "traced answer (+3 prefills: base, tuned, untuned)": Call("bench", {"steering": {"trace": True}}, True, PLAIN_ANSWER),
    **{f"abstain on {score} (+{extra_requests(score)})": Call(f"abstain-{score}", {}, True, PLAIN_ANSWER)
       for score in TIMED_SCORES},
}


# The policies `DECISION_CALLS` asks beside `bench`, at its alpha. The abstention threshold is 0,
# so every answer is given in full, as the plain one is: only the score's cost differs.
DECISION_POLICIES = {
    "decide": {"decision": {"labels": LABELS, **COSTS}},
    "check": {"decision": {"claim": True, "labels": LABELS, **COSTS}},
    **{f"abstain-{score}": {"abstain": {"score": score, "threshold": 0.0}} for score in TIMED_SCORES},
}


async def calls(url: str, call: Call, requests: list[Request], concurrency: int) -> Calls:
    """Each request whole, at most `concurrency` at a time; a response that did not decide, or
    abstained, is an error, not a measurement."""
    slots = asyncio.Semaphore(concurrency)

    async def send(http: httpx.AsyncClient, request: Request) -> float:
        body = {"model": call.policy, "prompt": request.prompt, **call.body}
        if call.answers:
            body |= {"max_tokens": request.output_tokens, "temperature": 0.0, "ignore_eos": True}
        async with slots:
            sent = time.perf_counter()
            response = await http.post("/v1/completions", json=body)
            took = time.perf_counter() - sent
        response.raise_for_status()
        answer = response.json()
        steering = answer.get("steering") or {}
        if call.policy == "bench":
            tokens = request.output_tokens if call.answers else 1
            if answer["usage"]["completion_tokens"] != tokens:
                raise RuntimeError(f"{call.policy}: {answer['usage']} for {tokens} tokens")
        elif steering.get("abstained") is not False or not (steering.get("decision") or steering.get("abstention")):
            raise RuntimeError(f"{call.policy} did not decide, or abstained: {steering}")
        return took

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as http:
        started = time.perf_counter()
        latencies = await asyncio.gather(*(send(http, request) for request in requests))
        seconds = time.perf_counter() - started
    return Calls(concurrency, len(requests), seconds, 1000 * float(np.median(latencies)),
                 1000 * float(np.percentile(latencies, 90)))


def _deployment(models: dict, root: Path, *, steered: bool, engine: dict, pairs: str = "one",
                rules: dict | None = None) -> Path:
    """The base alone, or steered by one pair (`pairs="one"`) or two: `"shared"` names one untuned
    checkpoint for both, `"copied"` gives the second pair a copy of it (the same weights, run twice).
    Steered, `rules` adds a policy per entry, each the `bench` policy's alpha and that entry."""
    experts = {"pair": {"tuned": str(models["tuned"]), "untuned": str(models["untuned"])}}
    if pairs != "one":
        second = models["untuned"] if pairs == "shared" else models["untuned_copy"]
        experts["pair2"] = {"tuned": str(models["tuned2"]), "untuned": str(second)}
    bench = {"alpha": {name: 1.0 / len(experts) for name in experts}} if steered else {}
    config = {
        "base": str(models["base"]),
        "experts": experts if steered else {},
        "policies": {"bench": bench, **{name: bench | rule for name, rule in (rules or {}).items()}},
        "engine": engine,
    }
    path = root / (f"steered-{pairs}.yaml" if steered else "base.yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def run(
    *,
    preset: str = "cpu",
    concurrency: tuple[int, ...] = (1, 8, 16, 32),
    requests: int = 32,
    prompt_tokens: int = 64,
    max_tokens: int = 64,
    workload: str = "equal",
    lengths: tuple[int, int] = (16, 512),
    rate: float = math.inf,
    vllm_serve: bool = True,
    base_only: bool = True,
    sharing: bool = False,
    reference: bool = True,
    eager: bool = False,
    block_size: int | None = None,
    rounds: int = 5,
    work: Path | None = None,
) -> dict:
    """Measure every system on one workload. `equal`: `prompt_tokens` in and `max_tokens` out per
    request, all sent at once; `mixed`: both lengths uniform in `lengths`, Poisson arrivals at `rate`;
    `decisions`: the `equal` requests, one steered server, a row per `DECISION_CALLS` entry (the
    other systems, `sharing` and `rounds` do not apply). `rounds`: how often every system is
    measured, interleaved. `block_size`: the KV cache's (vLLM's default for the platform if None:
    128 on CPU, 16 on GPU); the prefix cache keeps whole blocks only."""
    _check_workload(workload, sharing=sharing, rounds=rounds)
    mixed = workload == "mixed"
    if mixed:
        prompt_tokens = max_tokens = lengths[1]
    max_model_len = prompt_tokens + max_tokens + 16
    base_shape, expert_shape = PRESETS[preset]
    root = Path(work or tempfile.mkdtemp(prefix="steer-bench-"))
    models = make_models(root, base_shape, expert_shape, max_model_len)
    if sharing:
        add_sharing_models(models, root, expert_shape)
    rng = np.random.default_rng(0)
    jobs = (mixed_requests(rng, models["tokens"], requests, lengths, rate) if mixed
            else equal_requests(rng, models["tokens"], requests, prompt_tokens, max_tokens))
    machine = _machine(models, preset, block_size)
    servers = 1 if workload == "decisions" else vllm_serve + base_only + 1 + 2 * sharing
    engine = {"dtype": "float32", "max_model_len": max_model_len, "enforce_eager": eager,
              **_kv_cache(models, max_model_len, max(concurrency), servers),
              **({"block_size": block_size} if block_size else {})}
    if workload == "decisions":
        draw = partial(equal_requests, rng, models["tokens"], requests, prompt_tokens, max_tokens)
        return machine | {"requests": requests, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
                          "workload": workload, "rows": _decision_rows(models, root, engine, draw, concurrency)}
    commands = _servers(models, root, engine, vllm_serve=vllm_serve, base_only=base_only, sharing=sharing)
    _check_room(len(commands), engine, models)
    warm_up = _warm_up(jobs)
    systems = _serving_rounds(commands, root, warm_up, fresh_prompts(rng, models["tokens"], jobs, rounds, concurrency),
                              mixed=mixed, reference=_reference(models, warm_up[:2]) if reference else None)
    report = machine | {
        "requests": requests, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "workload": workload,
        **(_mixed_lengths(jobs, lengths, rate) if mixed else {}), "rounds": rounds,
        **_measured(machine, systems, sharing=sharing),
    }
    return summarize_rounds(report)


def _measured(machine: dict, systems: dict, *, sharing: bool) -> dict:
    """Every system's loads, round by round and level by level; with `sharing`, its FLOPs-ideal speed-up."""
    base_params, expert_params = machine["base_parameters"], machine["expert_pair_parameters"]
    return {
        # Two pairs: base + 4 expert models unshared, base + 3 shared (the experts are one size).
        **({"sharing_flops_ideal_speedup": (base_params + 2 * expert_params) / (base_params + 1.5 * expert_params)}
           if sharing else {}),
        "systems": {name: [[asdict(r) | {"tokens_per_second": r.tokens_per_second} for r in levels] for levels in runs]
                    for name, runs in systems.items()},
    }


def _check_workload(workload: str, *, sharing: bool, rounds: int) -> None:
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")
    if workload == "decisions" and sharing:
        raise ValueError("sharing compares two-pair deployments; the decisions workload serves one pair")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")


def _kv_cache(models: dict, max_model_len: int, sequences: int, servers: int) -> dict:
    """Every system's KV cache: the same bytes, room for the steered composite to hold `sequences` at
    full length (a fraction would depend on the machine). On a GPU vLLM also claims its share of
    the device at start (0.9 by default), so several servers kept up each take an equal share instead."""
    if torch.cuda.is_available() and servers > 1:
        return {"gpu_memory_utilization": round(0.8 / servers, 3)}
    return {"kv_cache_memory_bytes": kv_cache_bytes(models, max_model_len, sequences)}


def _check_room(servers: int, engine: dict, models: dict) -> None:
    """Every server is kept up for the whole run: refuse, before starting any, where they cannot all
    fit in memory (each: an API process and an engine process, the weights and the KV cache)."""
    import psutil

    weights = 4 * sum(parameters(path) for path in models.values() if isinstance(path, Path))  # float32
    each = 2 * WORKER_RUNTIME_BYTES + weights + engine.get("kv_cache_memory_bytes", 0)
    free = psutil.virtual_memory().available
    if servers * each > free:
        raise RuntimeError(f"{servers} servers kept up need about {servers * each / GiB:.1f} GiB ({each / GiB:.2f} "
                           f"each: runtime, weights, KV cache), and {free / GiB:.1f} GiB is free: measure fewer "
                           "systems (--no-vllm-serve, --no-base-only) or lower --concurrency")


def _warm_up(jobs: list[Request]) -> list[Request]:
    return [replace(r, output_tokens=min(r.output_tokens, 64), arrival=0.0) for r in jobs[:8]]


def _serving_rounds(commands: list[tuple[str, list[str]]], root: Path, warm_up: list[Request],
                    batches: dict[int, list[list[Request]]], *, mixed: bool, reference) -> dict[str, list[list[Load]]]:
    """Every server started once and kept up, and warmed up; then each system, the reference too
    (or None), measured over the rounds of `batches` (`measure_rounds`)."""
    with contextlib.ExitStack() as running:
        urls = {name: running.enter_context(_started(command, root / f"{name}.log")).url for name, command in commands}
        for url in urls.values():
            asyncio.run(load(url, "bench", warm_up, 4, from_arrival=False))
        measure = {name: partial(_served, url, from_arrival=mixed) for name, url in urls.items()}
        if reference is not None:
            measure[REFERENCE] = partial(reference_load, reference, from_arrival=mixed)
        return measure_rounds(measure, batches)


def measure_rounds(measure: dict[str, Callable[[list[Request], int], T]],
                   batches: dict[int, list[list[Request]]]) -> dict[str, list[list[T]]]:
    """Each system `measure(requests, concurrency)` at each level in each round, where `batches` holds
    each level's requests of each round: the systems side by side at each level, the levels in turn,
    the whole order reversed every other round (`rounds.interleaved`). Each system's: [round][level]."""
    rounds = len(next(iter(batches.values())))
    # Each call takes its level's requests of the next round.
    calls = {(name, c): partial(_next_load, measure[name], iter(batches[c]), c) for c in batches for name in measure}
    runs = interleaved(calls, rounds)
    return {name: [[runs[name, c][r] for c in batches] for r in range(rounds)] for name in measure}


def _next_load(measure: Callable[[list[Request], int], T], batches: Iterator[list[Request]], concurrency: int) -> T:
    return measure(next(batches), concurrency)


def _served(url: str, requests: list[Request], concurrency: int, *, from_arrival: bool) -> Load:
    """`load` on one server, with what its engine counted meanwhile."""
    before = engine_counters(httpx.get(f"{url}/metrics", timeout=30).text)
    measured = asyncio.run(load(url, "bench", requests, concurrency, from_arrival=from_arrival))
    after = engine_counters(httpx.get(f"{url}/metrics", timeout=30).text)
    measured.engine = {key: after[key] - before[key] for key in after}
    return measured


def summarize_rounds(report: dict) -> dict:
    """A report of `systems` measured over rounds, with what is read from them: each system's `rows`
    (per level, each figure's median over rounds: the shape of a report from before rounds), each
    ratio's spread (`ratios`) and where steering loses (`steered_breakdown`)."""
    report["rows"] = {name: [_median_row(loads) for loads in zip(*runs)] for name, runs in report["systems"].items()}
    report["ratios"] = ratio_spreads(report)
    report["steered_breakdown"] = steered_breakdown(report)
    return report


def _median_row(loads: tuple[dict, ...]) -> dict:
    """One level's loads over the rounds as one row: each figure's median (the per-request lists and
    engine counters stay in `systems`)."""
    row = {}
    for key, value in loads[0].items():
        if isinstance(value, float):
            row[key] = float(np.median([load[key] for load in loads]))
        elif isinstance(value, int):
            row[key] = value  # counts: the same in every round
    return row


def _mixed_lengths(jobs: list[Request], lengths: tuple[int, int], rate: float) -> dict:
    return {"lengths": list(lengths), "rate": rate if math.isfinite(rate) else None,
            "prompt_lengths": [len(r.prompt) for r in jobs], "output_lengths": [r.output_tokens for r in jobs]}


def _reference(models: dict, warm_up: list[Request]):
    """The transformers reference steered by the pair, warmed up; each concurrency level is its batch size."""
    from steering_tools.reference import ReferenceSteerer

    steerer = ReferenceSteerer(str(models["base"]), {"pair": (str(models["tuned"]), str(models["untuned"]))})
    _step_times(steerer, warm_up)
    return steerer


def _machine(models: dict, preset: str, block_size: int | None) -> dict:
    """What the figures were measured on, and the models' sizes."""
    base_shape, expert_shape = PRESETS[preset]
    base_params = parameters(models["base"])
    expert_params = parameters(models["tuned"]) + parameters(models["untuned"])
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)",
        "preset": preset, "base": asdict(base_shape), "expert": asdict(expert_shape),
        "base_parameters": base_params, "expert_pair_parameters": expert_params,
        "flops_ideal_ratio": base_params / (base_params + expert_params), "block_size": block_size,
    }


def _servers(models: dict, root: Path, engine: dict, *, vllm_serve: bool, base_only: bool,
             sharing: bool) -> list[tuple[str, list[str]]]:
    """Each server to measure, by name, and the command that starts it (every one serves `bench`)."""
    steer = [sys.executable, "-m", "steering_cli", "serve"]
    servers = []
    if vllm_serve:
        # `vllm serve` itself, started as its API server module: the `vllm` script of the CPU build
        # cannot start (`steering_tools.bench.vllm_bench` says why). It keeps its stats, as
        # `steer serve` does: both do that work, and both count what `ENGINE_SERIES` reads.
        kv_cache = ("--kv-cache-memory-bytes", str(engine["kv_cache_memory_bytes"])) \
            if "kv_cache_memory_bytes" in engine else ("--gpu-memory-utilization", str(engine["gpu_memory_utilization"]))
        servers.append((VLLM, [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(models["base"]),
            "--served-model-name", "bench", "--dtype", "float32", "--max-model-len", str(engine["max_model_len"]),
            *kv_cache, *(["--enforce-eager"] if engine["enforce_eager"] else []),
            *(["--block-size", str(engine["block_size"])] if "block_size" in engine else [])]))
    if base_only:
        servers.append((BASE_ONLY, steer + ["--config", str(_deployment(models, root, steered=False, engine=engine))]))
    servers.append((STEERED, steer + ["--config", str(_deployment(models, root, steered=True, engine=engine))]))
    if sharing:
        for pairs, name in (("shared", SHARED), ("copied", COPIED)):
            servers.append((name, steer + ["--config", str(_deployment(models, root, steered=True, engine=engine,
                                                                          pairs=pairs))]))
    return servers


def _started(command: list[str], log: Path) -> ServerProcess:
    """A server on a free port, logging warnings only, once it is ready (a context manager)."""
    port = free_port()
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    return ServerProcess.start(command + ["--port", str(port)], port=port, log=log, env=env).wait_ready(900)


def _decision_rows(models: dict, root: Path, engine: dict, draw: Callable[[], list[Request]],
                   concurrency: tuple[int, ...]) -> dict[str, list[dict]]:
    """Every `DECISION_CALLS` row at every concurrency, on one steered server; each kind of call
    is warmed up first, so no row pays for another's first shapes. Each row and level gets
    prompts of its own from `draw`: none finds another's in the prefix cache, only its own."""
    command = [sys.executable, "-m", "steering_cli", "serve", "--config",
               str(_deployment(models, root, steered=True, engine=engine, rules=DECISION_POLICIES))]
    rows = {}
    with _started(command, root / "decisions.log") as server:
        for call in DECISION_CALLS.values():
            asyncio.run(calls(server.url, call, draw()[:4], 4))
        for name, call in DECISION_CALLS.items():
            rows[name] = [asdict(measured) | {"requests_per_second": measured.requests_per_second}
                          for measured in (asyncio.run(calls(server.url, call, draw(), c)) for c in concurrency)]
    return rows


def _workload_line(report: dict) -> str:
    if report.get("workload") == "decisions":
        return (f"{report['requests']} requests of {report['prompt_tokens']} prompt tokens, whole (not streamed); "
                f"answers of {report['max_tokens']} tokens; latencies from sending")
    if report.get("workload", "equal") == "equal":
        return (f"{report['requests']} requests, {report['prompt_tokens']} prompt + {report['max_tokens']} output "
                "tokens, all sent at once; latencies from sending")
    low, high = report["lengths"]
    arrivals = f"Poisson arrivals at {report['rate']:g}/s" if report["rate"] else "all arriving at once"
    return (f"{report['requests']} requests, prompt and output lengths uniform in {low}-{high} tokens "
            f"({sum(report['output_lengths'])} output tokens in all), {arrivals}; latencies from arrival; "
            "the reference in static batches of `conc`, each started when its last request has arrived")


def summary(report: dict) -> str:
    lines = [f"{report['device']}; base {report['base_parameters'] / 1e6:.1f}M parameters, expert pair "
             f"{report['expert_pair_parameters'] / 1e6:.1f}M; FLOPs-ideal steered/base ratio "
             f"{report['flops_ideal_ratio']:.3f}",
             _workload_line(report)]
    if report.get("workload") == "decisions":
        lines.append(f"{'':38}{'conc':>5}{'req/s':>9}{'median ms':>11}{'p90':>9}")
        lines += [f"{name:38}{r['concurrency']:>5}{r['requests_per_second']:>9.1f}{r['latency_ms']:>11.1f}"
                  f"{r['latency_p90_ms']:>9.1f}" for name, rows in report["rows"].items() for r in rows]
        lines += [f"{label}: " + ", ".join(f"c={c} {v:.3f}" for c, v in values.items())
                  for label, values in decision_ratios(report).items()]
        return "\n".join(lines)
    rounds = report.get("rounds", 1)
    lines.append(f"{rounds} round(s), the systems side by side at each level, the order reversed every other "
                 f"round; figures are medians over rounds{caveat(rounds)}")
    lines.append(f"{'':36}{'conc':>5}{'tok/s':>10}{'TTFT ms':>10}{'p90':>9}{'ITL ms':>9}{'E2E ms':>10}")
    lines += [f"{name:36}{r['concurrency']:>5}{r['tokens_per_second']:>10.1f}{r['ttft_ms']:>10.1f}"
              f"{r.get('ttft_p90_ms', math.nan):>9.1f}{r['itl_ms']:>9.2f}{r.get('e2e_ms', math.nan):>10.1f}"
              for name, loads in report["rows"].items() for r in loads]
    lines += [f"{label}, c={r['concurrency']}: {describe(r)}"
              for label, levels in ratio_spreads(report).items() for r in levels]
    breakdown = steered_breakdown(report)
    if breakdown:
        lines.append("steered / base-only by part, as a share of the FLOPs-ideal ratio:")
        lines += [f"  {part}, c={r['concurrency']}: {describe(r)}"
                  for part, levels in breakdown["shares"].items() for r in levels]
        lines.append("preemptions over all rounds: " + "; ".join(f"{name}: {count:.0f}"
                                                                for name, count in breakdown["preemptions"].items()))
    return "\n".join(lines)


def decision_ratios(report: dict) -> dict[str, dict[int, float]]:
    """Each decision or scored call against the plain call it stands beside: its median latency
    over the plain one's, and the plain one's requests/s over its own (both: how many times dearer)."""
    rows = {name: {r["concurrency"]: r for r in calls} for name, calls in report["rows"].items()}
    ratios = {}
    for name, call in DECISION_CALLS.items():
        if call.against is None or name not in rows or call.against not in rows:
            continue
        plain = rows[call.against]
        ratios[f"{name} / {call.against}: median latency"] = {
            c: r["latency_ms"] / plain[c]["latency_ms"] for c, r in rows[name].items()}
        ratios[f"{name} / {call.against}: time per request at load"] = {
            c: plain[c]["requests_per_second"] / r["requests_per_second"] for c, r in rows[name].items()}
    return ratios


def ratio_table(report: dict) -> dict[str, dict[int, float]]:
    """Each ratio the targets are stated in, per concurrency: its median over rounds (decisions: each
    call against its plain one)."""
    if report.get("workload") == "decisions":
        return decision_ratios(report)
    return {label: {r["concurrency"]: r["median"] for r in levels} for label, levels in ratio_spreads(report).items()}


def ratio_spreads(report: dict) -> dict[str, list[dict]]:
    """Each ratio the targets are stated in, of two systems measured in the same round, per concurrency
    level: its spread over rounds (`rounds.spread`) and the level. A mixed workload's labels say so."""
    runs = _per_round(report)
    suffix = ", mixed workload" if report.get("workload") == "mixed" else ""
    sharing = report.get("sharing_flops_ideal_speedup", math.nan)
    wanted = {  # label: (system over, system under, divided by)
        "steered / base-only throughput, as a share of the FLOPs-ideal ratio" + suffix:
            (STEERED, BASE_ONLY, report["flops_ideal_ratio"]),
        "steered engine / reference throughput" + suffix: (STEERED, REFERENCE, 1.0),
        f"2 pairs: untuned shared / copied throughput{suffix} (FLOPs-ideal {sharing:.3f})": (SHARED, COPIED, 1.0),
        "steer serve / vllm serve throughput, base only" + suffix: (BASE_ONLY, VLLM, 1.0),
    }
    return {label: _over_rounds(runs, over, under, lambda a, b, scale=scale:
                                a["tokens_per_second"] / b["tokens_per_second"] / scale)
            for label, (over, under, scale) in wanted.items() if over in runs and under in runs}


def steered_breakdown(report: dict) -> dict:
    """Where steered serving loses against base-only, each part as a share of the FLOPs-ideal ratio
    (1: the experts cost what their FLOPs say), per level over rounds: the engine's prefill and decode
    time (summed over requests, vLLM's own counters) and, on mixed lengths, each request's time per
    token after its first, by its context length (prompt + output, in quartiles); and each server's
    preemptions. Empty where either system, or the counters (an older report), is missing."""
    runs = report.get("systems", {})
    if STEERED not in runs or BASE_ONLY not in runs or runs[STEERED][0][0].get("engine") is None:
        return {}
    ideal = report["flops_ideal_ratio"]

    def share(time: Callable[[dict], float]) -> Callable[[dict, dict], float]:
        return lambda steered, base: time(base) / time(steered) / ideal  # a speed ratio: base-only's time on top

    def engine_time(part: str) -> Callable[[dict], float]:
        return lambda load: load["engine"][f"{part}_s"]

    def time_per_token(requests: np.ndarray) -> Callable[[dict], float]:
        return lambda load: float(np.nanmean(np.asarray(load["request_tpot_ms"])[requests]))

    shares = {f"engine {part} time": _over_rounds(runs, STEERED, BASE_ONLY, share(engine_time(part)))
              for part in ("prefill", "decode")}
    if "prompt_lengths" in report:
        context = np.add(report["prompt_lengths"], report["output_lengths"])
        edges = np.quantile(context, [0, 0.25, 0.5, 0.75, 1]).round().astype(int)
        quartile = np.searchsorted(edges[1:-1], context, side="right")
        for q in np.unique(quartile):
            shares[f"time per token, context {edges[q]}-{edges[q + 1]} tokens"] = _over_rounds(
                runs, STEERED, BASE_ONLY, share(time_per_token(quartile == q)))
    preemptions = {name: sum(load["engine"]["preemptions"] for levels in loads for load in levels)
                   for name, loads in runs.items() if loads[0][0].get("engine") is not None}
    return {"shares": shares, "preemptions": preemptions}


def _per_round(report: dict) -> dict[str, list[list[dict]]]:
    """Each system's loads, [round][level]; a report from before rounds is one round."""
    return report.get("systems") or {name: [loads] for name, loads in report["rows"].items()}


def _over_rounds(runs: dict[str, list[list[dict]]], over: str, under: str,
                 ratio: Callable[[dict, dict], float]) -> list[dict]:
    """`ratio(over's load, under's load)` in each round, per level: its spread over the rounds."""
    levels = [load["concurrency"] for load in runs[over][0]]
    return [{"concurrency": c, **spread([ratio(a[i], b[i]) for a, b in zip(runs[over], runs[under])])}
            for i, c in enumerate(levels)]


def plot(report: dict, out: Path) -> list[Path]:
    """Output tokens/s against concurrency, a line per system (median, interquartile bars), and each
    ratio's median, interquartile range (thick) and range (thin) over rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    workload = report.get("workload", "equal")
    if workload == "decisions":
        return [_plot_decisions(report, out, plt)]
    fig, (ax, ratios) = plt.subplots(1, 2, figsize=(14, 5))
    for name, runs in _per_round(report).items():
        levels = [r["concurrency"] for r in runs[0]]
        low, median, high = np.percentile([[r["tokens_per_second"] for r in loads] for loads in runs], [25, 50, 75],
                                          axis=0)
        ax.errorbar(levels, median, yerr=np.stack([median - low, high - median]), marker="o", capsize=3, label=name)
    ax.set(xscale="log", xlabel="concurrent requests", ylabel="output tokens / s",
           title=f"Throughput, {workload} workload, {report.get('rounds', 1)} round(s)\non {report['device']} "
                 f"(FLOPs-ideal steered/base {report['flops_ideal_ratio']:.2f})")
    ax.set_xticks(levels, [str(level) for level in levels])
    ax.legend(fontsize=8)
    spreads = ratio_spreads(report)
    for k, (label, by_level) in enumerate(spreads.items()):
        x = np.array([r["concurrency"] for r in by_level]) * 1.06 ** (k - (len(spreads) - 1) / 2)
        color = f"C{k}"
        ratios.vlines(x, [r["min"] for r in by_level], [r["max"] for r in by_level], color=color, linewidth=1)
        ratios.vlines(x, [r["iqr"][0] for r in by_level], [r["iqr"][1] for r in by_level], color=color, linewidth=4)
        ratios.plot(x, [r["median"] for r in by_level], "o", color=color, label=label)
    ratios.axhline(1.0, color="grey", linestyle=":")
    ratios.set(xscale="log", xlabel="concurrent requests", ylabel="ratio",
               title="Ratios over rounds: median, interquartile range (thick), range (thin)")
    ratios.set_xticks(levels, [str(level) for level in levels])
    ratios.xaxis.set_minor_locator(NullLocator())
    ratios.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = out / ("perf-throughput.png" if workload == "equal" else f"perf-{workload}-throughput.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def _plot_decisions(report: dict, out: Path, plt) -> Path:
    """Median latency and requests/s against concurrency, one line per kind of call."""
    from matplotlib.ticker import LogLocator, NullFormatter, NullLocator, ScalarFormatter

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, rows in report["rows"].items():
        levels = [r["concurrency"] for r in rows]
        style = {"marker": "o", "label": name, "linestyle": "--" if name in (PLAIN_STEP, PLAIN_ANSWER) else "-"}
        axes[0].plot(levels, [r["latency_ms"] for r in rows], **style)
        axes[1].plot(levels, [r["requests_per_second"] for r in rows], **style)
    for ax, label in zip(axes, ("median latency, ms", "requests / s")):
        ax.set(xscale="log", yscale="log", xlabel="concurrent requests", ylabel=label)
        ax.set_xticks(levels, [str(level) for level in levels])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    axes[1].legend(fontsize=8)
    block = f", KV blocks of {report['block_size']}" if report.get("block_size") else ""
    fig.suptitle(f"What a decision costs: {report['requests']} requests of {report['prompt_tokens']} prompt tokens, "
                 f"answers of {report['max_tokens']}, on {report['device']}{block}")
    fig.tight_layout()
    path = out / ("perf-decisions.png" if not block else f"perf-decisions-block{report['block_size']}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
