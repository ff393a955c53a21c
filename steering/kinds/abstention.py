"""Abstention policies: generate, score the answer, and withhold it below the threshold.

Nothing of an answer that is abstained on is ever sent, so the answer is held back until its
score is known: after the first token for `first_prob` and the ensemble scores (the rest then
streams live, or the generation is aborted when abstaining), at the end for `mean_prob` and
`min_prob`. The ensemble scores ask the engine for the base alone's view of the first step
meanwhile, while the answer goes on generating. A reasoning base's thinking is not scored: the
score reads the final answer after it (`steering.reasoning`), and the thinking is held back with it.

A rule being calibrated (`collecting`) withholds nothing: it keeps what its score reads, for the fit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from steering.kinds.plain import generate
from steering.kinds.refusals import SCORED
from steering.kinds.run import Outcome, Piece, Plan, joined
from steering.rules.abstention import (
    AGREEMENT_TOKENS,
    ENSEMBLE_SCORES,
    FIRST_STEP_SCORES,
    PROMPT_SCORES,
    Abstention,
    FirstStep,
    confidence_score,
)
from steering.rules.calibration import Calibration, Certificate
from steering.scoring import answer_logprobs, first_step

if TYPE_CHECKING:
    from steering.engine import SteeringEngine


@dataclass(frozen=True)
class AbstentionRule:
    """Withhold an answer whose calibrated confidence is below `threshold`."""

    score: str
    calibration: Calibration | None
    threshold: float | None  # None: collecting for a calibration, nothing withheld
    message: str
    reads_logprobs: int  # the steered distribution's top logprobs per step the score reads
    uses_base: bool  # the base alone's view of the first step (single-token engine requests)
    uses_prompt: bool  # and its prompt logprobs
    certificate: Certificate | None = None  # a stated risk, certified: `threshold` is its

    refuses: ClassVar[Mapping[str, str]] = SCORED
    samples: ClassVar[bool] = True

    @classmethod
    def of(cls, score: str, calibration: Calibration | None, threshold: float | None, message: str) -> AbstentionRule:
        return cls(score, calibration, threshold, message,
                   reads_logprobs=AGREEMENT_TOKENS if score == "base_agreement" else 0,
                   uses_base=score in ENSEMBLE_SCORES, uses_prompt=score in PROMPT_SCORES,
                   certificate=calibration.certificate if calibration else None)

    @property
    def at_first_token(self) -> bool:
        """The verdict is known once the answer's first token is (a collecting rule has none)."""
        return self.score in FIRST_STEP_SCORES and self.threshold is not None

    def collecting(self, *, every_score: bool = False) -> AbstentionRule:
        """This rule withholding nothing, and keeping what its score reads (with `every_score`,
        what any score reads): what a calibration fits on."""
        rule = dataclasses.replace(self, threshold=None)
        if every_score:
            rule = dataclasses.replace(rule, reads_logprobs=AGREEMENT_TOKENS, uses_base=True, uses_prompt=True)
        return rule

    def assess(self, token_logprobs: Sequence[float], first_step: FirstStep | None = None) -> Abstention:
        """An answer's calibrated confidence, from its tokens' steered logprobs (and, for the
        ensemble scores, its first step), against the threshold."""
        raw = confidence_score(self.score, token_logprobs, first_step,
                               self.calibration.weights if self.calibration else None)
        confidence = self.calibration.confidence(raw) if self.calibration else raw
        return Abstention(self.score, raw, confidence, self.threshold)

    async def run(self, engine: SteeringEngine, plan: Plan) -> AsyncIterator[Piece | Outcome]:
        """The one answer, once its calibrated confidence clears the threshold; else the message."""
        outcome, evidence = plan.outcome, plan.outcome.evidence
        final = plan.thinking.final_answer(plan.prompts[0]) if plan.thinking else None
        held: list[Piece] = []
        logprobs: list[float] = []  # of every answer token, the thinking's too
        judged = False
        async with aclosing(generate(engine, plan)) as stream:
            async for piece in stream:
                if judged:
                    yield piece
                    continue
                held.append(piece)
                logprobs += answer_logprobs(piece.token_ids, piece.logprobs)
                start = final.read(piece.token_ids) if final else 0  # where the final answer begins
                answered = logprobs[start:] if start is not None else []
                if not ((self.at_first_token and answered) or piece.finish_reason is not None):
                    continue
                judged = True
                (whole,) = joined(held)
                start = len(whole.token_ids) if start is None else start  # it never stopped thinking: no answer
                evidence.token_logprobs = answered[:1] if self.at_first_token else answered
                if self.uses_base:
                    evidence.first_step = await first_step(engine, plan.prompts[0], whole.token_ids[start:],
                                                           whole.logprobs[start:],
                                                           num_pairs=len(plan.steering.alpha_row),
                                                           familiarity=self.uses_prompt,
                                                           thought=whole.token_ids[:start])
                if self.threshold is not None:
                    outcome.abstention = self.assess(evidence.token_logprobs, evidence.first_step)
                    outcome.certified = self.certificate
                    if outcome.abstention.abstained:
                        yield Piece(0, 0, self.message, finish_reason="stop")
                        yield outcome
                        return  # leaving the block closes the generation: the engine aborts the rest
                yield whole
        yield outcome
