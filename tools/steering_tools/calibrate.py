"""`steer calibrate`: run labelled data through a policy, fit its calibration, report and plot.

Rows are JSONL: `{"prompt" | "messages", "label"}` for decision policies (a claim check's rows add
the `claim`), `{"prompt" | "messages", "answer"}` for abstention policies. A malformed row is reported with its line
number and skipped. The rows are split with a seed into a fit part and a held-out part; the
report compares raw and calibrated probabilities on the held-out part only.
"""

from __future__ import annotations

import asyncio
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from tqdm import tqdm

from steering.admission import Admission, PolicyRequest
from steering.config import AbstainConfig, Deployment, PolicyConfig, RiskTarget
from steering.engine import SteeringEngine
from steering.errors import ConfigError, UnknownPolicy
from steering.feedback import CORRECT, merged
from steering.kinds import Evidence, Piece, Plan, answer
from steering.policy import Overrides
from steering.prompts import Conversation
from steering.rules.abstention import FITTED_SCORES, FirstStep, confidence_score, familiarity_profile, fitted_score
from steering.rules.calibration import Calibration, Certificate, platt
from steering.rules.decisions import CostMatrix, bayes_decision, label_probabilities
from steering_tools import metrics

IN_FLIGHT = 32  # requests handed to the engine at once; it batches them


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str


class Row(BaseModel):
    """One labelled example; fields other than these are ignored (ids, sources, …)."""

    prompt: str | None = None
    messages: list[Message] | None = None
    label: str | None = None
    answer: str | None = None
    claim: str | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> Row:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


@dataclass
class Dataset:
    rows: list[Row]
    line_numbers: list[int]
    skipped: list[str] = field(default_factory=list)  # "line N: reason"


def read_rows(path: Path, valid: Callable[[Row], str | None]) -> Dataset:
    """Parse a JSONL file; `valid` returns why a parsed row cannot be used, or None."""
    data = Dataset([], [])
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = Row.model_validate(json.loads(line))
        except json.JSONDecodeError as error:
            data.skipped.append(f"line {number}: not JSON ({error.msg})")
            continue
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "row"
            data.skipped.append(f"line {number}: {where}: {first['msg']}")
            continue
        if (reason := valid(row)) is not None:
            data.skipped.append(f"line {number}: {reason}")
            continue
        data.rows.append(row)
        data.line_numbers.append(number)
    return data


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .!?,;:")


def is_correct(generated: str, answer: str) -> bool:
    """The generated text gives the answer: equal, or starting with it at a word boundary."""
    generated, answer = normalize(generated), normalize(answer)
    return generated == answer or (generated.startswith(answer) and not generated[len(answer)].isalnum())


def split(n: int, fit_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled indices of the fit part and the held-out part (each at least one row)."""
    order = np.random.default_rng(seed).permutation(n)
    cut = min(max(1, round(n * fit_fraction)), n - 1)
    return np.sort(order[:cut]), np.sort(order[cut:])


async def _gather(coroutines: list, description: str, *, limit: int = IN_FLIGHT) -> list:
    """Run with at most `limit` at once, in order, with a progress bar."""
    limit = asyncio.Semaphore(limit)
    bar = tqdm(total=len(coroutines), desc=description, unit="row")

    async def one(coro):
        async with limit:
            result = await coro
        bar.update()
        return result

    try:
        return await asyncio.gather(*(one(c) for c in coroutines))
    finally:
        bar.close()


def prompt_of(row: Row) -> Conversation | list[str]:
    """The row's prompt as admission takes it: a conversation, or one text."""
    if row.messages is not None:
        return Conversation([m.model_dump() for m in row.messages])
    return [row.prompt]


# Decision policies


async def decision_logprobs(admission: Admission, name: str, rows: list[Row]) -> np.ndarray:
    """[N, K] each row's label logprobs, as the policy is served: admitted and run by its kind."""
    claims = admission.policies[name].rule.checks_claims

    async def one(row: Row) -> list[float]:
        plan = admission.admit(PolicyRequest(name, prompt_of(row), overrides=Overrides(claim=row.claim) if claims
                                             else None))
        _, outcome = await answer(admission.engine, plan)
        return outcome.evidence.label_logprobs

    description = "checking claims" if claims else "scoring labels"
    return np.asarray(await _gather([one(row) for row in rows], description), dtype=np.float64)


def realized_cost(costs: CostMatrix, actions: list[str], truth: np.ndarray) -> float:
    """Mean cost of taking `actions` on examples whose true label index is `truth`."""
    matrix, index = costs.matrix(), {a: i for i, a in enumerate(costs.actions)}
    return float(np.mean([matrix[index[a], y] for a, y in zip(actions, truth)]))


def _probabilities_report(probs: np.ndarray, truth: np.ndarray, bins: int) -> dict:
    confidence, correct = probs.max(axis=1), (probs.argmax(axis=1) == truth).astype(float)
    return {
        "accuracy": float(correct.mean()),
        "nll": metrics.nll(probs, truth),
        "brier": metrics.brier(probs, truth),
        "ece": metrics.ece(confidence, correct, bins),
        "aurc": metrics.aurc(confidence, correct),
        "risk_coverage": metrics.risk_at_coverage(confidence, correct),
        "reliability": metrics.reliability(confidence, correct, bins),
    }


# A claim check's Platt slope is 1 / T: kept positive (T <= 1000), so more likely claims stay likelier.
MIN_CLAIM_SLOPE = 1e-3


def fit_label_map(logprobs: np.ndarray, truth: np.ndarray, *, claims: bool) -> tuple[float, list[float] | None]:
    """(temperature, bias) of `softmax(z / T + bias)` minimising the NLL of `truth`: a temperature
    alone over first-token labels; for a claim check, Platt scaling of the claim's probability
    `sigmoid(a logit(p) + b)`, which is T = 1 / a and a bias b on the claim."""
    if not claims:
        return metrics.fit_temperature(logprobs, truth), None
    # logit p = log p - log(1 - p), exactly as served (+inf, for p = 1, capped for the fit).
    x = np.minimum(logprobs[:, 0] - logprobs[:, 1], 1e3)
    a, b = metrics.fit_logistic(x, truth == 0, min_slope=MIN_CLAIM_SLOPE)
    return 1.0 / a, [b, 0.0]


def fit_decision(name: str, config: PolicyConfig, logprobs: np.ndarray, truth: np.ndarray, fit, held, bins: int):
    temperature, bias = fit_label_map(logprobs[fit], truth[fit], claims=config.decision.claim)
    costs = config.decision.cost_matrix()
    raw = np.stack([label_probabilities(z) for z in logprobs[held]])
    calibrated = np.stack([label_probabilities(z, temperature, bias) for z in logprobs[held]])
    argmax = [costs.labels[i] for i in raw.argmax(axis=1)]
    report = {
        "policy": name,
        "kind": "decision",
        "temperature": temperature,
        "bias": bias,
        "raw": _probabilities_report(raw, truth[held], bins),
        "calibrated": _probabilities_report(calibrated, truth[held], bins),
        "expected_cost": {
            "argmax": realized_cost(costs, argmax, truth[held]),
            "bayes_raw": realized_cost(costs, [bayes_decision(z, costs).action for z in logprobs[held]], truth[held]),
            "bayes_calibrated": realized_cost(
                costs, [bayes_decision(z, costs, temperature, bias).action for z in logprobs[held]], truth[held]
            ),
            "always_abstain": costs.abstain_cost,
        },
    }
    certificate = None
    if config.decision.risk is not None:  # labels[0] iff its calibrated p reaches the certified threshold
        learned = np.stack([label_probabilities(z, temperature, bias) for z in logprobs[fit]])
        certificate = certify(calibrated[:, 0], truth[held] == 0, config.decision.risk, "false positive among positive",
                              learn=(learned[:, 0], truth[fit] == 0))
        decided = [bayes_decision(z, costs, temperature, bias, certificate.threshold).action for z in logprobs[held]]
        report["certificate"] = certificate.model_dump()
        report["expected_cost"]["certified_threshold"] = realized_cost(costs, decided, truth[held])
    calibration = Calibration(kind="decision", policy=name, temperature=temperature, bias=bias,
                              labels=list(config.decision.labels), certificate=certificate, fitted_on=len(fit))
    curves = {"raw": (raw.max(axis=1), raw.argmax(axis=1) == truth[held]),
              "calibrated": (calibrated.max(axis=1), calibrated.argmax(axis=1) == truth[held])}
    return calibration, report, curves


# Abstention policies


Answer = tuple[list[float], FirstStep | None]  # an answer's steered token logprobs, and its first step if needed


async def abstention_answers(
    admission: Admission, name: str, rows: list[Row], max_tokens: int, *, every_score: bool = False,
    stop: list[str] | None = None, correct: Callable[[str, str], bool] | None = None,
) -> tuple[list[Answer], np.ndarray]:
    """What the policy's score (with `every_score`, any score) reads of its greedy answer to each
    row, and whether each is right by `correct` (default `is_correct`): the policy admitted and run
    by its kind, withholding nothing."""
    collect = "every_score" if every_score else "score"
    sampling = {"temperature": 0.0, **({"stop": stop} if stop else {})}
    correct = correct or is_correct

    async def one(row: Row) -> tuple[Answer, bool]:
        plan = admission.admit(PolicyRequest(name, prompt_of(row), sampling=sampling, max_tokens=max_tokens,
                                             collect=collect))
        (piece,), outcome = await answer(admission.engine, plan)
        evidence = outcome.evidence
        return (evidence.token_logprobs, evidence.first_step), correct(said(plan, piece), row.answer)

    answered = await _gather([one(row) for row in rows], "answering")
    return [a for a, _ in answered], np.asarray([c for _, c in answered], dtype=float)


def said(plan: Plan, piece: Piece) -> str:
    """What an answer says as the server shows it: a chat answer's content as vLLM's parser reads it
    (a reasoning base's thinking set apart), as `ServerScores` reads it; else its text."""
    if plan.parsing is None:
        return piece.text
    message, _ = plan.parsing.message(plan.parsing.parser(plan.prompts[0]), piece.text, piece.token_ids,
                                      piece.finish_reason)
    return message.content or ""


@dataclass
class EngineScores:
    """An engine in this process as the source of scores: each row admitted and run by the kind."""

    admission: Admission

    async def decision_logprobs(self, name: str, rows: list[Row], lines: list[int], claims: bool) -> np.ndarray:
        return await decision_logprobs(self.admission, name, rows)

    async def abstention_answers(self, name: str, rows: list[Row], lines: list[int],
                                 max_tokens: int) -> tuple[list[Answer], np.ndarray]:
        return await abstention_answers(self.admission, name, rows, max_tokens)


class ServerRefused(ConfigError):
    """The server refused a row, or the calibration: its own message, and the row's line."""


@dataclass
class ServerScores:
    """A running server as the source of scores: each row admitted and run there by the policy's
    kind, which returns what it scored on (`steering.evidence`, behind the API key). No engine here."""

    url: str  # the SDK's base URL, …/v1
    api_key: str | None
    parallel: int = 8  # rows in flight at once

    async def decision_logprobs(self, name: str, rows: list[Row], lines: list[int], claims: bool) -> np.ndarray:
        answers = await self._ask(name, rows, lines, lambda row: {
            "max_tokens": 1, "steering": {"evidence": "score", **({"claim": row.claim} if claims else {})}})
        return np.asarray([answer["steering"]["evidence"]["label_logprobs"] for answer in answers], dtype=np.float64)

    async def abstention_answers(self, name: str, rows: list[Row], lines: list[int],
                                 max_tokens: int) -> tuple[list[Answer], np.ndarray]:
        answers = await self._ask(name, rows, lines, lambda row: {
            "max_tokens": max_tokens, "temperature": 0.0, "steering": {"evidence": "score"}})
        evidence = [Evidence.of_json(answer["steering"]["evidence"]) for answer in answers]
        correct = [is_correct(_text(answer), row.answer) for answer, row in zip(answers, rows)]
        return [(e.token_logprobs, e.first_step) for e in evidence], np.asarray(correct, dtype=float)

    async def _ask(self, name: str, rows: list[Row], lines: list[int], fields: Callable[[Row], dict]) -> list[dict]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        async with httpx.AsyncClient(base_url=self.url.rstrip("/"), headers=headers, timeout=600) as http:
            async def one(row: Row, line: int) -> dict:
                ask = {"messages": [m.model_dump() for m in row.messages]} if row.messages else {"prompt": row.prompt}
                path = "/chat/completions" if row.messages else "/completions"
                try:
                    response = await http.post(path, json={"model": name, **ask, **fields(row)})
                except httpx.TransportError as error:
                    raise ServerRefused("--server", f"cannot reach {self.url}: {error}") from None
                if response.is_error:
                    raise ServerRefused("--server", f"line {line}: the server refused it ({response.status_code}): "
                                                    f"{_message(response)}")
                return response.json()

            return await _gather([one(row, line) for row, line in zip(rows, lines)], "asking the server",
                                 limit=self.parallel)


def _text(answer: dict) -> str:
    choice = answer["choices"][0]
    return (choice["message"]["content"] or "") if "message" in choice else choice["text"]


def _message(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:500]


@dataclass(frozen=True)
class Recalled:
    """An answer as its feedback id recalls it: the raw score it had, and a fitted score's features."""

    raw: float
    features: list[float] | None = None


def _features(answer: Answer | Recalled) -> np.ndarray | None:
    """A fitted score's features of an answer (the base's `familiarity_profile` of its prompt); None if empty."""
    if isinstance(answer, Recalled):
        return None if answer.features is None else np.asarray(answer.features, dtype=np.float64)
    _, step = answer
    return None if step is None else familiarity_profile(step.prompt)


def fit_score(kind: str, answers: list[Answer | Recalled], correct: np.ndarray) -> list[float] | None:
    """A fitted score's weights (None for the other scores): a logistic fit of whether each answer
    was right on the base's `familiarity_profile` of its prompt. Empty answers score 0 and are left out."""
    if kind not in FITTED_SCORES:
        return None
    kept = [(features, right) for answer, right in zip(answers, correct)
            if (features := _features(answer)) is not None]
    if not kept:
        raise ConfigError("data", f"score {kind!r} is fitted on answers, and every answer was empty")
    return metrics.fit_weights(np.stack([f for f, _ in kept]), np.asarray([r for _, r in kept]))


def fit_platt_map(scores: np.ndarray, correct: np.ndarray, weights: list[float] | None) -> tuple[float, float]:
    """Platt scaling (a, b) of raw scores on the fit rows; the identity for a fitted score (its
    `weights`), whose logistic fit on those same rows already is a calibration: a second fit on
    them would only undo the fit's L2 shrinkage, and its outputs are sharper in-sample than after."""
    return (1.0, 0.0) if weights is not None else metrics.fit_platt(scores, correct)


def raw_scores(kind: str, answers: list[Answer | Recalled], weights: list[float] | None = None) -> np.ndarray:
    """The score `kind` of each answer (a fitted score's with `weights`)."""
    return np.asarray([_raw(kind, answer, weights) for answer in answers])


def _raw(kind: str, answer: Answer | Recalled, weights: list[float] | None) -> float:
    if not isinstance(answer, Recalled):
        logprobs, step = answer
        return confidence_score(kind, logprobs, step, weights)
    if kind not in FITTED_SCORES:
        return answer.raw
    return 0.0 if answer.features is None else fitted_score(np.asarray(answer.features), weights)


def abstention_cost(confidence: np.ndarray, correct: np.ndarray, threshold: float, abstain: AbstainConfig) -> float:
    """Mean cost when abstaining below `threshold`: wrong answers and abstentions have their prices."""
    answered = confidence >= threshold
    return float(np.mean(np.where(answered, abstain.cost_wrong * (1 - correct), abstain.cost_abstain)))


def fit_threshold(confidence: np.ndarray, correct: np.ndarray, abstain: AbstainConfig) -> float:
    """The threshold of least cost on the fit part, among the observed confidences (and 0)."""
    candidates = np.unique(np.concatenate([[0.0], confidence]))
    costs = [abstention_cost(confidence, correct, t, abstain) for t in candidates]
    return float(candidates[int(np.argmin(costs))])


def _confidence_report(confidence: np.ndarray, correct: np.ndarray, bins: int) -> dict:
    probs = metrics.binary_probs(confidence)
    truth = correct.astype(int)
    return {
        "accuracy": float(correct.mean()),
        "nll": metrics.nll(probs, truth),
        "brier": metrics.brier(probs, truth) / 2,  # binary Brier: (confidence - correct)^2
        "ece": metrics.ece(confidence, correct, bins),
        "aurc": metrics.aurc(confidence, correct),
        "risk_coverage": metrics.risk_at_coverage(confidence, correct),
        "reliability": metrics.reliability(confidence, correct, bins),
    }


def fit_abstention(name: str, config: PolicyConfig, answers: list[Answer], correct: np.ndarray, fit, held,
                   bins: int):
    abstain = config.abstain
    weights = fit_score(abstain.score, [answers[i] for i in fit], correct[fit])
    scores = raw_scores(abstain.score, answers, weights)
    a, b = fit_platt_map(scores[fit], correct[fit], weights)
    threshold = fit_threshold(platt(scores[fit], a, b), correct[fit], abstain)
    bayes = abstain.bayes_threshold
    raw, calibrated = scores[held], platt(scores[held], a, b)
    report = {
        "policy": name,
        "kind": "abstention",
        "score": abstain.score,
        "platt": {"a": a, "b": b},
        "weights": weights,
        "threshold": threshold,
        "bayes_threshold": bayes,
        "raw": _confidence_report(raw, correct[held], bins),
        "calibrated": _confidence_report(calibrated, correct[held], bins),
        "expected_cost": {
            "always_answer": abstention_cost(raw, correct[held], 0.0, abstain),
            "bayes_raw": abstention_cost(raw, correct[held], bayes, abstain),
            "bayes_calibrated": abstention_cost(calibrated, correct[held], bayes, abstain),
            "fitted_threshold": abstention_cost(calibrated, correct[held], threshold, abstain),
            "always_abstain": abstain.cost_abstain,
        },
    }
    certificate = None
    if abstain.risk is not None:  # the threshold that keeps the stated risk, instead of the cheapest
        certificate = certify(calibrated, correct[held] > 0, abstain.risk, "error among answered",
                              learn=(platt(scores[fit], a, b), correct[fit] > 0))
        report["certificate"] = certificate.model_dump() | {
            "fitted_threshold_coverage": float(np.mean(calibrated >= threshold))}
        threshold = certificate.threshold
    calibration = Calibration(kind="abstention", policy=name, score=abstain.score, weights=weights, platt_a=a,
                              platt_b=b, threshold=threshold, certificate=certificate, fitted_on=len(fit))
    curves = {"raw": (raw, correct[held] > 0), "calibrated": (calibrated, correct[held] > 0)}
    return calibration, report, curves


def certify(confidence: np.ndarray, positive: np.ndarray, risk: RiskTarget, kind: str, *,
            learn: tuple[np.ndarray, np.ndarray]) -> Certificate:
    """Learn-then-Test by split fixed-sequence testing, through MAPIE's `BinaryClassificationController`:
    the order in which its 100 thresholds on `confidence` are tested is learned on `learn` (the fit
    part's confidences and labels, never the rows certified on); then, in that order, each is tested
    at the full delta with a Hoeffding-Bentkus p-value until one fails. Of those that pass, the
    loosest (the most answered) serves: its precision (the share of `positive` among the rows at or
    above it) is at least 1 - epsilon with probability 1 - delta. Refused, saying why, where none is."""
    from mapie.risk_control import BinaryClassificationController
    from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value

    controller = BinaryClassificationController(
        predict_function=lambda x: np.column_stack([1 - np.asarray(x), np.asarray(x)]), risk="precision",
        target_level=1 - risk.epsilon, confidence_level=1 - risk.delta, fwer_method="split_fixed_sequence")
    with warnings.catch_warnings():  # MAPIE warns where nothing qualifies: refused below, by name
        warnings.simplefilter("ignore")
        # Tested in ascending order of their p-values on the fit part (on 100 targets: MAPIE's
        # default 1000 give the same order to within a threshold, ten times slower).
        controller.learn_fixed_sequence_order(learn[0], np.asarray(learn[1], dtype=int),
                                              beta_grid=np.logspace(-25, 0, 100))
        controller.calibrate(confidence, np.asarray(positive, dtype=int))
    n = len(confidence)
    if controller.best_predict_param is None:
        # The least epsilon any threshold could certify: every row answered, and every one right.
        levels = np.linspace(0.001, 0.999, 999)
        p_values = compute_hoeffding_bentkus_p_value(np.zeros(1), n, levels)[0]
        best = levels[np.argmax(p_values <= risk.delta)] if (p_values <= risk.delta).any() else 1.0
        raise ConfigError("data", f"cannot certify {kind} <= {risk.epsilon} at delta {risk.delta} on the {n} "
                          f"held-out rows: no threshold qualifies (with {n} rows, even all of them answered "
                          f"right certify no epsilon below {best:.3f}); give more rows, or state a larger epsilon")
    threshold = float(controller.best_predict_param)
    return Certificate(risk=kind, epsilon=risk.epsilon, delta=risk.delta, threshold=threshold, n=n,
                       coverage=float(np.mean(confidence >= threshold)),
                       method="Learn-then-Test (MAPIE BinaryClassificationController: split fixed-sequence "
                              "testing of 100 thresholds, ordered on the fit part; Hoeffding-Bentkus p-values)")


def plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], stem: Path, title: str, bins: int) -> list[Path]:
    """A reliability diagram and a risk-coverage curve, raw against calibrated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reliability_path, risk_path = stem.with_suffix(".reliability.png"), stem.with_suffix(".risk-coverage.png")
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    for name, (confidence, correct) in curves.items():
        rows = [r for r in metrics.reliability(confidence, correct, bins) if r["count"]]
        ece = metrics.ece(confidence, correct, bins)
        x, y = [r["confidence"] for r in rows], [r["accuracy"] for r in rows]
        (line,) = ax.plot(x, y, label=f"{name} (ECE {ece:.3f})")
        # Marker area grows with the bin's share of the examples.
        ax.scatter(x, y, s=[400 * r["count"] / len(confidence) + 10 for r in rows], color=line.get_color(), alpha=0.7)
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"{title}: reliability")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(reliability_path, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, (confidence, correct)), style in zip(curves.items(), ("-", "--")):
        coverage, risk = metrics.risk_coverage(confidence, correct)
        ax.plot(coverage, risk, linestyle=style, label=f"{name} (AURC {metrics.aurc(confidence, correct):.3f})")
    ax.set(xlabel="coverage", ylabel="risk (error rate among answered)", xlim=(0, 1), title=f"{title}: risk-coverage")
    ax.legend()
    fig.tight_layout()
    fig.savefig(risk_path, dpi=120)
    plt.close(fig)
    return [reliability_path, risk_path]


@dataclass
class Result:
    calibration_path: Path
    report_path: Path
    plots: list[Path]
    report: dict
    skipped: list[str]


async def calibrate(
    deployment: Deployment,
    name: str,
    data: Path,
    out: Path,
    *,
    seed: int = 0,
    fit_fraction: float = 0.5,
    max_tokens: int = 32,
    bins: int = 10,
    engine: SteeringEngine | None = None,
    server: ServerScores | None = None,
) -> Result:
    """Fit the policy's calibration on part of `data`; write it, a JSON report and PNG plots. The
    scores come from `server` (a running server's API), or from an engine started here (or given)."""
    config = deployment.policies.get(name)
    if config is None:
        raise UnknownPolicy(name, deployment.policies, param="--policy")
    if config.decision:
        labels, claims = config.decision.labels, config.decision.claim

        def usable(row: Row) -> str | None:
            if row.label not in labels:
                return f"label {row.label!r} is not one of {labels}"
            if claims and not (row.claim or "").strip():
                return "no claim (this policy checks claims)"
            return None

        dataset = read_rows(data, usable)
    elif config.abstain:
        dataset = read_rows(data, lambda r: None if r.answer is not None else "no answer")
    else:
        raise ConfigError(f"policies.{name}", "only decision and abstention policies are calibrated")
    if len(dataset.rows) < 2:
        raise ConfigError("data", f"{data} has {len(dataset.rows)} usable rows; at least 2 are needed")
    fit, held = split(len(dataset.rows), fit_fraction, seed)
    rows, lines = dataset.rows, dataset.line_numbers
    if server is not None:
        scores = server
    else:
        owned = engine is None
        engine = engine or SteeringEngine.start(deployment)
        scores = EngineScores(Admission(engine, deployment))
    try:
        if config.decision:
            truth = np.asarray([config.decision.labels.index(r.label) for r in rows])
            logprobs = await scores.decision_logprobs(name, rows, lines, config.decision.claim)
            calibration, report, curves = fit_decision(name, config, logprobs, truth, fit, held, bins)
        else:
            answers, correct = await scores.abstention_answers(name, rows, lines, max_tokens)
            calibration, report, curves = fit_abstention(name, config, answers, correct, fit, held, bins)
    finally:
        if server is None and owned:
            engine.shutdown()
    report |= {"data": str(data), "rows": len(dataset.rows), "fit_rows": len(fit), "held_out_rows": len(held),
               "seed": seed, "skipped": dataset.skipped}
    return _written(calibration, report, curves, out, name, bins, dataset.skipped)


async def calibrate_from_feedback(deployment: Deployment, name: str, stores: list[Path], out: Path, *,
                                  seed: int = 0, fit_fraction: float = 0.5, bins: int = 10) -> Result:
    """Refit the policy's calibration on the outcomes fed back to the servers that kept `stores`
    (several replicas' stores merge), as `calibrate` fits it on labelled rows: each outcome recalls
    what its response was scored on (its feedback id bound it). Outcomes of another score or
    other labels than the policy's now are left out, and said."""
    config = deployment.policies.get(name)
    if config is None:
        raise UnknownPolicy(name, deployment.policies, param="--policy")
    try:
        recorded, repeated = merged(stores, name)
    except FileNotFoundError as error:
        raise ConfigError("--from-feedback", str(error)) from None
    skipped = [f"{repeated} outcomes sent again to another replica (the first recorded kept)"] * bool(repeated)
    if config.decision:
        labels = config.decision.labels
        kept = [r for r in recorded if r.bound["kind"] == "decision" and r.bound["labels"] == labels]
        logprobs = np.asarray([r.bound["label_logprobs"] for r in kept], dtype=np.float64)
        truth = np.asarray([labels.index(r.outcome) for r in kept])
    else:
        kept = [r for r in recorded if r.bound["kind"] == "abstention" and r.bound["score"] == config.abstain.score]
        answers = [Recalled(r.bound["raw"], r.bound["features"]) for r in kept]
        correct = np.asarray([r.outcome == CORRECT for r in kept], dtype=float)
    if len(kept) < len(recorded):
        skipped.append(f"{len(recorded) - len(kept)} outcomes of responses scored otherwise than the policy is now")
    if len(kept) < 2:
        raise ConfigError("--from-feedback", f"{len(kept)} usable outcomes of policy {name!r} in {len(stores)} "
                          "store(s); at least 2 are needed")
    fit, held = split(len(kept), fit_fraction, seed)
    if config.decision:
        calibration, report, curves = fit_decision(name, config, logprobs, truth, fit, held, bins)
    else:
        calibration, report, curves = fit_abstention(name, config, answers, correct, fit, held, bins)
    digests = sorted({r.digest for r in kept})
    report |= {"data": [str(path) for path in stores], "rows": len(kept), "fit_rows": len(fit),
               "held_out_rows": len(held), "seed": seed, "skipped": skipped, "config_digests": digests}
    return _written(calibration, report, curves, out, name, bins, skipped)


def _written(calibration: Calibration, report: dict, curves: dict, out: Path, name: str, bins: int,
             skipped: list[str]) -> Result:
    """The calibration file, its JSON report and plots, written beside each other."""
    out.parent.mkdir(parents=True, exist_ok=True)
    calibration.write(out)
    report_path = out.with_suffix(".report.json")
    report_path.write_text(json.dumps(report, indent=2))
    plots = plot(curves, out.with_suffix(""), name, bins)
    return Result(out, report_path, plots, report, skipped)


def summary(result: Result) -> str:
    """What a person wants to read after a run: before/after, costs, where the files are."""
    report = result.report
    lines = [f"calibrated policy {report['policy']!r} on {report['fit_rows']} rows; "
             f"held-out report on {report['held_out_rows']} rows"]
    if report["kind"] == "decision":
        bias = f"; bias {', '.join(f'{b:.4f}' for b in report['bias'])}" if report["bias"] else ""
        lines.append(f"temperature: {report['temperature']:.4f}{bias}")
    else:
        lines.append(f"platt a={report['platt']['a']:.4f} b={report['platt']['b']:.4f}; "
                     f"fitted threshold {report['threshold']:.4f} (Bayes: {report['bayes_threshold']:.4f})")
        if report["weights"]:
            lines.append(f"{report['score']} weights: {', '.join(f'{w:.4f}' for w in report['weights'])}")
    lines.append(f"{'':12}{'accuracy':>10}{'nll':>10}{'brier':>10}{'ece':>10}{'aurc':>10}")
    for stage in ("raw", "calibrated"):
        m = report[stage]
        lines.append(f"{stage:12}{m['accuracy']:10.4f}{m['nll']:10.4f}{m['brier']:10.4f}{m['ece']:10.4f}{m['aurc']:10.4f}")
    costs = ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} n/a" for k, v in report["expected_cost"].items())
    lines.append(f"expected cost: {costs}")
    if (certificate := report.get("certificate")) is not None:
        lines.append(f"certified: {certificate['risk']} <= {certificate['epsilon']} with probability >= "
                     f"{1 - certificate['delta']:.2f}, at threshold {certificate['threshold']:.4f}, on "
                     f"{certificate['n']} held-out rows (coverage {certificate['coverage']:.3f})")
    for skipped in result.skipped:
        lines.append(f"skipped {skipped}")
    lines.append(f"wrote {result.calibration_path}, {result.report_path}, " + ", ".join(map(str, result.plots)))
    return "\n".join(lines)
