"""Abstention policies: generate, score the answer, and withhold it below the threshold.

Nothing of an answer that is abstained on is ever sent, so the answer is held back until its
score is known: after the first token for `first_prob` and the ensemble scores (the rest then
streams live, or the generation is aborted when abstaining), at the end for `mean_prob` and
`min_prob`. The ensemble scores ask the engine for the base alone's view of the first step
meanwhile, while the answer goes on generating.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from steering.engine import SteeringEngine, answer_logprobs
from steering.policy import AbstentionRule
from steering.rules.abstention import Abstention
from steering_server.generation import generate
from steering_server.metrics import ServerMetrics
from steering_server.pieces import Outcome, Piece, joined
from steering_server.plan import Plan


async def answer_or_abstain(
    engine: SteeringEngine, plan: Plan, outcome: Outcome, metrics: ServerMetrics
) -> AsyncIterator[Piece]:
    """The one answer, once its calibrated confidence clears the threshold; else the message."""
    rule: AbstentionRule = plan.steering.rule
    held: list[Piece] = []
    logprobs: list[float] = []
    decides_early = rule.at_first_token
    assessment: Abstention | None = None
    async with aclosing(generate(engine, plan, outcome)) as stream:
        async for piece in stream:
            if assessment is not None:
                yield piece
                continue
            held.append(piece)
            logprobs += answer_logprobs(piece.token_ids, piece.logprobs)
            if (decides_early and logprobs) or piece.finish_reason is not None:
                first_step = None
                if rule.uses_base:
                    answer = [token for held_piece in held for token in held_piece.token_ids]
                    steps = [step for held_piece in held for step in held_piece.logprobs or ()]
                    first_step = await engine.first_step(plan.prompts[0], answer, steps,
                                                         familiarity=rule.uses_prompt)
                assessment = rule.assess(logprobs[:1] if decides_early else logprobs, first_step)
                outcome.steering.abstained = assessment.abstained
                outcome.steering.confidence = assessment.confidence
                outcome.steering.abstention = assessment.report()
                if assessment.abstained:
                    metrics.abstentions.labels(plan.name).inc()
                    yield Piece(0, 0, rule.message, finish_reason="stop")
                    return  # leaving the block closes the generation: the engine aborts the rest
                (whole,) = joined(held)
                yield whole
