"""What chat and completions share: a request admitted on the admission thread, its policy kind run
and counted, the answer sent whole or as server-sent events. Each endpoint's serving says how its
request becomes a `PolicyRequest` and how pieces become its response and chunks."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from steering.admission import PolicyRequest
from steering.errors import InvalidSteering
from steering.kinds import Outcome, Piece, Plan, joined
from steering.trace import traced
from steering_server.errors import error_body
from steering_server.feedback.serving import FeedbackServing
from steering_server.lifecycle import Lifecycle
from steering_server.metrics import ServerMetrics
from steering_server.protocol import GenerationRequest, SteeringInfo, StreamChunk, Usage
from steering_server.streaming import CLIENT_CLOSED_REQUEST, sse, until_disconnected


class GenerationServing:
    """One generation endpoint: admit, run, answer."""

    endpoint: str

    def __init__(self, lifecycle: Lifecycle, metrics: ServerMetrics, *, keyed: bool,
                 feedback: FeedbackServing | None = None):
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.keyed = keyed  # an API key guards the server: evidence may be asked for
        self.feedback = feedback  # issues each decision's and abstention's feedback id

    def policy_request(self, body: GenerationRequest) -> PolicyRequest:
        raise NotImplementedError

    def response(self, body: GenerationRequest, plan: Plan, pieces: list[Piece]) -> BaseModel:
        raise NotImplementedError

    def chunks(self, body: GenerationRequest, plan: Plan) -> AsyncIterator[BaseModel]:
        raise NotImplementedError

    async def handle(self, request: Request, body: GenerationRequest) -> Response:
        """The answer to `body`: refused before anything is generated, or streamed, or whole."""
        request.state.policy = body.model
        plan = await self.lifecycle.on_admission_thread(self.plan, body)
        if body.stream:
            events = sse(steering_on_last_finish(self.chunks(body, plan), choices=len(plan.prompts) * body.n),
                         on_end=lambda error: self._ended(plan, error),
                         on_abandoned=lambda: self.metrics.aborted.labels(plan.name).inc())
            return StreamingResponse(events, media_type="text/event-stream")
        answered = await until_disconnected(request, self.answer(plan))
        if answered is None:
            self.metrics.aborted.labels(plan.name).inc()
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        self.metrics.answered(plan, self.endpoint)
        return JSONResponse(self.response(body, plan, answered[0]).model_dump())

    def plan(self, body: GenerationRequest) -> Plan:
        """Admit the request (on the admission thread); raises before anything is generated."""
        if body.steering is not None and body.steering.evidence is not None and not self.keyed:
            raise InvalidSteering("evidence is served only behind an API key (steer serve --api-key): it shows "
                                  "what every answer was scored on", param="steering.evidence")
        return self.lifecycle.ready().admit(self.policy_request(body))

    async def answer(self, plan: Plan) -> tuple[list[Piece], Outcome]:
        """Every choice's whole answer, and the outcome; cancelling aborts the engine requests."""
        pieces = [piece async for piece in self.pieces(plan)]
        return joined(pieces), plan.outcome

    async def pieces(self, plan: Plan) -> AsyncIterator[Piece]:
        """The pieces the plan's kind yields, as they may be shown; the tokens it computed are
        counted however it ends (answered, failed, or abandoned)."""
        engine = self.lifecycle.ready().engine
        items = plan.rule.run(engine, plan)
        first = True
        try:
            async for item in traced(engine, plan, items) if plan.trace else items:
                if isinstance(item, Outcome):
                    return
                if first:
                    self.metrics.first_token.labels(plan.name).observe(time.perf_counter() - plan.started)
                    first = False
                yield item
        finally:
            self.metrics.computed(plan)

    def _ended(self, plan: Plan, error: Exception | None) -> None:
        if error is None:
            self.metrics.answered(plan, self.endpoint)
        else:
            self.metrics.refused(plan.name, self.endpoint, *error_body(error))

    def steering(self, plan: Plan) -> SteeringInfo:
        """The response's `steering` block: what the policy did, and the id its outcome is fed back by."""
        feedback_id = self.feedback.issue(plan) if self.feedback is not None else None
        return SteeringInfo.model_validate(plan.outcome.report() | {"feedback_id": feedback_id})

    @staticmethod
    def usage(plan: Plan) -> Usage:
        completion = plan.outcome.completion_tokens
        return Usage(prompt_tokens=plan.prompt_tokens, completion_tokens=completion,
                     total_tokens=plan.prompt_tokens + completion)

    def stream_usage(self, body: GenerationRequest, plan: Plan) -> Usage | None:
        """The usage a stream reports at its end: only when `stream_options.include_usage` asks."""
        include = body.stream_options is not None and body.stream_options.include_usage
        return self.usage(plan) if include else None

    def chunk_usage(self, body: GenerationRequest, plan: Plan) -> Usage | None:
        """The usage so far on every chunk, as vLLM's `stream_options.continuous_usage_stats` asks."""
        options = body.stream_options
        return self.stream_usage(body, plan) if options and options.continuous_usage_stats else None


async def steering_on_last_finish(chunks: AsyncIterator[StreamChunk], *, choices: int) -> AsyncIterator[StreamChunk]:
    """The stream with its `steering` block also on the chunk that finishes the last choice, since
    some clients (LiteLLM) drop the final chunk, which has no choices. That chunk is held back
    until the final one comes, right after it once the policy's outcome is known, and then sent
    with the final chunk's block."""
    finished, held = 0, None
    try:
        async for chunk in chunks:
            if held is not None:
                yield held.model_copy(update={"steering": chunk.steering})
                held = None
            finished += sum(choice.finish_reason is not None for choice in chunk.choices)
            if chunk.choices and finished == choices:
                held = chunk
                continue
            yield chunk
    except Exception:
        if held is not None:  # the stream failed after all: what was held goes before its error event
            yield held
        raise
    if held is not None:
        yield held
