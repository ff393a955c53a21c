"""A per-token trace of what steering changed: for each answer token, its steered log-probability,
the base alone's, each pair's contribution, and the base alone's own choice where it differs (a flip).

Read by teacher forcing, piece by piece as the answer comes: for each piece, one prefill request
per view over the prompt and the answer so far, asking for prompt logprobs. The views are the base
(with its top token: the flip) and each distinct expert checkpoint of a pair whose alpha is not 0;
the composite answers a view's prompt rows with that one sub-model's logits (steering.composite).
The answer itself is untouched: its request only reports its sampled tokens' logprobs, the steered
ones, and the views are requests of their own.

A pair's contribution is alpha * (log p_tuned - log p_untuned) at the token. It differs from the
logit form alpha * (tuned - untuned) by a constant per position (each model's normaliser), which
the steered distribution does not see.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm import SamplingParams

from steering.kinds.run import Outcome, Piece, Plan
from steering.steer import BASE_VIEW, expert_view

if TYPE_CHECKING:
    from steering.config import Deployment
    from steering.engine import SteeringEngine


@dataclass(frozen=True)
class Flip:
    """The token the base alone would have chosen (its likeliest) where steering chose another."""

    token_id: int
    token: str
    base_logprob: float


@dataclass(frozen=True)
class TraceEntry:
    """One answer token, as steering and the base alone see it."""

    token_id: int
    token: str
    logprob: float  # steered, at temperature 1
    base_logprob: float
    contributions: dict[str, float]  # per pair with a nonzero alpha: alpha * (log p_tuned - log p_untuned)
    flip: Flip | None


@dataclass(frozen=True)
class Term:
    """One pair's part of the steered sum: its alpha and the views of its two models."""

    pair: str
    alpha: float
    tuned: int
    untuned: int


def terms(deployment: Deployment, alpha_row: Sequence[float]) -> tuple[Term, ...]:
    """The pairs with a nonzero alpha, each model by the view of its checkpoint's first user: a
    checkpoint shared by several pairs is read once."""
    first: dict[str, int] = {}
    found = []
    for i, ((name, pair), alpha) in enumerate(zip(deployment.experts.items(), alpha_row)):
        views = {role: first.setdefault(getattr(pair, role), expert_view(i, role)) for role in ("tuned", "untuned")}
        if alpha:
            found.append(Term(name, float(alpha), views["tuned"], views["untuned"]))
    return tuple(found)


class Tracer:
    """The trace of one plan's answers, piece by piece."""

    def __init__(self, engine: SteeringEngine, plan: Plan):
        self.engine = engine
        self.plan = plan
        self.terms = terms(engine.deployment, plan.steering.alpha_row)
        self.views = (BASE_VIEW, *dict.fromkeys(v for t in self.terms for v in (t.tuned, t.untuned)))
        self.answers: dict[tuple[int, int], list[int]] = {}  # (prompt, choice) -> its tokens so far
        self.num_rounds = 0

    async def entries(self, piece: Piece) -> list[TraceEntry]:
        """The trace of the piece's tokens: one request per view over the prompt and the answer so far."""
        if not piece.token_ids:
            return []
        answer = self.answers.setdefault((piece.prompt_index, piece.index), [])
        answer.extend(piece.token_ids)
        sequence = [*self.plan.prompts[piece.prompt_index], *answer]
        first = len(sequence) - len(piece.token_ids)
        self.num_rounds += 1
        read = await asyncio.gather(*(self._view(sequence, view, n) for n, view in enumerate(self.views)))
        logprobs = dict(zip(self.views, read))  # view -> prompt logprobs of `sequence`
        entries = []
        for k, token in enumerate(piece.token_ids):
            steered, base = piece.logprobs[k][token], logprobs[BASE_VIEW][first + k]
            of = {view: logprobs[view][first + k][token].logprob for view in self.views}
            top = next(t for t, lp in base.items() if lp.rank == 1)
            flip = None if top == token else Flip(top, base[top].decoded_token or "", base[top].logprob)
            entries.append(TraceEntry(
                token, steered.decoded_token or "", steered.logprob, of[BASE_VIEW],
                {t.pair: t.alpha * (of[t.tuned] - of[t.untuned]) for t in self.terms}, flip))
        return entries

    async def _view(self, sequence: list[int], view: int, n: int) -> Sequence[Mapping[int, Any]]:
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1 if view == BASE_VIEW else 0)
        output = await self.engine.complete(sequence, params, alpha_row=(0.0,) * len(self.plan.steering.alpha_row),
                                            request_id=f"{self.plan.request_id}-trace{self.num_rounds}-{n}", view=view)
        return output.prompt_logprobs


async def traced(engine: SteeringEngine, plan: Plan,
                 items: AsyncIterator[Piece | Outcome]) -> AsyncIterator[Piece | Outcome]:
    """A policy kind's pieces, each with the trace of its tokens; the outcome as it comes. While a
    piece is traced the answer goes on generating, so the next piece brings what came meanwhile."""
    tracer = Tracer(engine, plan)
    async with aclosing(items) as stream:
        async for item in stream:
            if isinstance(item, Piece):
                item = dataclasses.replace(item, trace=await tracer.entries(item))
            yield item
