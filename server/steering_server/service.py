"""One service per endpoint: admit the request, run its policy kind, shape the OpenAI response.

The policy kinds live in their own modules (`generation`, `abstention`, `decision`); planning
in `plan`. What is shared here is the flow: admission, the kind's pieces, usage and metrics.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from steering.engine import SteeringEngine
from steering.policy import AbstentionRule, DecisionRule
from steering_server.abstention import answer_or_abstain
from steering_server.decision import decide
from steering_server.generation import generate
from steering_server.metrics import ServerMetrics
from steering_server.pieces import Outcome, Piece, joined
from steering_server.plan import Plan, plan_request
from steering_server.protocol import (
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
    Usage,
)
from steering_server.tokens import chat_ids
from steering_server.tools import tool_calling
from steering_server.translate import (
    GenerationRequest,
    chat_logprobs,
    completion_logprobs,
    prompt_logprobs_body,
)


class GenerationService:
    """What chat and completions share: admission, running the policy kind, usage and metrics."""

    endpoint: str

    def __init__(self, engine: SteeringEngine, metrics: ServerMetrics):
        self.engine = engine
        self.metrics = metrics

    def prompt_ids(self, request: GenerationRequest) -> list[list[int]]:
        raise NotImplementedError

    def plan(self, request: GenerationRequest) -> Plan:
        """Admit the request; raises before anything is generated."""
        return plan_request(self.engine, request, self.prompt_ids(request))

    async def answer(self, plan: Plan) -> tuple[list[Piece], Outcome]:
        """Every choice's whole answer, and the outcome; cancelling aborts the engine requests."""
        outcome = _outcome(plan)
        pieces = [piece async for piece in self.pieces(plan, outcome)]
        return joined(pieces), outcome

    async def pieces(self, plan: Plan, outcome: Outcome) -> AsyncIterator[Piece]:
        """Answer pieces as they may be shown; `outcome` is complete when the iteration ends."""
        rule = plan.steering.rule
        if isinstance(rule, DecisionRule):
            stream = decide(self.engine, plan, outcome, self.metrics)
        elif isinstance(rule, AbstentionRule):
            stream = answer_or_abstain(self.engine, plan, outcome, self.metrics)
        else:
            stream = generate(self.engine, plan, outcome)
        first = True
        try:
            async for piece in stream:
                if first:
                    self.metrics.first_token.labels(plan.name).observe(time.perf_counter() - plan.started)
                    first = False
                yield piece
            self.metrics.latency.labels(plan.name, self.endpoint).observe(time.perf_counter() - plan.started)
        finally:  # tokens of an aborted or failed request were computed too
            self.metrics.prompt_tokens.labels(plan.name).inc(plan.prompt_tokens)
            self.metrics.generation_tokens.labels(plan.name).inc(outcome.completion_tokens)

    def usage(self, plan: Plan, outcome: Outcome) -> Usage:
        return Usage(prompt_tokens=plan.prompt_tokens, completion_tokens=outcome.completion_tokens,
                     total_tokens=plan.prompt_tokens + outcome.completion_tokens)

    def stream_usage(self, request: GenerationRequest, plan: Plan, outcome: Outcome) -> Usage | None:
        """The usage a stream reports at its end: only when `stream_options.include_usage` asks."""
        include = request.stream_options is not None and request.stream_options.include_usage
        return self.usage(plan, outcome) if include else None

    def chunk_usage(self, request: GenerationRequest, plan: Plan, outcome: Outcome) -> Usage | None:
        """The usage so far on every chunk, as vLLM's `stream_options.continuous_usage_stats` asks."""
        options = request.stream_options
        return self.stream_usage(request, plan, outcome) if options and options.continuous_usage_stats else None


def _outcome(plan: Plan) -> Outcome:
    return Outcome(SteeringInfo(policy=plan.name, alpha=plan.steering.alpha))


class ChatCompletions(GenerationService):
    """POST /v1/chat/completions: one conversation, rendered with the base's chat template."""

    endpoint = "chat"

    def prompt_ids(self, request: ChatCompletionRequest) -> list[list[int]]:
        tools = [tool.model_dump() for tool in request.tools] if request.tools else None
        return [chat_ids(self.engine, request.messages, template_kwargs=request.chat_template_kwargs, tools=tools)]

    def plan(self, request: ChatCompletionRequest) -> Plan:
        tools = tool_calling(self.engine, request)
        return plan_request(self.engine, request, self.prompt_ids(request), tools)

    def _logprobs(self, plan: Plan, piece: Piece):
        if plan.num_logprobs is None or piece.logprobs is None:
            return None
        return chat_logprobs(piece.token_ids, piece.logprobs, plan.num_logprobs)

    def _message(self, plan: Plan, p: Piece) -> tuple[AssistantMessage, str | None]:
        if plan.tools is None:
            return AssistantMessage(content=p.text), p.finish_reason
        prompt = plan.prompts[p.prompt_index]
        return plan.tools.message(plan.tools.parser(prompt), p.text, p.token_ids, p.finish_reason)

    def response(self, request: ChatCompletionRequest, plan: Plan, pieces: list[Piece], outcome: Outcome) -> ChatCompletion:
        choices = []
        for p in pieces:
            message, finish_reason = self._message(plan, p)
            choices.append(ChatChoice(index=p.index, message=message, logprobs=self._logprobs(plan, p),
                                      finish_reason=finish_reason))
        prompt_logprobs = next((p.prompt_logprobs for p in pieces if p.prompt_logprobs is not None), None)
        return ChatCompletion(model=plan.name, choices=choices, usage=self.usage(plan, outcome),
                              steering=outcome.steering,
                              prompt_logprobs=prompt_logprobs_body(prompt_logprobs) if prompt_logprobs else None)

    async def chunks(self, request: ChatCompletionRequest, plan: Plan) -> AsyncIterator[ChatCompletionChunk]:
        chunk_id = f"chatcmpl-{plan.request_id}"

        def chunk(choices, **extra) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=chunk_id, created=plan.created, model=plan.name, choices=choices, **extra)

        outcome = _outcome(plan)
        yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")) for i in range(request.n)],
                    usage=self.chunk_usage(request, plan, outcome))
        tools = plan.tools
        parsers = {i: tools.parser(plan.prompts[0]) for i in range(request.n)} if tools else {}
        called: set[int] = set()  # choices that streamed a tool call
        async for p in self.pieces(plan, outcome):
            delta, finish_reason = ChatDelta(content=p.text), p.finish_reason
            if tools is not None:
                delta = tools.delta(parsers[p.index], p.text, p.token_ids, plan.prompts[0],
                                    finished=p.finish_reason is not None) or ChatDelta()
                if delta.tool_calls:
                    called.add(p.index)
                if finish_reason is not None and tools.ends_with_calls(p.index in called, finish_reason):
                    finish_reason = "tool_calls"
            if delta == ChatDelta() and finish_reason is None:
                continue  # the parser holds it back (a tool call being read)
            yield chunk([ChatChunkChoice(index=p.index, delta=delta, logprobs=self._logprobs(plan, p),
                                         finish_reason=finish_reason)],
                        usage=self.chunk_usage(request, plan, outcome))
        yield chunk([], usage=self.stream_usage(request, plan, outcome), steering=outcome.steering)


class Completions(GenerationService):
    """POST /v1/completions: one or more prompts, text or token ids."""

    endpoint = "completions"

    def prompt_ids(self, request: CompletionRequest) -> list[list[int]]:
        return [self.engine.encode(p) if isinstance(p, str) else list(p) for p in request.prompts()]

    def _choice(self, request: CompletionRequest, plan: Plan, p: Piece, *, echo: bool = False,
                prompt_logprobs=None) -> CompletionChoice:
        """One choice's piece; with `echo`, the prompt (and its logprobs) goes first, as in vLLM."""
        prompt_logprobs = p.prompt_logprobs or prompt_logprobs
        text, token_ids, logprobs = p.text, list(p.token_ids), p.logprobs
        if request.max_tokens == 0:  # echo only: the one token generated is left out
            text, token_ids, logprobs = "", [], None if logprobs is None else []
        if echo:
            prompt = plan.prompts[p.prompt_index]
            given = request.prompts()[p.prompt_index]
            text = (given if isinstance(given, str) else self.engine.decode(prompt)) + text
            token_ids = [*prompt, *token_ids]
            if logprobs is not None:
                logprobs = [*prompt_logprobs, *logprobs]
        body = None
        if plan.num_logprobs is not None and logprobs is not None:
            body = completion_logprobs(token_ids, logprobs, plan.num_logprobs,
                                       decode=lambda token: self.engine.decode([token]))
        return CompletionChoice(index=p.prompt_index * request.n + p.index, text=text, logprobs=body,
                                finish_reason=p.finish_reason,
                                prompt_logprobs=prompt_logprobs_body(prompt_logprobs)
                                if request.prompt_logprobs is not None and prompt_logprobs else None)

    def response(self, request: CompletionRequest, plan: Plan, pieces: list[Piece], outcome: Outcome) -> Completion:
        return Completion(model=plan.name, choices=[self._choice(request, plan, p, echo=request.echo) for p in pieces],
                          usage=self.usage(plan, outcome), steering=outcome.steering)

    async def chunks(self, request: CompletionRequest, plan: Plan) -> AsyncIterator[CompletionChunk]:
        chunk_id = f"cmpl-{plan.request_id}"
        outcome = _outcome(plan)
        echoed: set[tuple[int, int]] = set()  # (prompt, choice): the prompt goes before its first piece
        prompt_logprobs: dict[int, list] = {}  # by prompt; with n > 1 they come with one choice's piece
        async for p in self.pieces(plan, outcome):
            if p.prompt_logprobs is not None:
                prompt_logprobs[p.prompt_index] = p.prompt_logprobs
            echo = request.echo and (p.prompt_index, p.index) not in echoed
            echoed.add((p.prompt_index, p.index))
            choice = self._choice(request, plan, p, echo=echo, prompt_logprobs=prompt_logprobs.get(p.prompt_index))
            yield CompletionChunk(id=chunk_id, created=plan.created, model=plan.name,
                                  choices=[choice], usage=self.chunk_usage(request, plan, outcome))
        yield CompletionChunk(id=chunk_id, created=plan.created, model=plan.name, choices=[],
                              usage=self.stream_usage(request, plan, outcome), steering=outcome.steering)
