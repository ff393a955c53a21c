"""Decision policies: score each label's first token, one single-token engine request per label
(a claim check: the claim's tokens, then one per token that ends an answer), and answer with the
Bayes action. `SteeringEngine.next_token_logprobs` says why one request per token.

Sampling fields do not apply; the answer is the action's label, or the abstain message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from steering.engine import SteeringEngine
from steering.policy import DecisionRule
from steering.rules.decisions import claim_label_logprobs
from steering_server.metrics import ServerMetrics
from steering_server.pieces import Outcome, Piece
from steering_server.plan import Plan


async def decide(engine: SteeringEngine, plan: Plan, outcome: Outcome, metrics: ServerMetrics) -> AsyncIterator[Piece]:
    """One piece: the chosen action's label; `outcome` reports probabilities, costs and the action."""
    rule: DecisionRule = plan.steering.rule
    report = {}
    if rule.checks_claims:
        said = await engine.claim_logprob(plan.prompts[0], plan.steering, request_id=plan.request_id)
        logprobs = claim_label_logprobs(said)
        report = {"claim": plan.steering.claim, "claim_logprob": said}
    else:
        logprobs = await engine.label_logprobs(plan.prompts[0], plan.steering, request_id=plan.request_id)
    decision = rule.decide(logprobs)
    outcome.completion_tokens = 1
    outcome.steering.abstained = decision.abstained
    outcome.steering.confidence = decision.confidence
    outcome.steering.decision = decision.report() | report
    metrics.decisions.labels(plan.name, decision.action).inc()
    yield Piece(0, 0, rule.abstain_message if decision.abstained else decision.action, finish_reason="stop")
