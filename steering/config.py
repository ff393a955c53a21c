"""The deployment schema: a base, named expert pairs, policies and engine options, from YAML.

`load_deployment` parses, validates the schema, then opens every checkpoint's config and
tokenizer; any problem is a `ConfigError` naming the field (e.g. `experts.chat.tuned`).
Relative paths are relative to the YAML file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from steering.errors import ConfigError, InvalidSteering, UnknownPolicy

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
PairName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")]
PolicyName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")]

# Engine options the service sets itself; a config that sets them would silently break steering.
RESERVED_ENGINE_OPTIONS = frozenset(
    {"model", "tokenizer", "hf_overrides", "logits_processors", "logprobs_mode", "skip_tokenizer_init"}
)


def _resolve_path(value: str, info: ValidationInfo) -> str:
    """Make a relative path absolute against the YAML file's folder; leave hub ids alone."""
    root = (info.context or {}).get("root")
    path = Path(value).expanduser()
    if not path.is_absolute() and root is not None and (Path(root) / path).exists():
        return str((Path(root) / path).resolve())
    return str(path.resolve()) if path.exists() else value


ModelPath = Annotated[str, AfterValidator(_resolve_path)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExpertPair(_Strict):
    """The same small model after tuning (`tuned`) and before it (`untuned`)."""

    tuned: ModelPath
    untuned: ModelPath


class Policy(_Strict):
    """What a request that names this policy gets; overrides stay within its bounds."""

    description: str = ""
    alpha: dict[PairName, FiniteFloat] = Field(default_factory=dict)
    max_alpha: Annotated[FiniteFloat, Field(ge=0)] | None = Field(
        default=None, description="Bound on |alpha| for per-request overrides; none allowed if unset."
    )

    def alpha_for(self, override: Mapping[str, float] | None, pair_names: tuple[str, ...]) -> dict[str, float]:
        """The alphas a request runs with: the policy's, with the request's overrides applied."""
        alpha = dict(self.alpha)
        for name, value in (override or {}).items():
            param = f"steering.alpha.{name}"
            if name not in pair_names:
                raise InvalidSteering(
                    f"unknown expert pair {name!r}; this deployment has {list(pair_names)}", param=param
                )
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise InvalidSteering(f"alpha for {name!r} must be a finite number", param=param)
            if self.max_alpha is None:
                raise InvalidSteering("this policy does not allow alpha overrides", param=param)
            if abs(value) > self.max_alpha:
                raise InvalidSteering(
                    f"alpha {value} for {name!r} is beyond this policy's max_alpha {self.max_alpha}",
                    param=param,
                )
            alpha[name] = float(value)
        return alpha


class EngineOptions(BaseModel):
    """Options passed to vLLM's engine as they are (any `AsyncEngineArgs` field but the reserved)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    dtype: str = "auto"
    max_model_len: Annotated[int, Field(gt=0)] | None = None
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.3
    seed: int = 0

    @model_validator(mode="after")
    def _known_options(self) -> EngineOptions:
        from vllm.engine.arg_utils import AsyncEngineArgs

        known = set(AsyncEngineArgs.__dataclass_fields__)
        for name in self.model_extra or {}:
            if name in RESERVED_ENGINE_OPTIONS:
                raise ConfigError(f"engine.{name}", "is set by the steering service, not the config")
            if name not in known:
                raise ConfigError(f"engine.{name}", "is not a vLLM engine option (AsyncEngineArgs)")
        return self

    def engine_kwargs(self) -> dict[str, Any]:
        return self.model_dump()


class Deployment(_Strict):
    """A whole deployment: one frozen base, its expert pairs, the policies served over them."""

    base: ModelPath
    experts: dict[PairName, ExpertPair] = Field(default_factory=dict)
    policies: dict[PolicyName, Policy] = Field(min_length=1)
    engine: EngineOptions = Field(default_factory=EngineOptions)

    @model_validator(mode="after")
    def _policies_name_known_pairs(self) -> Deployment:
        for name, policy in self.policies.items():
            for pair in policy.alpha:
                if pair not in self.experts:
                    raise ConfigError(
                        f"policies.{name}.alpha.{pair}",
                        f"unknown expert pair; defined pairs: {sorted(self.experts)}",
                    )
        return self

    @property
    def pair_names(self) -> tuple[str, ...]:
        return tuple(self.experts)

    def policy(self, name: str) -> Policy:
        try:
            return self.policies[name]
        except KeyError:
            raise UnknownPolicy(
                f"the policy {name!r} does not exist; policies: {sorted(self.policies)}", param="model"
            ) from None


def parse_deployment(raw: Any, *, root: Path | None = None) -> Deployment:
    """Validate a config mapping against the schema (no filesystem checks)."""
    if not isinstance(raw, dict):
        raise ConfigError("config", "must be a mapping with base, experts, policies and engine")
    try:
        return Deployment.model_validate(raw, context={"root": root})
    except ValidationError as error:
        raise _config_error(error) from None


def load_deployment(path: str | Path) -> Deployment:
    """Read, validate and check a deployment YAML file; fail with the offending field named."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError("config", f"cannot read {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError("config", f"{path} is not valid YAML: {error}") from None
    deployment = parse_deployment(raw, root=path.parent)
    check_checkpoints(deployment)
    return deployment


def check_checkpoints(deployment: Deployment) -> None:
    """Every checkpoint loads, its architecture runs in vLLM, and experts share the base's tokenizer."""
    base_vocab = _open_checkpoint("base", deployment.base)
    for name, pair in deployment.experts.items():
        for role in ("tuned", "untuned"):
            field = f"experts.{name}.{role}"
            _compare_vocab(field, _open_checkpoint(field, getattr(pair, role)), base_vocab)


def _open_checkpoint(field: str, path: str) -> dict[str, int]:
    """Check that `path` holds a vLLM-supported model; return its tokenizer's vocabulary."""
    from transformers import AutoConfig, AutoTokenizer
    from vllm import ModelRegistry

    if not Path(path).exists() and not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        raise ConfigError(field, f"path {path!r} does not exist")
    try:
        config = AutoConfig.from_pretrained(path)
        vocab = AutoTokenizer.from_pretrained(path).get_vocab()
    except (OSError, ValueError) as error:
        raise ConfigError(field, f"cannot load a model and tokenizer from {path!r}: {error}") from None
    architectures = getattr(config, "architectures", None) or []
    if not set(architectures) & set(ModelRegistry.get_supported_archs()):
        raise ConfigError(field, f"architecture {architectures} of {path!r} is not supported by vLLM")
    return vocab


def _compare_vocab(field: str, vocab: dict[str, int], base_vocab: dict[str, int]) -> None:
    """Every base token must mean the same id to the expert; extra expert tokens are sliced away."""
    differing = sorted(
        ((token, index) for token, index in base_vocab.items() if vocab.get(token) != index),
        key=lambda item: item[1],
    )
    if differing:
        token, index = differing[0]
        raise ConfigError(
            field,
            f"tokenizer differs from the base's ({len(differing)} of the base's {len(base_vocab)} "
            f"tokens differ, first {token!r} (id {index}) -> {vocab.get(token)}); "
            "proxy-tuning needs a shared vocabulary",
        )


def _config_error(error: ValidationError) -> ConfigError:
    problems = [
        (".".join(str(part) for part in item["loc"]) or "config", item["msg"].removeprefix("Value error, "))
        for item in error.errors()
    ]
    field, reason = problems[0]
    if len(problems) > 1:
        reason += "; also " + "; ".join(f"{f}: {r}" for f, r in problems[1:])
    return ConfigError(field, reason)
