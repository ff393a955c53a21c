"""Plain policies (steering only): every prompt's choices, streamed as the engine makes them."""

from __future__ import annotations

from collections.abc import AsyncIterator

from vllm.utils.async_utils import merge_async_iterators

from steering.engine import SteeringEngine
from steering.errors import GenerationFailed
from steering_server.pieces import Outcome, Piece
from steering_server.plan import Plan


async def generate(engine: SteeringEngine, plan: Plan, outcome: Outcome) -> AsyncIterator[Piece]:
    """Pieces of every choice of every prompt, interleaved as they arrive."""
    streams = [
        engine.generate(prompt, params, steering=plan.steering, request_id=f"{plan.request_id}-{i}")
        for i, (prompt, params) in enumerate(zip(plan.prompts, plan.params))
    ]
    async for prompt_index, output in merge_async_iterators(*streams):
        for c in output.outputs:
            outcome.completion_tokens += len(c.token_ids)
            if c.finish_reason == "error":
                raise GenerationFailed("the engine ended the answer with an error of its own; the server log says "
                                       "why (e.g. a structured-output grammar the tokenizer cannot spell)")
            yield Piece(prompt_index, c.index, c.text, c.token_ids, c.logprobs, c.finish_reason, output.prompt_logprobs)
