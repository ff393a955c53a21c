"""A W8A8 int8 base against its float32 original, each in a composite engine beside the same
float32 expert pair: the weights' bytes (float32, bfloat16, W8A8), the engine processes' own
memory (USS), the KV cache room the saving frees, and steered greedy output tokens/s, the two
engines measured interleaved, round after round (`rounds`), both kept up throughout.

    .venv/bin/python -m steering_tools.bench.quantized --rounds 5 --out docs/bench/quantized.json

The W8A8 checkpoint's weight codes fit this CPU (`steering.quantization`): within +-64 without VNNI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import psutil
import torch
from transformers import AutoConfig

from steering.config import parse_deployment
from steering.engine import SteeringEngine
from steering.memory import GiB, MiB, checkpoint_bytes, kv_bytes_per_token
from steering.quantization import CpuKernels
from steering_tools.bench.perf import PRESETS, VOCAB, make_models
from steering_tools.bench.rounds import describe, interleaved, spread
from steering_tools.fixtures import Shape, quantize_w8a8

BASE = Shape("llama", hidden=1024, heads=16, kv_heads=8, layers=8)  # ~92M parameters, 75M of them quantized
EXPERT = PRESETS["cpu"][1]
MAX_MODEL_LEN = 512
KV_CACHE_BYTES = 256 * MiB  # the same for both engines: only the weights differ


async def start(base: Path, models: dict) -> tuple[SteeringEngine, int]:
    """A steered composite engine on `base`, and the USS of the processes it started."""
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    deployment = parse_deployment({
        "base": str(base), "experts": {"pair": {"tuned": str(models["tuned"]), "untuned": str(models["untuned"])}},
        "policies": {"bench": {"alpha": {"pair": 1.0}}},
        "engine": {"dtype": "float32", "max_model_len": MAX_MODEL_LEN, "enforce_eager": True,
                   "kv_cache_memory_bytes": KV_CACHE_BYTES},
    })
    engine = SteeringEngine.start(deployment)
    started = [child for child in psutil.Process().children(recursive=True) if child.pid not in before]
    return engine, sum(child.memory_full_info().uss for child in started)


async def tokens_per_second(engine: SteeringEngine, prompts: list[list[int]], max_tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    began = time.perf_counter()
    outputs = await asyncio.gather(*(engine.complete(p, params, alpha_row=[1.0]) for p in prompts))
    return sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - began)


async def stop(engines) -> None:
    for engine in engines:
        engine.shutdown()
    pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=8, help="sent at once, per round and engine")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-quantized-") as root:
        return measure_all(args, Path(root))


def measure_all(args: argparse.Namespace, root: Path) -> dict:
    kernels = CpuKernels.detect()
    models = make_models(root, BASE, EXPERT, MAX_MODEL_LEN)
    quantized = quantize_w8a8(models["base"], root / "base-w8a8", max_code=kernels.int8_code_limit)
    weights = {"float32": checkpoint_bytes(models["base"], torch.float32),
               "bfloat16": checkpoint_bytes(models["base"], torch.bfloat16),
               "w8a8": checkpoint_bytes(quantized, torch.float32)}
    texts = [AutoConfig.from_pretrained(models[name]) for name in ("base", "tuned", "untuned")]
    kv_per_token = kv_bytes_per_token(texts, dtype_bytes=4)
    loop = asyncio.new_event_loop()
    engines, uss = {}, {}
    for name, path in (("float32", models["base"]), ("w8a8", quantized)):
        engines[name], uss[name] = loop.run_until_complete(start(path, models))
    rng = np.random.default_rng(0)

    def measure(name: str):
        def once() -> float:  # fresh prompts each time: nothing from the prefix cache
            prompts = [rng.integers(10, VOCAB, size=args.prompt_tokens).tolist() for _ in range(args.requests)]
            return loop.run_until_complete(tokens_per_second(engines[name], prompts, args.max_tokens))
        return once

    for name in engines:  # warm-up
        measure(name)()
    rates = interleaved({name: measure(name) for name in engines}, args.rounds)
    loop.run_until_complete(stop(engines.values()))
    saved = weights["float32"] - weights["w8a8"]
    report = {
        "cpu": kernels.describe(), "cores": psutil.cpu_count(), "base": asdict(BASE),
        "w8a8_max_code": kernels.int8_code_limit, "weight_bytes": weights, "engine_uss_bytes": uss,
        "kv_bytes_per_token": kv_per_token, "kv_tokens_freed": saved // kv_per_token,
        "tokens_per_second": rates,
        "w8a8_over_float32": spread([q / f for q, f in zip(rates["w8a8"], rates["float32"])]),
        "workload": {"requests": args.requests, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens},
    }
    print(f"weights: float32 {weights['float32'] / MiB:.1f} MiB, bfloat16 {weights['bfloat16'] / MiB:.1f} MiB, "
          f"w8a8 {weights['w8a8'] / MiB:.1f} MiB; engine USS float32 {uss['float32'] / GiB:.2f} GiB, "
          f"w8a8 {uss['w8a8'] / GiB:.2f} GiB; frees {saved / MiB:.1f} MiB = {saved // kv_per_token} KV tokens")
    print(f"tokens/s w8a8 / float32: {describe(report['w8a8_over_float32'])}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
