"""Request admission: a request becomes a `Plan`, or an error, before anything is generated.

This is the one place a request is checked: the policy and its overrides (through
`Policy.resolve`), the prompt lengths against the context, and what each policy kind allows.
Everything after it trusts the plan.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from vllm import SamplingParams

from steering.engine import SteeringEngine
from steering.errors import InvalidRequest
from steering.policy import AbstentionRule, DecisionRule, Overrides, Steering
from steering_server.protocol import CompletionRequest
from steering_server.tools import ToolCalling
from steering_server.translate import GenerationRequest, sampling_params


@dataclass
class Plan:
    """An admitted request: its steering, prompts and sampling parameters."""

    steering: Steering
    prompts: list[list[int]]
    params: list[SamplingParams]
    num_logprobs: int | None  # what the client asked for; abstention asks the engine for more
    tools: ToolCalling | None = None
    constraint: str | None = None  # the field that constrains the answer's format, if one does
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)

    @property
    def name(self) -> str:
        return self.steering.policy


def plan_request(engine: SteeringEngine, request: GenerationRequest, prompts: list[list[int]],
                 tools: ToolCalling | None = None) -> Plan:
    """Admit `request` (its prompts already tokenized, its tools admitted) or raise the error the
    client gets."""
    overrides = request.steering
    steering = engine.policies[request.model].resolve(
        Overrides(overrides.alpha, overrides.abstain_threshold, overrides.costs, overrides.abstain_cost)
        if overrides else None
    )
    rule = steering.rule
    if rule is not None and (len(prompts) > 1 or request.n > 1):
        raise InvalidRequest("abstention and decision policies answer one prompt with one choice",
                             param="n" if request.n > 1 else "prompt")
    if isinstance(rule, DecisionRule) and request.num_logprobs is not None:
        raise InvalidRequest("decision policies answer with a label: logprobs are in steering.decision",
                             param="logprobs")
    if rule is not None and tools is not None:
        raise InvalidRequest("abstention and decision policies answer in text or with a label: tools do not apply",
                             param="tools")
    echo = isinstance(request, CompletionRequest) and request.echo
    if rule is not None and (echo or request.prompt_logprobs is not None):
        field = "echo" if echo else "prompt_logprobs"
        raise InvalidRequest(f"abstention and decision policies score their answer, not the prompt: {field} is "
                             "served by plain policies", param=field)
    constrains = request.response_format is not None and request.response_format.type != "text"
    if isinstance(rule, DecisionRule) and (constrains or request.structured_outputs):
        field = "response_format" if constrains else "structured_outputs"
        raise InvalidRequest(f"decision policies answer with one of their labels: {field} does not apply",
                             param=field)
    params = []
    for prompt in prompts:
        sampling = sampling_params(request, prompt_len=len(prompt), max_model_len=engine.max_model_len)
        if isinstance(rule, AbstentionRule) and sampling.logprobs is None:
            sampling.logprobs = 0  # the answer's own token logprobs, for its confidence score
        if tools is not None:
            tools.constrain(sampling)
        engine.check_request(prompt, sampling, limit_field=request.token_limit_field)
        params.append(sampling)
    constraint = ("tools" if tools is not None and tools.request.structured_outputs is not None
                  else "structured_outputs" if request.structured_outputs is not None
                  else "response_format" if constrains else None)
    return Plan(steering, prompts, params, request.num_logprobs, tools, constraint)
