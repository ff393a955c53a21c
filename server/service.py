"""One service per endpoint: resolve the policy, run the engine, shape the OpenAI response.

Three kinds of policy share the flow:

- plain (steering only): generate; stream tokens as they come.
- abstention: generate, score the answer's steered token probabilities, and replace the answer
  by the policy's message when the calibrated confidence is below the threshold. Streaming
  holds the answer back until the score is known: after the first token for `first_prob`
  (the rest then streams live, or is aborted when abstaining), at the end for `mean_prob` and
  `min_prob`. Nothing of an answer that is abstained on is ever sent.
- decision: score each label's first token in one engine step and answer with the Bayes
  action's label (or the abstain message); sampling fields do not apply.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from vllm import SamplingParams
from vllm.logprobs import Logprob
from vllm.utils.async_utils import merge_async_iterators

from server.metrics import ServerMetrics
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    SteeringInfo,
    SteeringRequest,
    Usage,
)
from server.translate import GenerationRequest, chat_logprobs, completion_logprobs, sampling_params
from steering.config import Policy
from steering.decisions import Abstention, CostMatrix
from steering.engine import SteeringEngine, answer_logprobs
from steering.errors import InvalidRequest


@dataclass
class Plan:
    """A validated request: policy, alphas, prompts, sampling parameters, and the decision rule."""

    name: str
    policy: Policy
    alpha: dict[str, float]
    prompts: list[list[int]]
    params: list[SamplingParams]
    num_logprobs: int | None  # what the client asked for; abstention asks the engine for more
    threshold: float | None = None  # abstention policies
    costs: CostMatrix | None = None  # decision policies
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)


@dataclass
class Piece:
    """Part of one choice's answer: a streamed delta, or the whole answer."""

    prompt_index: int
    index: int
    text: str
    token_ids: Sequence[int] = ()
    logprobs: Sequence[dict[int, Logprob]] | None = None
    finish_reason: str | None = None


@dataclass
class Outcome:
    """The steering block and token count, complete once the answer is."""

    steering: SteeringInfo
    completion_tokens: int = 0


class GenerationService:
    """What chat and completions share: planning, running, deciding, usage and metrics."""

    endpoint: str

    def __init__(self, engine: SteeringEngine, metrics: ServerMetrics):
        self.engine = engine
        self.deployment = engine.deployment
        self.metrics = metrics

    def prompt_ids(self, request: GenerationRequest) -> list[list[int]]:
        raise NotImplementedError

    def plan(self, request: GenerationRequest) -> Plan:
        """Resolve policy, overrides and rule, check lengths; raises before anything is generated."""
        policy = self.deployment.policy(request.model)
        override = request.steering or SteeringRequest()
        alpha = policy.alpha_for(override.alpha, self.deployment.pair_names)
        threshold = costs = None
        # A rule override on a policy without that rule is refused by threshold_for / costs_for.
        if policy.abstain or override.abstain_threshold is not None:
            threshold = policy.threshold_for(override.abstain_threshold)
        if policy.decision or override.costs is not None or override.abstain_cost is not None:
            costs = policy.costs_for(override.costs, override.abstain_cost)
        prompts = self.prompt_ids(request)
        if (policy.abstain or policy.decision) and (len(prompts) > 1 or request.n > 1):
            raise InvalidRequest("abstention and decision policies answer one prompt with one choice",
                                 param="n" if request.n > 1 else "prompt")
        if policy.decision and request.num_logprobs is not None:
            raise InvalidRequest("decision policies answer with a label: logprobs are in steering.decision",
                                 param="logprobs")
        params = []
        for prompt in prompts:
            sampling = sampling_params(request, prompt_len=len(prompt), max_model_len=self.engine.max_model_len)
            if policy.abstain and sampling.logprobs is None:
                sampling.logprobs = 0  # the answer's own token logprobs, for its confidence score
            self.engine.check_request(prompt, sampling)
            params.append(sampling)
        return Plan(request.model, policy, alpha, prompts, params, request.num_logprobs, threshold, costs)

    async def answer(self, plan: Plan) -> tuple[list[Piece], Outcome]:
        """Every choice's whole answer, and the outcome; cancelling aborts the engine requests."""
        outcome = Outcome(SteeringInfo(policy=plan.name, alpha=plan.alpha))
        pieces = [piece async for piece in self.pieces(plan, outcome)]
        return _joined(pieces), outcome

    async def pieces(self, plan: Plan, outcome: Outcome) -> AsyncIterator[Piece]:
        """Answer pieces as they may be shown; `outcome` is complete when the iteration ends."""
        if plan.policy.decision:
            stream = self._decision(plan, outcome)
        elif plan.policy.abstain:
            stream = self._abstention(plan, outcome)
        else:
            stream = self._generation(plan, outcome)
        first = True
        async for piece in stream:
            if first:
                self.metrics.first_token.labels(plan.name).observe(time.perf_counter() - plan.started)
                first = False
            yield piece
        self._record(plan, outcome)

    async def _generation(self, plan: Plan, outcome: Outcome) -> AsyncIterator[Piece]:
        streams = [
            self.engine.generate(prompt, params, alpha=plan.alpha, request_id=f"{plan.request_id}-{i}")
            for i, (prompt, params) in enumerate(zip(plan.prompts, plan.params))
        ]
        async for prompt_index, output in merge_async_iterators(*streams):
            for c in output.outputs:
                outcome.completion_tokens += len(c.token_ids)
                yield Piece(prompt_index, c.index, c.text, c.token_ids, c.logprobs, c.finish_reason)

    async def _abstention(self, plan: Plan, outcome: Outcome) -> AsyncIterator[Piece]:
        held: list[Piece] = []
        logprobs: list[float] = []
        decides_early = plan.policy.abstain.score == "first_prob"
        assessment: Abstention | None = None
        async with aclosing(self._generation(plan, outcome)) as stream:
            async for piece in stream:
                if assessment is not None:
                    yield piece
                    continue
                held.append(piece)
                logprobs += answer_logprobs(piece.token_ids, piece.logprobs)
                if (decides_early and logprobs) or piece.finish_reason is not None:
                    assessment = plan.policy.assess(logprobs[:1] if decides_early else logprobs, plan.threshold)
                    self._report_abstention(plan, outcome, assessment)
                    if assessment.abstained:
                        yield Piece(0, 0, plan.policy.abstain.message, finish_reason="stop")
                        return  # leaving the block closes the generation: the engine aborts the rest
                    (whole,) = _joined(held)
                    yield whole

    async def _decision(self, plan: Plan, outcome: Outcome) -> AsyncIterator[Piece]:
        labels = self.engine.label_token_ids(plan.costs.labels)
        logprobs = await self.engine.label_logprobs(plan.prompts[0], labels, alpha=plan.alpha,
                                                    request_id=plan.request_id)
        decision = plan.policy.decide(logprobs, plan.costs)
        outcome.completion_tokens = 1
        outcome.steering.abstained = decision.abstained
        outcome.steering.confidence = decision.confidence
        outcome.steering.decision = decision.report()
        self.metrics.decisions.labels(plan.name, decision.action).inc()
        text = plan.policy.decision.abstain_message if decision.abstained else decision.action
        yield Piece(0, 0, text, finish_reason="stop")

    def _report_abstention(self, plan: Plan, outcome: Outcome, assessment: Abstention) -> None:
        outcome.steering.abstained = assessment.abstained
        outcome.steering.confidence = assessment.confidence
        outcome.steering.abstention = assessment.report()
        if assessment.abstained:
            self.metrics.abstentions.labels(plan.name).inc()

    def usage(self, plan: Plan, outcome: Outcome) -> Usage:
        prompt_tokens = sum(len(p) for p in plan.prompts)
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=outcome.completion_tokens,
                     total_tokens=prompt_tokens + outcome.completion_tokens)

    def stream_usage(self, request: GenerationRequest, plan: Plan, outcome: Outcome) -> Usage | None:
        """The usage a stream reports at its end: only when `stream_options.include_usage` asks."""
        include = request.stream_options is not None and request.stream_options.include_usage
        return self.usage(plan, outcome) if include else None

    def _record(self, plan: Plan, outcome: Outcome) -> None:
        self.metrics.prompt_tokens.labels(plan.name).inc(sum(len(p) for p in plan.prompts))
        self.metrics.generation_tokens.labels(plan.name).inc(outcome.completion_tokens)
        self.metrics.latency.labels(plan.name, self.endpoint).observe(time.perf_counter() - plan.started)


def _joined(pieces: list[Piece]) -> list[Piece]:
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
    return [whole[key] for key in sorted(whole)]


class ChatCompletions(GenerationService):
    """POST /v1/chat/completions: one conversation, rendered with the base's chat template."""

    endpoint = "chat"

    def prompt_ids(self, request: ChatCompletionRequest) -> list[list[int]]:
        if not self.engine.tokenizer.chat_template:
            raise InvalidRequest("the base model has no chat template; use /v1/completions", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        return [self.engine.chat_prompt(messages)]

    def _logprobs(self, plan: Plan, piece: Piece):
        if plan.num_logprobs is None or piece.logprobs is None:
            return None
        return chat_logprobs(piece.token_ids, piece.logprobs, plan.num_logprobs)

    def response(self, request: ChatCompletionRequest, plan: Plan, pieces: list[Piece], outcome: Outcome) -> ChatCompletion:
        choices = [
            ChatChoice(index=p.index, message=AssistantMessage(content=p.text), logprobs=self._logprobs(plan, p),
                       finish_reason=p.finish_reason)
            for p in pieces
        ]
        return ChatCompletion(model=plan.name, choices=choices, usage=self.usage(plan, outcome),
                              steering=outcome.steering)

    async def chunks(self, request: ChatCompletionRequest, plan: Plan) -> AsyncIterator[ChatCompletionChunk]:
        chunk_id = f"chatcmpl-{plan.request_id}"

        def chunk(choices, **extra) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=chunk_id, created=plan.created, model=plan.name, choices=choices, **extra)

        yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")) for i in range(request.n)])
        outcome = Outcome(SteeringInfo(policy=plan.name, alpha=plan.alpha))
        async for p in self.pieces(plan, outcome):
            yield chunk([ChatChunkChoice(index=p.index, delta=ChatDelta(content=p.text),
                                         logprobs=self._logprobs(plan, p), finish_reason=p.finish_reason)])
        yield chunk([], usage=self.stream_usage(request, plan, outcome), steering=outcome.steering)


class Completions(GenerationService):
    """POST /v1/completions: one or more prompts, text or token ids."""

    endpoint = "completions"

    def prompt_ids(self, request: CompletionRequest) -> list[list[int]]:
        return [self.engine.encode(p) if isinstance(p, str) else list(p) for p in request.prompts()]

    def _choice(self, request: CompletionRequest, plan: Plan, p: Piece) -> CompletionChoice:
        logprobs = None
        if plan.num_logprobs is not None and p.logprobs is not None:
            logprobs = completion_logprobs(p.token_ids, p.logprobs, plan.num_logprobs)
        return CompletionChoice(index=p.prompt_index * request.n + p.index, text=p.text, logprobs=logprobs,
                                finish_reason=p.finish_reason)

    def response(self, request: CompletionRequest, plan: Plan, pieces: list[Piece], outcome: Outcome) -> Completion:
        return Completion(model=plan.name, choices=[self._choice(request, plan, p) for p in pieces],
                          usage=self.usage(plan, outcome), steering=outcome.steering)

    async def chunks(self, request: CompletionRequest, plan: Plan) -> AsyncIterator[CompletionChunk]:
        chunk_id = f"cmpl-{plan.request_id}"
        outcome = Outcome(SteeringInfo(policy=plan.name, alpha=plan.alpha))
        async for p in self.pieces(plan, outcome):
            yield CompletionChunk(id=chunk_id, created=plan.created, model=plan.name,
                                  choices=[self._choice(request, plan, p)])
        yield CompletionChunk(id=chunk_id, created=plan.created, model=plan.name, choices=[],
                              usage=self.stream_usage(request, plan, outcome), steering=outcome.steering)
