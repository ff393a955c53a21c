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

    @property
    def prompt_tokens(self) -> int:
        """The input the engine reads: every prompt, and a claim check's claim."""
        return sum(len(prompt) for prompt in self.prompts) + len(self.steering.claim_ids)


def plan_request(engine: SteeringEngine, request: GenerationRequest, prompts: list[list[int]],
                 tools: ToolCalling | None = None) -> Plan:
    """Admit `request` (its prompts already tokenized, its tools admitted) or raise the error the
    client gets."""
    overrides = request.steering
    steering = engine.policies[request.model].resolve(
        Overrides(overrides.alpha, overrides.abstain_threshold, overrides.costs, overrides.abstain_cost,
                  overrides.claim)
        if overrides else None
    )
    rule = steering.rule
    constrains = request.response_format is not None and request.response_format.type != "text"
    if rule is not None:
        _refuse_what_the_rule_cannot_serve(rule, request, prompts, tools, constrains)
    claim = len(steering.claim_ids)
    if claim and len(prompts[0]) + claim >= engine.max_model_len:  # and a step after it, for the answer's end
        raise InvalidRequest(f"the prompt's {len(prompts[0])} tokens and the claim's {claim} leave no room for the "
                             f"answer's end in the context of {engine.max_model_len}", param="steering.claim")
    params = []
    for prompt in prompts:
        sampling = sampling_params(request, prompt_len=len(prompt), max_model_len=engine.max_model_len)
        if isinstance(rule, AbstentionRule):
            # The answer's own token logprobs (and the top ones its score reads), for its confidence
            # score; the client still gets the number it asked for.
            sampling.logprobs = max(sampling.logprobs or 0, rule.top_logprobs)
        if tools is not None:
            tools.constrain(sampling)
        engine.check_request(prompt, sampling, limit_field=request.token_limit_field)
        params.append(sampling)
    constraint = ("tools" if tools is not None and tools.request.structured_outputs is not None
                  else "structured_outputs" if request.structured_outputs is not None
                  else "response_format" if constrains else None)
    return Plan(steering, prompts, params, request.num_logprobs, tools, constraint)


RULES = (AbstentionRule, DecisionRule)


def _refuse_what_the_rule_cannot_serve(rule: AbstentionRule | DecisionRule, request: GenerationRequest,
                                       prompts: list[list[int]], tools: ToolCalling | None, constrains: bool) -> None:
    """An abstention or decision policy answers one prompt with one scored answer (or a label):
    the first field it cannot serve is refused by name."""
    echo = isinstance(request, CompletionRequest) and request.echo
    scored_prompt = "echo" if echo else "prompt_logprobs"
    constraint = "response_format" if constrains else "structured_outputs"
    # (the rules that refuse it, whether the request asks for it, the field named, why)
    refusals = (
        (RULES, len(prompts) > 1 or request.n > 1, "n" if request.n > 1 else "prompt",
         "abstention and decision policies answer one prompt with one choice"),
        (DecisionRule, request.num_logprobs is not None, "logprobs",
         "decision policies answer with a label: logprobs are in steering.decision"),
        (RULES, tools is not None, "tools",
         "abstention and decision policies answer in text or with a label: tools do not apply"),
        (RULES, echo or request.prompt_logprobs is not None, scored_prompt,
         f"abstention and decision policies score their answer, not the prompt: {scored_prompt} is served by plain "
         "policies"),
        (DecisionRule, constrains or request.structured_outputs is not None, constraint,
         f"decision policies answer with one of their labels: {constraint} does not apply"),
    )
    for kinds, asked, param, reason in refusals:
        if asked and isinstance(rule, kinds):
            raise InvalidRequest(reason, param=param)
