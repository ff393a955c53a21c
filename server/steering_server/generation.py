"""Plain policies (steering only): every prompt's choices, streamed as the engine makes them."""

from __future__ import annotations

from collections.abc import AsyncIterator

from vllm.utils.async_utils import merge_async_iterators

from steering.engine import SteeringEngine
from steering.errors import GenerationFailed, InvalidRequest
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
                raise _failure(plan)
            yield Piece(prompt_index, c.index, c.text, c.token_ids, c.logprobs, c.finish_reason, output.prompt_logprobs)


def _failure(plan: Plan) -> Exception:
    """vLLM ended an answer with an error of its own. Under a format constraint that is the
    constraint asking for what the base's tokenizer cannot spell (the grammar left no token):
    the request's to change, not the server's to retry."""
    if plan.constraint is not None:
        return InvalidRequest(f"the base's tokenizer cannot spell what {plan.constraint} requires: the grammar left "
                              "no token of its vocabulary, and the engine ended the answer", param=plan.constraint)
    return GenerationFailed("the engine ended the answer with an error of its own; the server log says why")
