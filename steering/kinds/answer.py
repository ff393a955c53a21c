"""What a policy kind yields: pieces of the answer as they may be shown, then the outcome they add
up to (the facts of the response's `steering` block, and what its scores were read from)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from steering.rules.abstention import Abstention, FirstStep
from steering.rules.decisions import Decision

if TYPE_CHECKING:
    from steering.admission import Plan
    from steering.engine import SteeringEngine


@dataclass
class Piece:
    """Part of one choice's answer: a streamed delta, or the whole answer."""

    prompt_index: int
    index: int
    text: str
    token_ids: Sequence[int] = ()
    logprobs: Sequence[Mapping[int, Any]] | None = None  # vLLM's Logprob per candidate token
    finish_reason: str | None = None
    prompt_logprobs: Sequence[Mapping[int, Any] | None] | None = None  # on a prompt's first piece, if asked


@dataclass
class Evidence:
    """What a score or a decision was computed from: enough to compute it again, or to fit it."""

    token_logprobs: list[float] | None = None  # abstention: the answer's steered token logprobs
    first_step: FirstStep | None = None  # abstention, scores that read the base alone
    label_logprobs: list[float] | None = None  # decision: each label's steered logprob


@dataclass
class Outcome:
    """What running a policy came to; complete once the kind has yielded it."""

    policy: str
    alpha: dict[str, float]
    completion_tokens: int = 0
    abstention: Abstention | None = None
    decision: Decision | None = None
    claim: str | None = None  # a claim check's claim, as sent
    claim_logprob: float | None = None
    evidence: Evidence = field(default_factory=Evidence)

    @property
    def abstained(self) -> bool | None:
        """Whether the answer was withheld (the abstention message, or the abstain action)."""
        judged = self.abstention or self.decision
        return None if judged is None else judged.abstained

    @property
    def confidence(self) -> float | None:
        judged = self.abstention or self.decision
        return None if judged is None else judged.confidence

    def report(self) -> dict:
        """The response's `steering` block."""
        decision = None
        if self.decision is not None:
            claim = {"claim": self.claim, "claim_logprob": self.claim_logprob} if self.claim is not None else {}
            decision = self.decision.report() | claim
        return {"policy": self.policy, "alpha": self.alpha, "abstained": self.abstained,
                "confidence": self.confidence, "decision": decision,
                "abstention": None if self.abstention is None else self.abstention.report()}


def joined(pieces: list[Piece]) -> list[Piece]:
    """Deltas merged into one whole piece per (prompt, choice), in choice order."""
    whole: dict[tuple[int, int], Piece] = {}
    for p in pieces:
        key = (p.prompt_index, p.index)
        if key not in whole:
            whole[key] = Piece(p.prompt_index, p.index, "", [], [] if p.logprobs is not None else None)
        w = whole[key]
        w.text += p.text
        w.token_ids = [*w.token_ids, *p.token_ids]
        if p.logprobs is not None and w.logprobs is not None:
            w.logprobs = [*w.logprobs, *p.logprobs]
        w.finish_reason = p.finish_reason or w.finish_reason
        w.prompt_logprobs = w.prompt_logprobs or p.prompt_logprobs
    return [whole[key] for key in sorted(whole)]


async def answer(engine: SteeringEngine, plan: Plan) -> tuple[list[Piece], Outcome]:
    """Every choice's whole answer, and the outcome: the policy run to its end."""
    pieces = []
    async for item in plan.rule.run(engine, plan):
        if isinstance(item, Outcome):
            return joined(pieces), item
        pieces.append(item)
    raise RuntimeError(f"the {type(plan.rule).__name__} kind ended without its outcome")

