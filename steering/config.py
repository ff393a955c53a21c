"""The deployment schema: a base, named expert pairs, policies and engine options, from YAML.

`load_deployment` parses, validates the schema, then opens every checkpoint's config and
tokenizer; any problem is a `ConfigError` naming the field (e.g. `experts.chat.tuned`).
Relative paths are relative to the YAML file.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PydanticUserError,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from steering.errors import ConfigError, RestartRequired
from steering.memory import GiB
from steering.rules.abstention import FITTED_SCORES, SCORES
from steering.rules.calibration import Calibration, FiniteFloat
from steering.rules.decisions import CostMatrix, label_first_tokens
from steering.spec import describe_quantization, quantization

NonNegative = Annotated[float, Field(allow_inf_nan=False, ge=0)]
Probability = Annotated[float, Field(allow_inf_nan=False, ge=0, le=1)]
PairName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")]
PolicyName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")]

# Engine options the service sets itself; a config that sets them would silently break steering.
RESERVED_ENGINE_OPTIONS = frozenset(
    {"model", "tokenizer", "hf_overrides", "logits_processors", "logprobs_mode", "skip_tokenizer_init"}
)
KV_CACHE_SIZES = ("kv_cache_gib", "kv_cache_memory_bytes", "gpu_memory_utilization")


def _resolve_path(value: str, info: ValidationInfo) -> str:
    """Make a relative path absolute against the YAML file's folder; leave hub ids alone."""
    root = (info.context or {}).get("root")
    path = Path(value).expanduser()
    if not path.is_absolute() and root is not None and (Path(root) / path).exists():
        return str((Path(root) / path).resolve())
    return str(path.resolve()) if path.exists() else value


ModelPath = Annotated[str, AfterValidator(_resolve_path)]


def checkpoint_name(path: str) -> str:
    """What a checkpoint is called where anyone may read it (`/v1/models`, the engine's metric
    labels): a hub id as it is, a local checkpoint by its folder's name, never the filesystem path."""
    return Path(path).name if Path(path).is_absolute() else path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExpertPair(_Strict):
    """The same small model after tuning (`tuned`) and before it (`untuned`)."""

    tuned: ModelPath
    untuned: ModelPath


def _load_calibration(value: Any, info: ValidationInfo) -> Any:
    """A calibration file path (relative to the YAML file) becomes its parsed contents."""
    if not isinstance(value, str):
        return value
    path = Path(_resolve_path(value, info))
    try:
        return json.loads(path.read_text())
    except OSError as error:
        raise ValueError(f"cannot read calibration file {str(path)!r}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"calibration file {str(path)!r} is not JSON: {error}") from None


class AbstainConfig(_Strict):
    """Replace an answer by `message` when its calibrated confidence is below `threshold`."""

    score: Literal[SCORES] = "mean_prob"
    threshold: Probability | None = Field(
        default=None, description="Abstain below this calibrated confidence; else the calibration file's."
    )
    message: str = "I don't know."
    threshold_bounds: tuple[Probability, Probability] | None = Field(
        default=None, description="Per-request thresholds allowed within [low, high]; none if unset."
    )
    cost_wrong: NonNegative = Field(default=1.0, description="Cost of a wrong answer (for `steer calibrate`).")
    cost_abstain: NonNegative = Field(default=0.5, description="Cost of abstaining (for `steer calibrate`).")

    @property
    def bayes_threshold(self) -> float:
        """Answer iff confidence >= 1 - cost_abstain / cost_wrong: then answering costs less on average."""
        return 1 - self.cost_abstain / self.cost_wrong if self.cost_wrong else 0.0

    @model_validator(mode="after")
    def _ordered_bounds(self) -> AbstainConfig:
        if self.threshold_bounds and self.threshold_bounds[0] > self.threshold_bounds[1]:
            raise ValueError("threshold_bounds must be [low, high] with low <= high")
        return self


class DecisionConfig(_Strict):
    """Answer with the Bayes action over `labels` under a cost matrix (rows: actions, columns: truth)."""

    labels: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=2)]
    costs: list[list[FiniteFloat]] | None = None
    cost_fp: NonNegative | None = Field(default=None, description="Binary shorthand: labels[0] is positive.")
    cost_fn: NonNegative | None = None
    abstain_cost: FiniteFloat | None = Field(default=None, description="Adds abstaining as an action of this cost.")
    abstain_message: str = "I don't know."
    max_cost: NonNegative | None = Field(
        default=None, description="Per-request cost overrides allowed with entries in [0, max_cost]; none if unset."
    )
    claim: bool = Field(
        default=False,
        description="Check a claim instead of scoring labels: each request carries `steering.claim`, an answer to "
        "its prompt; p(labels[0]) is the steered probability that the answer is exactly the claim (its tokens, then "
        "the end of the answer), p(labels[1]) the rest.",
    )

    @model_validator(mode="after")
    def _one_cost_form(self) -> DecisionConfig:
        k = len(self.labels)
        if len(set(self.labels)) != k:
            raise ValueError("labels must be distinct")
        if self.claim and k != 2:
            raise ValueError(f"a claim check has exactly 2 labels (the claim is the answer, it is not); got {k}")
        shorthand = (self.cost_fp, self.cost_fn)
        if self.costs is None and None in shorthand:
            raise ValueError("give either costs (a matrix) or both cost_fp and cost_fn")
        if self.costs is not None and shorthand != (None, None):
            raise ValueError("give either costs or cost_fp/cost_fn, not both")
        if self.costs is None and k != 2:
            raise ValueError(f"cost_fp/cost_fn need exactly 2 labels (positive, negative); got {k}")
        if self.costs is not None:
            check_cost_shape(self.costs, k)
        return self

    def cost_matrix(self) -> CostMatrix:
        if self.costs is not None:
            costs = self.costs
        else:  # acting positive on a negative is a false positive, and the other way round
            costs = [[0.0, self.cost_fp], [self.cost_fn, 0.0]]
        return CostMatrix(tuple(self.labels), tuple(tuple(row) for row in costs), self.abstain_cost)


def check_cost_shape(costs: list[list[float]], k: int) -> None:
    """A k x k matrix, or a ValueError that says what was given."""
    if len(costs) != k or any(len(row) != k for row in costs):
        got = f"{len(costs)} rows of lengths {[len(row) for row in costs]}"
        raise ValueError(
            f"costs must be a {k} x {k} matrix (a row per label acted on, a column per true label); got {got}"
        )


class PolicyConfig(_Strict):
    """A policy as the YAML gives it; `steering.policy.Policy` is it resolved for serving."""

    description: str = ""
    alpha: dict[PairName, FiniteFloat] = Field(default_factory=dict)
    max_alpha: Annotated[FiniteFloat, Field(ge=0)] | None = Field(
        default=None, description="Bound on |alpha| for per-request overrides; none allowed if unset."
    )
    abstain: AbstainConfig | None = None
    decision: DecisionConfig | None = None
    calibration: Annotated[Calibration | None, BeforeValidator(_load_calibration)] = Field(
        default=None, description="Path to a calibration file written by `steer calibrate`."
    )


@functools.cache
def _engine_option_adapter(name: str) -> TypeAdapter | None:
    """A validator of `AsyncEngineArgs.<name>`'s declared type; None where the type has no schema."""
    from vllm.engine import arg_utils

    annotation = arg_utils.AsyncEngineArgs.__dataclass_fields__[name].type
    try:  # the annotation is a string (postponed evaluation) in vLLM's module namespace
        return TypeAdapter(eval(annotation, vars(arg_utils)) if isinstance(annotation, str) else annotation)
    except (NameError, TypeError, PydanticUserError):  # imported for type checking only, or no schema
        return None


def _check_engine_option(name: str, value: Any) -> None:
    """A wrong type is refused at load, naming the field, not met as a traceback at engine start."""
    adapter = _engine_option_adapter(name)
    if adapter is None:
        return
    try:
        adapter.validate_python(value)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"engine.{name}" + (f".{where}" if where else ""), f"{first['msg']} (got {value!r})") from None


class EngineOptions(BaseModel):
    """Options passed to vLLM's engine as they are (any `AsyncEngineArgs` field but the reserved).

    The KV cache is sized by at most one of `kv_cache_gib`, `kv_cache_memory_bytes` and
    `gpu_memory_utilization`. With none on CPU, the service sizes it in bytes from the models
    (`steering.memory`); on GPU vLLM's own default fraction applies.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    dtype: str = "auto"
    max_model_len: Annotated[int, Field(gt=0)] | None = None
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] | None = Field(
        default=None, description="vLLM's share of device memory; on CPU a share of the NUMA node (checked).")
    kv_cache_memory_bytes: Annotated[int, Field(gt=0)] | None = Field(
        default=None, description="KV cache size per worker in bytes (vLLM's option).")
    kv_cache_gib: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        default=None, description="KV cache size per worker in GiB: kv_cache_memory_bytes, for people.")
    seed: int = 0
    tensor_parallel_size: Annotated[int, Field(ge=1)] = 1
    pipeline_parallel_size: Literal[1] = 1

    @field_validator("pipeline_parallel_size", mode="before")
    @classmethod
    def _one_stage(cls, value: Any) -> Any:
        if value != 1:
            raise ValueError("the composite runs every sub-model on every token inside one model, so its layers "
                             "cannot be cut into pipeline stages; spread a large base with tensor_parallel_size")
        return value

    @model_validator(mode="after")
    def _known_options(self) -> EngineOptions:
        from vllm.engine.arg_utils import AsyncEngineArgs

        known = set(AsyncEngineArgs.__dataclass_fields__)
        for name in self.model_extra or {}:
            if name in RESERVED_ENGINE_OPTIONS:
                raise ConfigError(f"engine.{name}", "is set by the steering service, not the config")
            if name not in known:
                raise ConfigError(f"engine.{name}", "is not a vLLM engine option (AsyncEngineArgs)")
            _check_engine_option(name, self.model_extra[name])
        sizes = [name for name in KV_CACHE_SIZES if getattr(self, name) is not None]
        if len(sizes) > 1:
            raise ConfigError(f"engine.{sizes[1]}", f"give one of {', '.join(KV_CACHE_SIZES)}; {sizes[0]} is set too")
        return self

    @property
    def kv_cache_size(self) -> tuple[str, int] | None:
        """(field, bytes) of an explicit KV cache size, if the config gives one."""
        if self.kv_cache_gib is not None:
            return "engine.kv_cache_gib", int(self.kv_cache_gib * GiB)
        if self.kv_cache_memory_bytes is not None:
            return "engine.kv_cache_memory_bytes", self.kv_cache_memory_bytes
        return None

    def engine_kwargs(self) -> dict[str, Any]:
        kwargs = self.model_dump(exclude_none=True, exclude={"kv_cache_gib"})
        if self.kv_cache_size is not None:
            kwargs["kv_cache_memory_bytes"] = self.kv_cache_size[1]
        return kwargs


class Deployment(_Strict):
    """A whole deployment: one frozen base, its expert pairs, the policies served over them."""

    base: ModelPath
    experts: dict[PairName, ExpertPair] = Field(default_factory=dict)
    policies: dict[PolicyName, PolicyConfig] = Field(min_length=1)
    engine: EngineOptions = Field(default_factory=EngineOptions)
    tool_call_parser: str | None = Field(
        default=None, description="vLLM's tool parser for chat `tools` (as `vllm serve --tool-call-parser`), "
        "e.g. hermes, llama3_json, mistral: the format the base writes tool calls in.",
    )
    tool_strict_level: Literal["auto", "function", "parameter"] = Field(
        default="auto", description="vLLM's --tool-strict-level: auto holds a call's arguments to its schema only "
        "for functions marked strict; parameter, for every function; function constrains the call's envelope "
        "on every request with tools.",
    )

    @field_validator("tool_call_parser")
    @classmethod
    def _vllm_has_the_parser(cls, name: str | None) -> str | None:
        from vllm.tool_parsers import ToolParserManager  # the registry is vLLM's; importing it is light

        if name is not None and name not in ToolParserManager.list_registered():
            raise ValueError(f"vLLM has no tool parser {name!r}; it has {ToolParserManager.list_registered()}")
        return name

    @model_validator(mode="after")
    def _policies_are_consistent(self, info: ValidationInfo) -> Deployment:
        calibrating = (info.context or {}).get("calibrating", False)
        for name, policy in self.policies.items():
            for pair in policy.alpha:
                if pair not in self.experts:
                    raise ConfigError(
                        f"policies.{name}.alpha.{pair}",
                        f"unknown expert pair; defined pairs: {sorted(self.experts)}",
                    )
            _check_rules(name, policy, calibrating=calibrating)
        return self

    @property
    def pair_names(self) -> tuple[str, ...]:
        return tuple(self.experts)


def _check_rules(name: str, policy: PolicyConfig, *, calibrating: bool = False) -> None:
    """A policy abstains or decides (not both), with a calibration file fitted for exactly that; a
    fitted score needs one, except to `steer calibrate`, which serves nothing (`calibrating`)."""
    field = f"policies.{name}"
    if policy.abstain and policy.decision:
        raise ConfigError(field, "a policy either abstains or decides; a decision can abstain via abstain_cost")
    calibration = policy.calibration
    if calibration is None and policy.abstain and policy.abstain.score in FITTED_SCORES and not calibrating:
        raise ConfigError(f"{field}.calibration", f"required: score {policy.abstain.score!r} is weighed by a fit "
                          "that `steer calibrate` writes into the calibration file")
    if calibration is None:
        if policy.abstain and policy.abstain.threshold is None:
            raise ConfigError(f"{field}.abstain.threshold", "required (or a calibration file with a threshold)")
        return
    if policy.decision is None and policy.abstain is None:
        raise ConfigError(f"{field}.calibration", "only abstention and decision policies are calibrated")
    if policy.decision and (calibration.kind != "decision" or calibration.labels != policy.decision.labels):
        raise ConfigError(f"{field}.calibration", f"was fitted for a {calibration.kind} policy with labels "
                          f"{calibration.labels}, not for labels {policy.decision.labels}")
    if policy.abstain:
        if calibration.kind != "abstention" or calibration.score != policy.abstain.score:
            raise ConfigError(f"{field}.calibration", f"was fitted for a {calibration.kind} policy with score "
                              f"{calibration.score!r}, not for score {policy.abstain.score!r}")
        if policy.abstain.threshold is None and calibration.threshold is None:
            raise ConfigError(f"{field}.abstain.threshold", "required: the calibration file has no threshold")


def parse_deployment(raw: Any, *, root: Path | None = None, calibrating: bool = False) -> Deployment:
    """Validate a config mapping against the schema (no filesystem checks)."""
    if not isinstance(raw, dict):
        raise ConfigError("config", "must be a mapping with base, experts, policies and engine")
    try:
        return Deployment.model_validate(raw, context={"root": root, "calibrating": calibrating})
    except ValidationError as error:
        raise _config_error(error) from None


def read_deployment(path: str | Path, *, calibrating: bool = False) -> Deployment:
    """Read and validate a deployment YAML file (its calibration files too), without opening a
    checkpoint: what a reload needs, the checkpoints being those already running. For `steer
    calibrate` (`calibrating`), a policy with a fitted score may lack the file that holds its weights."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError("config", f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("config", f"{path} is not UTF-8 text") from None
    except yaml.YAMLError as error:
        raise ConfigError("config", f"{path} is not valid YAML: {error}") from None
    return parse_deployment(raw, root=path.parent, calibrating=calibrating)


def load_deployment(path: str | Path, *, calibrating: bool = False) -> Deployment:
    """Read, validate and check a deployment YAML file; fail with the offending field named."""
    deployment = read_deployment(path, calibrating=calibrating)
    check_executor(deployment)
    check_checkpoints(deployment)
    return deployment


def check_executor(deployment: Deployment) -> None:
    """vLLM's Ray executor places workers by device; vLLM's CPU build has no device Ray can place
    (its `ray_device_key` is empty) and fails only after starting Ray. Refuse that here."""
    if (deployment.engine.model_extra or {}).get("distributed_executor_backend") != "ray":
        return
    from vllm.platforms import current_platform

    field = "engine.distributed_executor_backend"
    if not current_platform.ray_device_key:
        raise ConfigError(field, f"vLLM's {current_platform.device_name} build does not support the Ray executor "
                                 f"(its platform names no device for Ray to place workers on); leave it unset: "
                                 "tensor_parallel_size runs within one machine on vLLM's own processes")
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(field, "needs the ray package on every node (vLLM's GPU image has it): pip install ray")


def digest(deployment: Deployment) -> str:
    """A short fingerprint of what a deployment serves (calibrations included, key order not)."""
    canonical = json.dumps(deployment.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PolicyChanges:
    """What a reload changed: policies added, removed, and changed (with the fields that changed)."""

    previous_digest: str
    digest: str
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: dict[str, tuple[str, ...]]

    @classmethod
    def between(cls, old: Deployment, new: Deployment) -> PolicyChanges:
        before, after = old.policies, new.policies
        changed = {}
        for name in before.keys() & after.keys():
            fields = tuple(f for f in PolicyConfig.model_fields if getattr(before[name], f) != getattr(after[name], f))
            if fields:
                changed[name] = fields
        return cls(digest(old), digest(new), tuple(n for n in after if n not in before),
                   tuple(n for n in before if n not in after), dict(sorted(changed.items())))

    @property
    def unchanged(self) -> bool:
        return self.digest == self.previous_digest

    def describe(self) -> str:
        if self.unchanged:
            return f"config {self.digest} unchanged"
        parts = [f"config {self.previous_digest} -> {self.digest}"]
        parts += [f"added {list(self.added)}"] * bool(self.added)
        parts += [f"removed {list(self.removed)}"] * bool(self.removed)
        parts += [f"changed {name} ({', '.join(fields)})" for name, fields in self.changed.items()]
        return "; ".join(parts)


def check_reloadable(running: Deployment, new: Deployment) -> None:
    """Only policies change without a restart: the base, the experts and the engine are loaded into
    vLLM's engine, the tool parser is checked against its tokenizer. Raises `RestartRequired`
    naming the first field that differs."""
    before = running.model_dump(mode="json", exclude={"policies"})
    after = new.model_dump(mode="json", exclude={"policies"})
    field = _first_difference(before, after, "")
    if field is not None:
        section = field.split(".")[0]
        raise RestartRequired(field, f"the running engine has {_shown(before, field)}, the file now has "
                                     f"{_shown(after, field)}; `{section}` takes effect only when the server "
                                     "restarts (a reload changes policies only)")


def _first_difference(a: Any, b: Any, path: str) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            found = _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
            if found is not None:
                return found
        return None
    return None if a == b else path


def _shown(tree: dict, field: str) -> str:
    for key in field.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return "none" if tree is None else repr(tree)


def check_checkpoints(deployment: Deployment) -> None:
    """Every checkpoint loads and runs in vLLM (and shards, under tensor parallelism), experts share
    the base's tokenizer and quantization, labels are separable."""
    tensor_parallel = deployment.engine.tensor_parallel_size
    base_config, base_tokenizer = _open_checkpoint("base", deployment.base)
    _check_shards("base", base_config, tensor_parallel)
    base_vocab = base_tokenizer.get_vocab()
    for name, pair in deployment.experts.items():
        for role in ("tuned", "untuned"):
            field = f"experts.{name}.{role}"
            config, tokenizer = _open_checkpoint(field, getattr(pair, role))
            _check_shards(field, config, tensor_parallel)
            _compare_vocab(field, tokenizer.get_vocab(), base_vocab)
            _compare_quantization(field, config, base_config)
    for name, policy in deployment.policies.items():
        if policy.decision:
            try:
                label_first_tokens(lambda text: base_tokenizer.encode(text, add_special_tokens=False),
                                   policy.decision.labels)
            except ValueError as error:
                raise ConfigError(f"policies.{name}.decision.labels", str(error)) from None


def _open_checkpoint(field: str, path: str):
    """Check that `path` holds a vLLM-supported model; return its config and tokenizer."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer
    from vllm import ModelRegistry

    if not Path(path).exists() and not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        raise ConfigError(field, f"path {path!r} does not exist")
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ConfigError(field, f"cannot load a model and tokenizer from {path!r}: {error}") from None
    architectures = getattr(config, "architectures", None) or []
    # vLLM serves an architecture natively, or through its Transformers modeling backend when
    # transformers has the class (whether that class suits the backend, vLLM checks at start).
    if not any(arch in ModelRegistry.get_supported_archs() or hasattr(transformers, arch) for arch in architectures):
        raise ConfigError(field, f"architecture {architectures} of {path!r} is served by vLLM neither natively nor "
                                 "through its Transformers backend")
    return config, tokenizer


def _check_shards(field: str, config, tensor_parallel: int) -> None:
    """vLLM splits attention heads across tensor-parallel ranks, and KV heads too (or replicates them)."""
    if tensor_parallel == 1:
        return
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % tensor_parallel:
        raise ConfigError(field, f"num_attention_heads {heads} is not divisible by engine.tensor_parallel_size "
                                 f"{tensor_parallel}: vLLM gives each rank an equal share of the heads")
    if kv_heads % tensor_parallel and tensor_parallel % kv_heads:
        raise ConfigError(field, f"num_key_value_heads {kv_heads} neither divides nor is divisible by "
                                 f"engine.tensor_parallel_size {tensor_parallel}: vLLM can neither split nor "
                                 "replicate them evenly")


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


def _compare_quantization(field: str, config, base_config) -> None:
    """One quantization config serves every sub-model (vLLM derives it from the base), so an expert
    quantized otherwise than the base would run on kernels meant for other weights: garbage, not
    an error. Refused until each sub-model gets its own."""
    mine, base = quantization(config), quantization(base_config)
    if mine != base:
        raise ConfigError(field, f"is {describe_quantization(mine)} and the base is {describe_quantization(base)}: "
                                 "every sub-model runs under the base's quantization, so it would answer garbage; "
                                 "serve experts quantized exactly as the base, or a base of the experts' precision")


def _config_error(error: ValidationError) -> ConfigError:
    problems = [
        (".".join(str(part) for part in item["loc"]) or "config", item["msg"].removeprefix("Value error, "))
        for item in error.errors()
    ]
    field, reason = problems[0]
    if len(problems) > 1:
        reason += "; also " + "; ".join(f"{f}: {r}" for f, r in problems[1:])
    return ConfigError(field, reason)
