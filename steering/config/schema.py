"""The deployment schema: a base, named expert pairs, policies and engine options, from YAML.

`read_deployment` parses and validates it (calibration files included, no checkpoint opened);
any problem is a `ConfigError` naming the field (e.g. `policies.chat.alpha.poetry`). Relative
paths are relative to the YAML file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from steering.config.engine_options import EngineOptions
from steering.errors import ConfigError
from steering.rules.abstention import FITTED_SCORES, SCORES
from steering.rules.calibration import Calibration, FiniteFloat
from steering.rules.decisions import CostMatrix

NonNegative = Annotated[float, Field(allow_inf_nan=False, ge=0)]
Probability = Annotated[float, Field(allow_inf_nan=False, ge=0, le=1)]
PairName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")]
PolicyName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")]


def _resolve_path(value: str, info: ValidationInfo) -> str:
    """Make a relative path absolute against the YAML file's folder; leave hub ids alone."""
    root = (info.context or {}).get("root")
    path = Path(value).expanduser()
    if not path.is_absolute() and root is not None and (Path(root) / path).exists():
        return str((Path(root) / path).resolve())
    return str(path.resolve()) if path.exists() else value


ModelPath = Annotated[str, AfterValidator(_resolve_path)]


def _beside_yaml(value: str, info: ValidationInfo) -> str:
    """A file the service writes: a relative path is relative to the YAML file's folder."""
    root = (info.context or {}).get("root")
    path = Path(value).expanduser()
    return str(path if path.is_absolute() or root is None else (Path(root) / path).resolve())


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


class RiskTarget(_Strict):
    """A risk the operator states: at most `epsilon`, with probability at least 1 - `delta` over the
    calibration rows. `steer calibrate` certifies a threshold for it, or refuses."""

    epsilon: Annotated[FiniteFloat, Field(gt=0, lt=1)]
    delta: Annotated[FiniteFloat, Field(gt=0, lt=1)] = 0.1


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
    risk: RiskTarget | None = Field(
        default=None, description="The error rate among answered requests to certify: `steer calibrate` picks the "
        "threshold that keeps it (instead of the one of least cost), and the calibration file carries it.")

    @property
    def bayes_threshold(self) -> float:
        """Answer iff confidence >= 1 - cost_abstain / cost_wrong: then answering costs less on average."""
        return 1 - self.cost_abstain / self.cost_wrong if self.cost_wrong else 0.0

    @model_validator(mode="after")
    def _ordered_bounds(self) -> AbstainConfig:
        if self.threshold_bounds and self.threshold_bounds[0] > self.threshold_bounds[1]:
            raise ValueError("threshold_bounds must be [low, high] with low <= high")
        if self.risk is not None and (self.threshold is not None or self.threshold_bounds is not None):
            raise ValueError("a stated risk is kept by the threshold its calibration certifies: set neither "
                             "threshold nor threshold_bounds")
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
    risk: RiskTarget | None = Field(
        default=None, description="Binary decisions: the false-positive rate among requests answered with labels[0] "
        "to certify; `steer calibrate` picks the threshold on p(labels[0]) that keeps it, and it replaces the "
        "Bayes action.")
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
        if self.risk is not None and (k != 2 or self.abstain_cost is not None):
            raise ValueError("a stated risk bounds one error of a yes/no decision: exactly 2 labels, no abstain_cost")
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

    @property
    def abstain_threshold(self) -> float | None:
        """The threshold an abstention serves: the config's, else its calibration's (None: no abstention,
        or a stated risk before its first fit, withholding nothing)."""
        if self.abstain is None:
            return None
        if self.abstain.threshold is not None or self.calibration is None:
            return self.abstain.threshold
        return self.calibration.threshold


class FeedbackConfig(_Strict):
    """Outcomes fed back: every decision and abstention response carries a signed feedback id, and
    `POST /v1/feedback` keeps the outcomes in an SQLite store."""

    store: Annotated[str, AfterValidator(_beside_yaml)] = Field(
        default="feedback.sqlite", validate_default=True,  # the default too lies beside the YAML file
        description="The SQLite file outcomes are kept in (relative to the YAML file).")
    secret: SecretStr | None = Field(
        default=None, min_length=16, description="Signs feedback ids; else $STEER_FEEDBACK_SECRET. Every replica of "
        "a deployment holds the same, so any of them verifies an id another issued.")
    ttl_days: Annotated[FiniteFloat, Field(gt=0)] = Field(default=30.0, description="How long an id takes an outcome.")


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
    feedback: FeedbackConfig | None = Field(default=None, description="Outcomes fed back (off if unset).")
    tool_strict_level: Literal["auto", "function", "parameter"] = Field(
        default="parameter", description="vLLM's --tool-strict-level, with another default: parameter holds every "
        "call's arguments to its function's schema; auto (vLLM's default) only those of functions marked strict, "
        "leaving the rest free to be any JSON value, which weak bases answer with a bare number and clients that "
        "send no strict (LangChain) then fail to parse; function, as auto but with the call's envelope constrained on "
        "every request with tools.",
    )

    reasoning_parser: str | None = Field(
        default=None, description="vLLM's reasoning parser for a base that thinks before it answers (as `vllm serve "
        "--reasoning-parser`), e.g. qwen3, deepseek_r1: chat answers carry the thinking as `reasoning`, and "
        "abstentions score the final answer after it.",
    )

    @field_validator("tool_call_parser")
    @classmethod
    def _vllm_has_the_parser(cls, name: str | None) -> str | None:
        from vllm.tool_parsers import ToolParserManager  # the registry is vLLM's; importing it is light

        if name is not None and name not in ToolParserManager.list_registered():
            raise ValueError(f"vLLM has no tool parser {name!r}; it has {ToolParserManager.list_registered()}")
        return name

    @field_validator("reasoning_parser")
    @classmethod
    def _vllm_has_the_reasoning_parser(cls, name: str | None) -> str | None:
        from vllm.reasoning import ReasoningParserManager  # vLLM's registry, as for tool parsers

        if name is not None and name not in ReasoningParserManager.list_registered():
            raise ValueError(f"vLLM has no reasoning parser {name!r}; it has "
                             f"{ReasoningParserManager.list_registered()}")
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
        risk = (policy.abstain or policy.decision).risk if policy.abstain or policy.decision else None
        if risk is not None and not calibrating:
            raise ConfigError(f"{field}.calibration", "required: a stated risk is kept by the threshold its "
                              "calibration certifies (`steer calibrate`)")
        if policy.abstain and policy.abstain.threshold is None and policy.abstain.risk is None:
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
    _check_certificate(field, (policy.abstain or policy.decision).risk, calibration.certificate)


def _check_certificate(field: str, risk: RiskTarget | None, certificate) -> None:
    """A stated risk is served only with a calibration that certifies exactly it."""
    if risk is None:
        return
    if certificate is None:
        raise ConfigError(f"{field}.calibration", f"certifies no risk, and the policy states epsilon {risk.epsilon} "
                          f"at delta {risk.delta}: run `steer calibrate` for it")
    if (certificate.epsilon, certificate.delta) != (risk.epsilon, risk.delta):
        raise ConfigError(f"{field}.calibration", f"certifies epsilon {certificate.epsilon} at delta "
                          f"{certificate.delta}, and the policy states {risk.epsilon} at {risk.delta}: recalibrate")


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


def _config_error(error: ValidationError) -> ConfigError:
    problems = [
        (".".join(str(part) for part in item["loc"]) or "config", item["msg"].removeprefix("Value error, "))
        for item in error.errors()
    ]
    field, reason = problems[0]
    if len(problems) > 1:
        reason += "; also " + "; ".join(f"{f}: {r}" for f, r in problems[1:])
    return ConfigError(field, reason)
