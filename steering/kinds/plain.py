"""Plain policies (steering only): every prompt's choices, streamed as the engine makes them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from vllm.utils.async_utils import merge_async_iterators

from steering.errors import GenerationFailed, InvalidRequest
from steering.kinds.run import Outcome, Piece, Plan

if TYPE_CHECKING:
    from steering.engine import SteeringEngine


@dataclass(frozen=True)
class Plain:
    """The steered answer as sampled, nothing withheld."""

    refuses: ClassVar[Mapping[str, str]] = {}
    samples: ClassVar[bool] = True
    reads_logprobs: ClassVar[int | None] = None  # logprobs the kind reads beyond what the client asked

    def collecting(self, *, every_score: bool = False) -> Plain:
        """Nothing is withheld, nothing scored: a plain policy is run as it is."""
        return self

    async def run(self, engine: SteeringEngine, plan: Plan) -> AsyncIterator[Piece | Outcome]:
        async for piece in generate(engine, plan):
            yield piece
        yield plan.outcome


async def generate(engine: SteeringEngine, plan: Plan) -> AsyncIterator[Piece]:
    """Pieces of every choice of every prompt, interleaved as they arrive; their tokens are counted
    in the plan's outcome as they come (an aborted answer's too)."""
    alpha_row, thinking = plan.steering.alpha_row, plan.thinking
    streams = [engine.generate(prompt, params, alpha_row=alpha_row, request_id=f"{plan.request_id}-{i}",
                               reasoning=thinking.engine_hints(prompt) if thinking else None)
               for i, (prompt, params) in enumerate(zip(plan.prompts, plan.params))]
    async for prompt_index, output in merge_async_iterators(*streams):
        for c in output.outputs:
            plan.outcome.completion_tokens += len(c.token_ids)
            if c.finish_reason == "error":
                raise _failure(plan)
            yield Piece(prompt_index, c.index, c.text, c.token_ids, c.logprobs, c.finish_reason, output.prompt_logprobs,
                        c.stop_reason)


def _failure(plan: Plan) -> Exception:
    """vLLM ended an answer with an error of its own. Under a format constraint (a tool call's
    format too) that is the constraint asking for what the base's tokenizer cannot spell (the
    grammar left no token): the request's to change, not the server's to retry."""
    constraint = plan.constraint
    parsing = plan.parsing
    if constraint is None and parsing is not None and parsing.request.tools and parsing.structured_outputs is not None:
        constraint = "tools"
    if constraint is not None:
        return InvalidRequest(f"the base's tokenizer cannot spell what {constraint} requires: the grammar left "
                              "no token of its vocabulary, and the engine ended the answer", param=constraint)
    return GenerationFailed("the engine ended the answer with an error of its own; the server log says why")
