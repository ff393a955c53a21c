"""One top-down admission: a request to a policy becomes a `Plan`, or the error its client gets,
before anything is generated. Every door admits here (the HTTP routes, `steer complete`, the
calibration job, the benchmarks), in this order:

1. resolve the policy, and the request's overrides within its bounds;
2. the kind's refusals (what an abstention or decision policy cannot serve), by field;
3. chat: vLLM's parser (tool calls, a reasoning base's thinking) adjusts the request;
4. render the prompts; a decision on a reasoning base needs a prompt that has ended the thinking;
5. sampling parameters, only for kinds that sample;
6. the engine's limits: the context, and vLLM's own checks of the parameters.

What a request's fields must say of each other (`n` and greedy sampling, `tool_choice` and
`tools`, ...) the door's request models check as they parse it. After admission nothing is
checked again: the policy kinds trust the plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from steering.config import Deployment, PolicyChanges
from steering.config.checks import check_policies_on_runner
from steering.engine import SteeringEngine
from steering.errors import InvalidRequest
from steering.kinds import Plan
from steering.parsing import admit_parsing, parser_class
from steering.policy import Overrides, Policies
from steering.prompts import Conversation
from steering.reasoning import Thinking
from steering.sampling import sampling_params


@dataclass(frozen=True)
class PolicyRequest:
    """A request to one policy, whichever door it came in by."""

    policy: str
    prompt: Conversation | Sequence[str | Sequence[int]]  # a conversation, or prompts (text or token ids)
    overrides: Overrides | None = None
    sampling: Mapping[str, Any] = field(default_factory=dict)  # `SamplingParams` fields but max_tokens
    max_tokens: int | None = None  # None: up to the end of the context
    token_limit_field: str = "max_tokens"  # what the client called the limit, for errors that name it
    num_logprobs: int | None = None  # top logprobs per token the client is shown
    scores_prompt: str | None = None  # the field asking for the prompt's logprobs (echo, prompt_logprobs)
    constraint: str | None = None  # the field constraining the answer's format
    # For a calibration: withhold nothing, keep what the policy's score reads ("score") or what
    # any score reads ("every_score"), in the outcome's evidence.
    collect: Literal["score", "every_score"] | None = None
    trace: bool = False  # each answer token's trace (steering.trace)

    @property
    def asked(self) -> tuple[str, ...]:
        """The fields a policy kind may refuse that this request asks for, in the order a refusal names them."""
        several = not isinstance(self.prompt, Conversation) and len(self.prompt) > 1
        asks = (
            ("n", self.sampling.get("n", 1) > 1),
            ("prompt", several),
            ("logprobs", self.num_logprobs is not None),
            ("tools", isinstance(self.prompt, Conversation) and bool(self.prompt.tools)),
            (self.scores_prompt, self.scores_prompt is not None),
            (self.constraint, self.constraint is not None),
            ("steering.trace", self.trace),
        )
        return tuple(name for name, asked in asks if asked)


class Admission:
    """Admits requests to the policies served now on one engine; a reload changes which."""

    def __init__(self, engine: SteeringEngine, deployment: Deployment | None = None):
        self.engine = engine
        deployment = deployment or engine.deployment
        check_policies_on_runner(deployment, logprobs_at_temperature_one=engine.logprobs_at_temperature_one)
        self.policies = Policies.build(deployment, engine.prompts.encode_text)
        # A parser the base's tokenizer cannot serve fails the start-up; it changes only with a restart.
        self.parser = parser_class(engine.deployment, engine.llm.renderer.tokenizer)

    @property
    def deployment(self) -> Deployment:
        """The deployment whose policies are served now (its base, experts and engine never change)."""
        return self.policies.deployment

    def admit(self, request: PolicyRequest) -> Plan:
        """The request as its policy will run it, or the `RequestError` its client gets."""
        engine = self.engine
        steering = self.policies[request.policy].resolve(request.overrides)
        if request.collect is not None:
            rule = steering.rule.collecting(every_score=request.collect == "every_score")
            steering = dataclasses.replace(steering, rule=rule)
        rule = steering.rule
        refused = next((asked for asked in request.asked if asked in rule.refuses), None)
        if refused is not None:
            raise InvalidRequest(rule.refuses[refused].format(field=refused), param=refused)
        chat = request.prompt if isinstance(request.prompt, Conversation) else None
        tokenizer = engine.llm.renderer.tokenizer
        parsing = None
        if chat is not None and rule.samples:  # a decision answers with a label: nothing of it to parse
            parsing = admit_parsing(request.policy, chat, self.parser, tokenizer, engine.llm.model_config)
        thinking = None
        if self.parser is not None and self.parser.reasoning_parser_cls is not None:
            thinking = Thinking(self.parser.reasoning_parser_cls, tokenizer, chat.chat_template_kwargs if chat else {})
        if request.trace and not engine.logprobs_at_temperature_one:
            raise InvalidRequest("a trace reads each model's prompt logprobs, which are steered on vLLM's V1 model "
                                 "runner only; this engine runs Model Runner V2", param="steering.trace")
        prompts = engine.prompts.prompt_ids(request.prompt)
        prompt_field = "messages" if chat else "prompt"
        if thinking is not None and not rule.samples and not all(map(thinking.ended_by, prompts)):
            raise InvalidRequest(
                f"a decision scores its labels as the answer's first token, right after the prompt, and this base "
                f"thinks first ({engine.deployment.reasoning_parser}): its prompt must end the thinking (a chat "
                "template variable that turns thinking off, or an assistant prefill that closes it)",
                param=prompt_field)
        params = []
        # A traced answer's last token is read by its views as prompt: they need one more position.
        reads_logprobs = (rule.reads_logprobs or 0) if request.trace else rule.reads_logprobs
        for prompt in prompts if rule.samples else ():
            room = engine.max_model_len - len(prompt) - request.trace
            if request.trace and (room < 1 or (request.max_tokens or 0) > room):
                asked = f" and {request.token_limit_field} {request.max_tokens}" if request.max_tokens else ""
                raise InvalidRequest(
                    f"the prompt's {len(prompt)} tokens{asked} leave no room to trace the answer: its views read the "
                    f"prompt and the whole answer, and need one position more in the context of "
                    f"{engine.max_model_len}", param=request.token_limit_field if asked else prompt_field)
            limit = request.max_tokens if request.max_tokens is not None else room
            params.append(sampling_params(request.sampling, max_tokens=limit, reads_logprobs=reads_logprobs,
                                          parsing=parsing))
        for i, prompt in enumerate(prompts):
            engine.check_request(prompt, params[i] if params else None, limit_field=request.token_limit_field,
                                 claim_tokens=len(steering.claim_ids), prompt_field=prompt_field,
                                 constraint=request.constraint)
        return Plan(steering, prompts, params, request.num_logprobs, parsing, request.constraint, request.collect,
                    trace=request.trace, thinking=thinking, digest=self.policies.digest)

    def reload(self, deployment: Deployment) -> PolicyChanges:
        """Serve `deployment`'s policies from the next admission on, or raise (`ConfigError`, or
        `RestartRequired` for anything but policies) and keep serving the current ones.

        A plan admitted before keeps the `Steering` it resolved, so it finishes on its old
        policy. Call it where requests are admitted (the tokenizer is not shared across threads).
        """
        changes = PolicyChanges.of_reload(self.deployment, deployment,
                                          logprobs_at_temperature_one=self.engine.logprobs_at_temperature_one)
        self.policies = Policies.build(deployment, self.engine.prompts.encode_text)  # one assignment: an atomic swap
        return changes
