"""Policies resolved once at start-up (and at each reload), and the one admission check of a request's overrides.

`steering.config.PolicyConfig` is what the YAML says. A `Policy` here is what serving needs,
computed once: the alphas, the pair order, the decision rule (label token ids, cost matrix,
calibration temperature and bias), the abstention rule (calibration map, threshold), and the
bounds an override must keep. `Policy.resolve(overrides)` admits a request's steering; every room after it
trusts the `Steering` it returns and checks nothing again.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from steering.config import Deployment, PolicyConfig, check_cost_shape, digest
from steering.errors import ConfigError, InvalidSteering, UnknownPolicy
from steering.kinds import AbstentionRule, DecisionRule, Kind, Plain, Steering
from steering.rules.decisions import CostMatrix, label_first_tokens


@dataclass(frozen=True)
class Overrides:
    """What a request may change within its policy's bounds (the HTTP `steering` object)."""

    alpha: Mapping[str, float] | None = None
    abstain_threshold: float | None = None
    costs: Sequence[Sequence[float]] | None = None
    abstain_cost: float | None = None
    claim: str | None = None


class Policy:
    """One policy, resolved against the deployment's pairs and the base tokenizer."""

    def __init__(self, name: str, config: PolicyConfig, pair_names: tuple[str, ...],
                 encode: Callable[[str], list[int]]):
        self.name = name
        self.config = config
        self.pair_names = pair_names
        self._encode = encode
        self._default = self._rule(config, encode)

    @staticmethod
    def _rule(config: PolicyConfig, encode) -> Kind:
        if config.decision is not None:
            return DecisionRule(
                label_token_ids=() if config.decision.claim else label_first_tokens(encode, config.decision.labels),
                costs=config.decision.cost_matrix(),
                temperature=config.calibration.temperature if config.calibration else 1.0,
                abstain_message=config.decision.abstain_message,
                bias=tuple(config.calibration.bias) if config.calibration and config.calibration.bias else None,
                certificate=config.calibration.certificate if config.calibration else None,
            )
        if config.abstain is not None:
            abstain = config.abstain
            return AbstentionRule.of(abstain.score, config.calibration, config.abstain_threshold, abstain.message)
        return Plain()

    @property
    def rule(self) -> Kind:
        """The policy's own rule, before any override."""
        return self._default

    def resolve(self, overrides: Overrides | None = None) -> Steering:
        """The steering a request runs with; anything beyond the policy's bounds is refused here."""
        overrides = overrides or Overrides()
        alpha = self._alpha(overrides.alpha or {})
        rule = self._default
        if overrides.abstain_threshold is not None:
            rule = self._threshold(overrides.abstain_threshold)
        if overrides.costs is not None or overrides.abstain_cost is not None:
            rule = self._costs(overrides.costs, overrides.abstain_cost)
        self._check_claim(overrides.claim)
        row = tuple(alpha.get(name, 0.0) for name in self.pair_names)
        claim_ids = tuple(self._encode(overrides.claim)) if overrides.claim is not None else ()
        return Steering(self.name, alpha, row, rule, overrides.claim, claim_ids)

    def _check_claim(self, claim: str | None) -> None:
        checks = isinstance(self._default, DecisionRule) and self._default.checks_claims
        if claim is None and checks:
            raise InvalidSteering("this policy checks a claim: give steering.claim, the answer to check",
                                  param="steering.claim")
        if claim is not None and not checks:
            raise InvalidSteering("this policy does not check claims", param="steering.claim")
        if claim is not None and not claim.strip():
            raise InvalidSteering("the claim is empty", param="steering.claim")

    def _alpha(self, override: Mapping[str, float]) -> dict[str, float]:
        alpha = dict(self.config.alpha)
        for name, value in override.items():
            param = f"steering.alpha.{name}"
            if name not in self.pair_names:
                raise InvalidSteering(f"unknown expert pair {name!r}; this deployment has {list(self.pair_names)}",
                                      param=param)
            _check_finite(value, param)
            if self.config.max_alpha is None:
                raise InvalidSteering("this policy does not allow alpha overrides", param=param)
            if abs(value) > self.config.max_alpha:
                raise InvalidSteering(f"alpha {value} for {name!r} is beyond this policy's max_alpha "
                                      f"{self.config.max_alpha}", param=param)
            alpha[name] = float(value)
        return alpha

    def _threshold(self, threshold: float) -> AbstentionRule:
        param = "steering.abstain_threshold"
        if not isinstance(self._default, AbstentionRule):
            raise InvalidSteering("this policy does not abstain", param=param)
        _check_finite(threshold, param)
        bounds = self.config.abstain.threshold_bounds
        if bounds is None:
            raise InvalidSteering("this policy does not allow threshold overrides", param=param)
        if not bounds[0] <= threshold <= bounds[1]:
            raise InvalidSteering(f"threshold {threshold} is outside this policy's bounds {list(bounds)}", param=param)
        return dataclasses.replace(self._default, threshold=float(threshold))

    def _costs(self, costs: Sequence[Sequence[float]] | None, abstain_cost: float | None) -> DecisionRule:
        param = "steering.costs" if costs is not None else "steering.abstain_cost"
        if not isinstance(self._default, DecisionRule):
            raise InvalidSteering("this policy makes no decisions", param=param)
        max_cost = self.config.decision.max_cost
        if max_cost is None:
            raise InvalidSteering("this policy does not allow cost overrides", param=param)
        matrix = self._default.costs
        if costs is not None:
            try:
                check_cost_shape(costs, len(matrix.labels))
            except ValueError as error:
                raise InvalidSteering(str(error), param="steering.costs") from None
            _check_cost_bounds([c for row in costs for c in row], max_cost, "steering.costs")
            matrix = CostMatrix(matrix.labels, tuple(tuple(float(c) for c in row) for row in costs),
                                matrix.abstain_cost)
        if abstain_cost is not None:
            if matrix.abstain_cost is None:
                raise InvalidSteering("this policy has no abstain action", param="steering.abstain_cost")
            _check_cost_bounds([abstain_cost], max_cost, "steering.abstain_cost")
            matrix = CostMatrix(matrix.labels, matrix.costs, float(abstain_cost))
        return dataclasses.replace(self._default, costs=matrix)


def _check_finite(value: object, param: str) -> None:
    """Overrides come from HTTP (already finite), the CLI and Python callers: this door is theirs."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidSteering(f"{param} must be a finite number", param=param)


def _check_cost_bounds(values: list[float], max_cost: float, param: str) -> None:
    for value in values:
        _check_finite(value, param)
        if not 0 <= value <= max_cost:
            raise InvalidSteering(f"cost {value} is outside this policy's bounds [0, {max_cost}]", param=param)


class Policies(Mapping[str, Policy]):
    """Every policy of a deployment by name; an unknown name is the request's error.

    Immutable, with the deployment it was built from: a reload builds a new one and swaps it in
    whole, so an admission sees one set or the other, never a mix.
    """

    def __init__(self, policies: dict[str, Policy], deployment: Deployment):
        self._policies = policies
        self.deployment = deployment
        self.digest = digest(deployment)  # what a response's outcome is recorded against

    @classmethod
    def build(cls, deployment: Deployment, encode: Callable[[str], list[int]]) -> Policies:
        """Resolve each policy once; `encode` is the base tokenizer's (text -> ids, no special tokens)."""
        pairs = deployment.pair_names
        policies = {}
        for name, config in deployment.policies.items():
            try:
                policies[name] = Policy(name, config, pairs, encode)
            except ValueError as error:  # labels that share a first token
                raise ConfigError(f"policies.{name}.decision.labels", str(error)) from None
        return cls(policies, deployment)

    def __getitem__(self, name: str) -> Policy:
        try:
            return self._policies[name]
        except KeyError:
            raise UnknownPolicy(name, self._policies) from None

    def __contains__(self, name: object) -> bool:
        return name in self._policies

    def __iter__(self) -> Iterator[str]:
        return iter(self._policies)

    def __len__(self) -> int:
        return len(self._policies)
