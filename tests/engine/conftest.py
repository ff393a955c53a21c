"""Live engines shared across the engine tests: few start-ups, each reused by many tests.

Package-scoped, so they are shut down before the server tests start theirs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence

import pytest
from vllm import SamplingParams

from steering.admission import Admission
from steering.config import parse_deployment
from steering.engine import SteeringEngine
from steering.kinds import Steering
from steering.policy import Overrides


class LiveEngine:
    """A `SteeringEngine` on its own event-loop thread, driven synchronously by tests."""

    def __init__(self, config: dict):
        self.deployment = parse_deployment(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.engine: SteeringEngine = self.run(self._start())
        self.admission = Admission(self.engine)

    async def _start(self) -> SteeringEngine:
        return SteeringEngine.start(self.deployment)

    def run(self, coro, timeout: float = 600):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def steering(self, alpha: Mapping[str, float]) -> Steering:
        """Any alphas, admitted the way a request's are: through the `any` policy's bounds."""
        return self.admission.policies["any"].resolve(Overrides(alpha=alpha))

    def outputs(self, prompts: Sequence, alphas: Sequence[Mapping[str, float]], params: SamplingParams):
        """Final RequestOutputs of requests submitted together (one batch in the engine)."""
        encode = self.engine.prompts.encode
        plans = [(self.steering(a), encode(p) if isinstance(p, str) else list(p)) for p, a in zip(prompts, alphas)]
        for _, prompt in plans:  # the engine's limits, as admission checks them before generating
            self.engine.check_request(prompt, params)

        async def gather():
            return await asyncio.gather(*(self.engine.complete(p, params, alpha_row=s.alpha_row) for s, p in plans))

        return self.run(gather())

    def greedy(self, prompts, alphas, max_tokens: int = 24) -> list[list[int]]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        return [list(o.outputs[0].token_ids) for o in self.outputs(prompts, alphas, params)]

    def close(self) -> None:
        self.run(self._shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)

    async def _shutdown(self) -> None:
        self.engine.shutdown()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def _config(family: dict, **engine) -> dict:
    return {
        "base": family["base"],
        "experts": family["experts"],
        "policies": {"base": {}, "any": {"max_alpha": 100.0}},
        "engine": {"dtype": "float32", "max_model_len": 256, **engine},  # KV cache sized from the models
    }


@pytest.fixture(scope="package")
def llama_engine(llama_family):
    """vLLM's default (compiled) path, prefix caching, and chunked prefill in 32-token chunks."""
    engine = LiveEngine(
        _config(llama_family, enable_prefix_caching=True, max_num_batched_tokens=32, block_size=32)
    )
    yield engine
    engine.close()


@pytest.fixture(scope="package")
def qwen2_engine(qwen2_family):
    engine = LiveEngine(_config(qwen2_family, enforce_eager=True))
    yield engine
    engine.close()


@pytest.fixture(scope="package")
def tight_engine(llama_family):
    """A KV cache of 8 blocks x 32 tokens: a handful of concurrent requests forces preemption."""
    engine = LiveEngine(
        _config(
            llama_family,
            enforce_eager=True,
            max_model_len=128,
            block_size=32,
            num_gpu_blocks_override=8,
            max_num_batched_tokens=64,
            disable_log_stats=False,
        )
    )
    yield engine
    engine.close()
