"""GET /v1/models and /v1/models/{model}: every policy as a model, with its base and expert pairs
by name (never a filesystem path), and its rule: what it does after steering."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from steering.config import PolicyConfig, checkpoint_name
from steering.errors import UnknownPolicy
from steering_server.deps import AnyState, Server
from steering_server.models.protocol import AbstentionCard, CertifiedRisk, DecisionCard, ModelCard, ModelList
from steering_server.openapi import ERRORS

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, responses=ERRORS)
async def list_models(server: AnyState) -> ModelList:
    return ModelList(data=model_cards(server))


@router.get("/v1/models/{model}", response_model=ModelCard, responses=ERRORS)
async def retrieve_model(request: Request, model: str, server: AnyState) -> ModelCard:
    request.state.policy = model
    (card,) = model_cards(server, model)
    return card


def model_cards(server: Server, name: str | None = None) -> list[ModelCard]:
    """Every policy (or the one named), from one deployment even if a reload swaps it meanwhile."""
    d = server.lifecycle.deployment
    if name is not None and name not in d.policies:
        raise UnknownPolicy(name, d.policies)
    cards = []
    for policy_name, policy in d.policies.items():
        if name not in (None, policy_name):
            continue
        experts = {pair: {"tuned": checkpoint_name(d.experts[pair].tuned),
                          "untuned": checkpoint_name(d.experts[pair].untuned)} for pair in policy.alpha}
        cards.append(ModelCard(id=policy_name, created=server.reloader.created.get(policy_name, int(time.time())),
                               description=policy.description, base=checkpoint_name(d.base), experts=experts,
                               alpha=policy.alpha, max_alpha=policy.max_alpha, **rule(policy)))
    return cards


def rule(policy: PolicyConfig) -> dict:
    """The card's fields for what the policy does after steering."""
    abstain, decision = policy.abstain, policy.decision
    certificate = policy.calibration.certificate if policy.calibration is not None else None
    card = {"kind": "decision" if decision else "abstention" if abstain else "plain", "abstention": None,
            "decision": None, "certified": None if certificate is None else CertifiedRisk(**certificate.report())}
    if abstain is not None:
        card["abstention"] = AbstentionCard(score=abstain.score, threshold=policy.abstain_threshold,
                                            threshold_bounds=abstain.threshold_bounds, message=abstain.message)
    if decision is not None:
        matrix = decision.cost_matrix()
        card["decision"] = DecisionCard(labels=matrix.labels, actions=matrix.actions, costs=matrix.costs,
                                        abstain_cost=matrix.abstain_cost, max_cost=decision.max_cost,
                                        claim=decision.claim)
    return card
