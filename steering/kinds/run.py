"""What a policy kind yields: pieces of the answer as they may be shown, then the outcome they add
up to (the facts of the response's `steering` block, and what its scores were read from)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from vllm import SamplingParams

from steering.parsing import ChatParsing
from steering.reasoning import Thinking
from steering.rules.abstention import Abstention, FirstStep
from steering.rules.calibration import Certificate
from steering.rules.decisions import Decision

if TYPE_CHECKING:
    from steering.engine import SteeringEngine


class Kind(Protocol):
    """A policy kind's rule: what admission reads of it, and how it runs a plan."""

    refuses: ClassVar[Mapping[str, str]]  # request field -> why this kind cannot serve it ({field} in it)
    samples: ClassVar[bool]  # whether it samples an answer (sampling parameters apply)
    reads_logprobs: int | None  # top logprobs per answer token its score reads (None: it reads none)

    def collecting(self, *, every_score: bool = False) -> Kind:
        """This rule as a calibration runs it: withholding nothing, keeping what a score reads."""

    def run(self, engine: SteeringEngine, plan: Plan) -> AsyncIterator[Piece | Outcome]:
        """The answer's pieces as they may be shown, then the plan's outcome."""


@dataclass(frozen=True)
class Steering:
    """A request's admitted steering: what the engine applies and the server reports."""

    policy: str
    alpha: dict[str, float]  # per pair named by the policy or the request, as reported
    alpha_row: tuple[float, ...]  # one per expert pair, in the engine's pair order (absent: 0)
    rule: Kind  # the policy's kind, with its rule
    claim: str | None = None  # what a claim check checks, as sent
    claim_ids: tuple[int, ...] = ()  # and tokenized by the base's tokenizer, to continue the prompt


@dataclass
class Plan:
    """An admitted request: its steering, prompts and sampling parameters, and the outcome its
    policy kind fills as it runs."""

    steering: Steering
    prompts: list[list[int]]
    params: list[SamplingParams]  # one per prompt; none for a kind that does not sample
    num_logprobs: int | None = None
    parsing: ChatParsing | None = None  # chat: how vLLM's parser reads the answers (thinking, tool calls)
    constraint: str | None = None
    collect: str | None = None  # a calibration's: "score" or "every_score" (the rule withholds nothing)
    trace: bool = False  # each answer token's trace goes with it (steering.trace)
    thinking: Thinking | None = None  # a reasoning base's: where its final answers begin
    digest: str = ""  # of the config whose policies admitted it
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.outcome = Outcome(self.steering.policy, self.steering.alpha, claim=self.steering.claim,
                               shows_evidence=self.collect is not None)

    @property
    def name(self) -> str:
        return self.steering.policy

    @property
    def rule(self) -> Kind:
        return self.steering.rule

    @property
    def prompt_tokens(self) -> int:
        """The input the engine reads: every prompt, and a claim check's claim."""
        return sum(len(prompt) for prompt in self.prompts) + len(self.steering.claim_ids)


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
    stop_reason: int | str | None = None  # vLLM's: the stop string or token id that ended it (None at EOS)
    trace: Sequence[Any] | None = None  # with steering.trace: a `steering.trace.TraceEntry` per token


@dataclass
class Evidence:
    """What a score or a decision was computed from: enough to compute it again, or to fit it."""

    token_logprobs: list[float] | None = None  # abstention: the answer's steered token logprobs
    first_step: FirstStep | None = None  # abstention, scores that read the base alone
    label_logprobs: list[float] | None = None  # decision: each label's steered logprob

    def as_json(self) -> dict:
        """The evidence as JSON; `of_json` reads it back exactly (floats round-trip through JSON)."""
        return {"token_logprobs": self.token_logprobs, "label_logprobs": self.label_logprobs,
                "first_step": None if self.first_step is None else self.first_step.as_json()}

    @classmethod
    def of_json(cls, data: Mapping) -> Evidence:
        step = data.get("first_step")
        return cls(data.get("token_logprobs"), None if step is None else FirstStep.of_json(step),
                   data.get("label_logprobs"))


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
    certified: Certificate | None = None  # what the policy certifies, if it states a risk
    shows_evidence: bool = False  # a calibration's request: the report carries the evidence

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
                "abstention": None if self.abstention is None else self.abstention.report(),
                "evidence": self.evidence.as_json() if self.shows_evidence else None,
                "certified": self.certified.report() if self.certified else None}


def joined(pieces: list[Piece]) -> list[Piece]:
    """Deltas merged into one whole piece per (prompt, choice), in choice order."""
    whole: dict[tuple[int, int], Piece] = {}
    for p in pieces:
        key = (p.prompt_index, p.index)
        if key not in whole:
            whole[key] = Piece(p.prompt_index, p.index, "", [], [] if p.logprobs is not None else None,
                               trace=[] if p.trace is not None else None)
        w = whole[key]
        w.text += p.text
        w.token_ids = [*w.token_ids, *p.token_ids]
        if p.trace is not None and w.trace is not None:
            w.trace = [*w.trace, *p.trace]
        if p.logprobs is not None and w.logprobs is not None:
            w.logprobs = [*w.logprobs, *p.logprobs]
        if p.finish_reason is not None:
            w.finish_reason, w.stop_reason = p.finish_reason, p.stop_reason
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

