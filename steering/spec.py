"""What a composite engine is made of besides its base: the expert pairs.

Plain data with no vLLM import: the facade writes it into vLLM's `hf_overrides`, and every
engine process reads it back from the HF config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

ARCHITECTURE = "ProxyTunedForCausalLM"  # the name vLLM knows the composite model by
ROLES = ("tuned", "untuned")


@dataclass(frozen=True)
class ExpertPairSpec:
    name: str
    tuned: str
    untuned: str


@dataclass(frozen=True)
class CompositeSpec:
    """What the composite is made of; travels to engine processes inside the HF config."""

    pairs: tuple[ExpertPairSpec, ...]

    def hf_overrides(self) -> dict:
        return {"architectures": [ARCHITECTURE], "proxy_tuning": {"pairs": [asdict(pair) for pair in self.pairs]}}

    @classmethod
    def from_hf_config(cls, hf_config) -> CompositeSpec:
        return cls(pairs=tuple(ExpertPairSpec(**pair) for pair in hf_config.proxy_tuning["pairs"]))

    @property
    def expert_checkpoints(self) -> list[tuple[str, str]]:
        """(module name, checkpoint path) of every expert model: pair by pair, tuned first."""
        return [(f"experts.{pair.name}.{role}", getattr(pair, role)) for pair in self.pairs for role in ROLES]

