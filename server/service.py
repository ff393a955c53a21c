"""One service per endpoint: resolve the policy, run the engine, shape the OpenAI response."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from vllm import SamplingParams
from vllm.outputs import CompletionOutput, RequestOutput
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
    Usage,
)
from server.translate import GenerationRequest, chat_logprobs, completion_logprobs, sampling_params
from steering.engine import SteeringEngine
from steering.errors import InvalidRequest


@dataclass
class Plan:
    """A validated request: its policy, alphas, prompts and per-prompt sampling parameters."""

    policy: str
    alpha: dict[str, float]
    prompts: list[list[int]]
    params: list[SamplingParams]
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)

    def steering(self) -> SteeringInfo:
        return SteeringInfo(policy=self.policy, alpha=self.alpha)


class GenerationService:
    """What chat and completions share: planning, running, usage and metrics."""

    endpoint: str

    def __init__(self, engine: SteeringEngine, metrics: ServerMetrics):
        self.engine = engine
        self.deployment = engine.deployment
        self.metrics = metrics

    def prompt_ids(self, request: GenerationRequest) -> list[list[int]]:
        raise NotImplementedError

    def plan(self, request: GenerationRequest) -> Plan:
        """Resolve policy and overrides and check lengths; raises before anything is generated."""
        policy = self.deployment.policy(request.model)
        override = request.steering.alpha if request.steering else None
        alpha = policy.alpha_for(override, self.deployment.pair_names)
        prompts = self.prompt_ids(request)
        params = []
        for prompt in prompts:
            sampling = sampling_params(request, prompt_len=len(prompt), max_model_len=self.engine.max_model_len)
            self.engine.check_request(prompt, sampling)
            params.append(sampling)
        return Plan(request.model, alpha, prompts, params)

    async def run(self, plan: Plan) -> list[RequestOutput]:
        """Final outputs, one per prompt; cancelling this aborts every engine request."""
        finals: list[RequestOutput | None] = [None] * len(plan.prompts)
        async for index, output in self._merged(plan):
            finals[index] = output
        self.record(plan, sum(len(c.token_ids) for output in finals for c in output.outputs))
        return finals

    async def stream(self, plan: Plan) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, delta output) pairs as the engine produces them."""
        first = True
        async for index, output in self._merged(plan):
            if first:
                self.metrics.first_token.labels(plan.policy).observe(time.perf_counter() - plan.started)
                first = False
            yield index, output

    def _merged(self, plan: Plan) -> AsyncIterator[tuple[int, RequestOutput]]:
        return merge_async_iterators(
            *(
                self.engine.generate(prompt, params, alpha=plan.alpha, request_id=f"{plan.request_id}-{i}")
                for i, (prompt, params) in enumerate(zip(plan.prompts, plan.params))
            )
        )

    def usage(self, plan: Plan, completion_tokens: int) -> Usage:
        prompt_tokens = sum(len(p) for p in plan.prompts)
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)

    def stream_usage(self, request: GenerationRequest, plan: Plan, completion_tokens: int) -> Usage | None:
        """The usage a stream reports at its end: only when `stream_options.include_usage` asks."""
        self.record(plan, completion_tokens)
        include = request.stream_options is not None and request.stream_options.include_usage
        return self.usage(plan, completion_tokens) if include else None

    def record(self, plan: Plan, completion_tokens: int) -> None:
        self.metrics.prompt_tokens.labels(plan.policy).inc(sum(len(p) for p in plan.prompts))
        self.metrics.generation_tokens.labels(plan.policy).inc(completion_tokens)
        self.metrics.latency.labels(plan.policy, self.endpoint).observe(time.perf_counter() - plan.started)


class ChatCompletions(GenerationService):
    """POST /v1/chat/completions: one conversation, rendered with the base's chat template."""

    endpoint = "chat"

    def prompt_ids(self, request: ChatCompletionRequest) -> list[list[int]]:
        if not self.engine.tokenizer.chat_template:
            raise InvalidRequest("the base model has no chat template; use /v1/completions", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        return [self.engine.chat_prompt(messages)]

    def response(self, request: ChatCompletionRequest, plan: Plan, finals: list[RequestOutput]) -> ChatCompletion:
        (output,) = finals
        choices = [
            ChatChoice(
                index=c.index,
                message=AssistantMessage(content=c.text),
                logprobs=chat_logprobs(c.token_ids, c.logprobs, request.top_logprobs or 0) if request.logprobs else None,
                finish_reason=c.finish_reason,
            )
            for c in output.outputs
        ]
        completion_tokens = sum(len(c.token_ids) for c in output.outputs)
        return ChatCompletion(model=plan.policy, choices=choices, usage=self.usage(plan, completion_tokens),
                              steering=plan.steering())

    async def chunks(self, request: ChatCompletionRequest, plan: Plan) -> AsyncIterator[ChatCompletionChunk]:
        chunk_id = f"chatcmpl-{plan.request_id}"

        def chunk(choices, **extra) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=chunk_id, created=plan.created, model=plan.policy, choices=choices, **extra)

        yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                     for i in range(request.n)])
        completion_tokens = 0
        async for _, output in self.stream(plan):
            choices = []
            for c in output.outputs:
                completion_tokens += len(c.token_ids)
                choices.append(ChatChunkChoice(
                    index=c.index,
                    delta=ChatDelta(content=c.text),
                    logprobs=chat_logprobs(c.token_ids, c.logprobs, request.top_logprobs or 0) if request.logprobs else None,
                    finish_reason=c.finish_reason,
                ))
            yield chunk(choices)
        yield chunk([], usage=self.stream_usage(request, plan, completion_tokens), steering=plan.steering())


class Completions(GenerationService):
    """POST /v1/completions: one or more prompts, text or token ids."""

    endpoint = "completions"

    def prompt_ids(self, request: CompletionRequest) -> list[list[int]]:
        return [self.engine.encode(p) if isinstance(p, str) else list(p) for p in request.prompts()]

    def _choice(self, request: CompletionRequest, prompt_index: int, c: CompletionOutput) -> CompletionChoice:
        return CompletionChoice(
            index=prompt_index * request.n + c.index,
            text=c.text,
            logprobs=completion_logprobs(c.token_ids, c.logprobs, request.logprobs) if request.logprobs is not None else None,
            finish_reason=c.finish_reason,
        )

    def response(self, request: CompletionRequest, plan: Plan, finals: list[RequestOutput]) -> Completion:
        choices = [self._choice(request, i, c) for i, output in enumerate(finals) for c in output.outputs]
        completion_tokens = sum(len(c.token_ids) for output in finals for c in output.outputs)
        return Completion(model=plan.policy, choices=choices, usage=self.usage(plan, completion_tokens),
                          steering=plan.steering())

    async def chunks(self, request: CompletionRequest, plan: Plan) -> AsyncIterator[CompletionChunk]:
        chunk_id = f"cmpl-{plan.request_id}"
        completion_tokens = 0
        async for index, output in self.stream(plan):
            completion_tokens += sum(len(c.token_ids) for c in output.outputs)
            yield CompletionChunk(id=chunk_id, created=plan.created, model=plan.policy,
                                  choices=[self._choice(request, index, c) for c in output.outputs])
        yield CompletionChunk(id=chunk_id, created=plan.created, model=plan.policy, choices=[],
                              usage=self.stream_usage(request, plan, completion_tokens),
                              steering=plan.steering())
