"""The deployment config: its schema (`schema`), vLLM's engine options (`engine_options`), the checks
made before an engine starts (`checks`), LoRA adapters as tuned experts (`adapters`), and what a
reload may change (`reload`)."""

from steering.config.adapters import tuned_checkpoint
from steering.config.checks import load_deployment
from steering.config.engine_options import EngineOptions
from steering.config.reload import PolicyChanges, check_reloadable, digest
from steering.config.schema import (
    AbstainConfig,
    DecisionConfig,
    Deployment,
    ExpertPair,
    FeedbackConfig,
    PolicyConfig,
    RiskTarget,
    check_cost_shape,
    checkpoint_name,
    parse_deployment,
    read_deployment,
)

__all__ = [
    "AbstainConfig",
    "DecisionConfig",
    "Deployment",
    "EngineOptions",
    "ExpertPair",
    "FeedbackConfig",
    "PolicyChanges",
    "PolicyConfig",
    "RiskTarget",
    "check_cost_shape",
    "check_reloadable",
    "checkpoint_name",
    "digest",
    "load_deployment",
    "parse_deployment",
    "read_deployment",
    "tuned_checkpoint",
]
