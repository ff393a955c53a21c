"""Decision policies: score each label's first token, one single-token engine request per label
(a claim check: the claim's tokens, then one per token that ends an answer; `steering.scoring`
says why one request per token), and answer with the Bayes action.

Sampling fields do not apply; the answer is the action's label, or the abstain message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from steering.kinds.refusals import SCORED
from steering.kinds.run import Outcome, Piece, Plan
from steering.rules.calibration import Certificate
from steering.rules.decisions import CostMatrix, Decision, bayes_decision
from steering.scoring import decision_logprobs

if TYPE_CHECKING:
    from steering.engine import SteeringEngine


@dataclass(frozen=True)
class DecisionRule:
    """Answer with the Bayes action over labels scored by their first token, calibrated; or, for a
    claim check (`label_token_ids` empty), over "the answer is the claim" and "it is not"."""

    label_token_ids: tuple[int, ...]  # () for a claim check
    costs: CostMatrix
    temperature: float  # 1: uncalibrated
    abstain_message: str
    bias: tuple[float, ...] | None = None  # after the temperature, per label (a fitted claim check's)
    certificate: Certificate | None = None  # a stated risk: its threshold on p(labels[0]) decides

    refuses: ClassVar[Mapping[str, str]] = {
        **SCORED,
        "steering.trace": "decision policies generate no answer to trace: each label's probability is in "
                          "steering.decision",
        "logprobs": "decision policies answer with a label: logprobs are in steering.decision",
        "response_format": "decision policies answer with one of their labels: {field} does not apply",
        "structured_outputs": "decision policies answer with one of their labels: {field} does not apply",
    }
    samples: ClassVar[bool] = False
    reads_logprobs: ClassVar[int | None] = None

    @property
    def checks_claims(self) -> bool:
        return not self.label_token_ids

    def collecting(self, *, every_score: bool = False) -> DecisionRule:
        """A decision keeps its label logprobs anyway: it is run as it is."""
        return self

    def decide(self, label_logprobs: Sequence[float]) -> Decision:
        return bayes_decision(label_logprobs, self.costs, self.temperature, self.bias, self.threshold)

    @property
    def threshold(self) -> float | None:
        return self.certificate.threshold if self.certificate else None

    async def run(self, engine: SteeringEngine, plan: Plan) -> AsyncIterator[Piece | Outcome]:
        """One piece, the chosen action's label; the outcome reports probabilities, costs and the action."""
        outcome, steering = plan.outcome, plan.steering
        logprobs, outcome.claim_logprob = await decision_logprobs(
            engine, plan.prompts[0], self.label_token_ids, steering.claim_ids, steering.alpha_row,
            request_id=plan.request_id)
        outcome.evidence.label_logprobs = list(logprobs)
        outcome.decision = bayes_decision(logprobs, self.costs, self.temperature, self.bias, self.threshold)
        outcome.certified = self.certificate
        outcome.completion_tokens = 1
        text = self.abstain_message if outcome.decision.abstained else outcome.decision.action
        yield Piece(0, 0, text, finish_reason="stop")
        yield outcome
