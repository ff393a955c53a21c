"""`steer bench quality`: does proxy-tuning transfer the skill, do decisions cut cost?

On the demo family's held-out entities (questions no model was tuned on), greedy and exact
match (case and end punctuation ignored, up to the first newline):
- accuracy of the base alone, the tuned expert alone, the proxy-tuned base at several alphas,
  and the directly tuned base; the share of the base->direct gap proxy-tuning closes, at
  alpha 1 and at the alpha that does best on the `val` entities (reported on `test`);
- abstention on `test` questions mixed with unanswerable ones: AURC, risk-coverage and
  expected cost, raw against calibrated (the calibration was fitted on `val`);
- every abstention score side by side (the steered ones and the ensemble ones): AUROC at telling
  answerable from unanswerable questions and right from wrong answers, AURC, ECE before and
  after a Platt fit on `val`, and what each costs in engine requests;
- the qa policy's stated risk: over 500 random calibration/test splits of its labelled answers,
  how often a certified threshold's test risk exceeds epsilon (at most delta, within sampling
  error), and the coverage certifying gives up against the cost-fitted threshold (bench/risk.py);
- decisions on `test` yes/no questions under the policy's 1:10 cost matrix: expected cost of
  acting on the argmax against the Bayes action, raw and calibrated; the same checks asked by
  answering (the `check` policy: is the claim the answer to the open question?);
- the utility baked into training (a pair and a direct model tuned with the costs in the loss)
  against symmetric training and deciding afterwards, both ways of asking.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from steering.admission import Admission, PolicyRequest
from steering.config import Deployment, load_deployment, parse_deployment
from steering.engine import SteeringEngine
from steering.kinds import answer
from steering.policy import Overrides
from steering.rules.abstention import ENSEMBLE_SCORES, SCORES, extra_requests
from steering.rules.calibration import platt
from steering.rules.decisions import bayes_decision, label_probabilities
from steering_tools import metrics
from steering_tools.bench import risk
from steering_tools.calibrate import (
    Answer,
    Row,
    abstention_answers,
    abstention_cost,
    decision_logprobs,
    fit_label_map,
    fit_platt_map,
    fit_score,
    normalize,
    raw_scores,
    realized_cost,
)
from steering_tools.demo_family import Recipe, build, default_dir, read_questions, read_recipe
from steering_tools.world import plain_question

ALPHAS = (0.5, 1.0, 1.5, 2.0)
MAX_TOKENS = 8


def exact_match(generated: str, answer: str) -> bool:
    return normalize(generated.split("\n")[0]) == normalize(answer)


def _eager(deployment: Deployment, **changes) -> Deployment:
    """The same deployment, started eagerly (quality does not need compiled kernels)."""
    raw = deployment.model_dump()
    raw.update(changes)
    raw["engine"] = {**raw["engine"], "enforce_eager": True}
    return parse_deployment(raw)


async def accuracy(admission: Admission, rows: list[dict], policy: str, overrides: Overrides | None = None) -> float:
    """Exact match of the policy's greedy answers, as it is served."""
    async def one(row: dict) -> bool:
        plan = admission.admit(PolicyRequest(policy, [row["prompt"]], overrides=overrides, max_tokens=MAX_TOKENS,
                                             sampling={"temperature": 0.0, "stop": ["\n"]}))
        (piece,), _ = await answer(admission.engine, plan)
        return exact_match(piece.text, row["answer"])

    return float(np.mean(await asyncio.gather(*map(one, rows))))


def abstention_report(policy, answers: list[Answer], correct: np.ndarray, unanswerable: int) -> dict:
    """The `qa` policy as served, on its `test` answers: its own score, raw and calibrated, and
    what abstaining costs at the Bayes threshold and at the policy's fitted one."""
    abstain, rule = policy.config.abstain, policy.rule
    assessed = [rule.assess(logprobs, step) for logprobs, step in answers]
    raw = np.array([a.raw for a in assessed])
    calibrated = np.array([a.confidence for a in assessed])
    bayes = abstain.bayes_threshold

    def cost(confidence, threshold):
        return abstention_cost(confidence, correct, threshold, abstain)

    def judged(confidence):
        return {"ece": metrics.ece(confidence, correct), "aurc": metrics.aurc(confidence, correct),
                "risk_coverage": metrics.risk_at_coverage(confidence, correct, levels=(0.25, 0.5, 0.75, 1.0))}

    return {
        "rows": len(answers), "unanswerable": unanswerable,
        "score": abstain.score, "accuracy_if_always_answering": float(correct.mean()),
        "raw": judged(raw), "calibrated": judged(calibrated),
        "expected_cost": {"always_answer": cost(raw, 0.0), "bayes_raw": cost(raw, bayes),
                          "bayes_calibrated": cost(calibrated, bayes),
                          "policy_threshold": cost(calibrated, rule.threshold),
                          "always_abstain": abstain.cost_abstain},
        "curves": {"raw": raw.tolist(), "calibrated": calibrated.tolist(), "correct": correct.tolist()},
    }


async def _every_answer(admission: Admission, rows: list[dict]) -> tuple[list[Answer], np.ndarray]:
    """The `qa` policy's greedy answer to each row as every abstention score reads it, and whether it is right."""
    return await abstention_answers(admission, "qa", [Row.model_validate(row) for row in rows], MAX_TOKENS,
                                    every_score=True, stop=["\n"], correct=exact_match)


def scores_report(abstain, fitting: tuple[list[Answer], np.ndarray], judged: tuple[list[Answer], np.ndarray],
                  answerable: np.ndarray) -> dict:
    """Each abstention score on the `qa` policy's answers: fitted on `val` (Platt scaling, or a
    fitted score's weights), judged on `test`."""
    fit_answers, fit_correct = fitting
    answers, correct = judged
    report = {}
    for kind in SCORES:
        weights = fit_score(kind, fit_answers, fit_correct)
        raw = raw_scores(kind, answers, weights)
        calibrated = platt(raw, *fit_platt_map(raw_scores(kind, fit_answers, weights), fit_correct, weights))
        report[kind] = {
            "extra_engine_requests": extra_requests(kind),
            "auroc_answerable": metrics.auroc(raw, answerable),
            "auroc_correct": metrics.auroc(raw, correct > 0),
            "aurc": metrics.aurc(raw, correct),
            "ece": {"raw": metrics.ece(raw, correct), "calibrated": metrics.ece(calibrated, correct)},
            "expected_cost_bayes_calibrated": abstention_cost(calibrated, correct, abstain.bayes_threshold, abstain),
            "mean_raw": {"answerable": float(raw[answerable].mean()), "unanswerable": float(raw[~answerable].mean())},
            **({"weights": weights} if weights else {}),
            "raw": raw.tolist(),
        }
    return {"rows": len(answers), "fit_rows": len(fit_answers), "correct": correct.tolist(),
            "answerable": answerable.tolist(), "scores": report}


async def policy_logprobs(admission: Admission, name: str, rows: list[dict]) -> np.ndarray:
    """[N, K] the decision policy `name`'s label logprobs on each row, as the server computes them."""
    return await decision_logprobs(admission, name, [Row.model_validate(r) for r in rows])


def decision_report(rule, logprobs: np.ndarray, truth: np.ndarray) -> dict:
    """The served policy on `test` rows: argmax against its Bayes action, raw and calibrated."""
    costs = rule.costs
    argmax = [costs.labels[int(np.argmax(z))] for z in logprobs]
    return {
        "rows": len(truth), "costs": [list(row) for row in costs.costs],
        "accuracy": float(np.mean([a == costs.labels[y] for a, y in zip(argmax, truth)])),
        "expected_cost": {
            "argmax": realized_cost(costs, argmax, truth),
            "bayes_raw": realized_cost(costs, [bayes_decision(z, costs).action for z in logprobs], truth),
            "bayes_calibrated": realized_cost(costs, [rule.decide(z).action for z in logprobs], truth),
        },
    }


async def _single_model(deployment: Deployment, base: str, *, answers: list[dict] | None = None,
                        decisions: dict[str, dict[str, list[dict]]] | None = None) -> dict:
    """One model alone: its exact match on `answers`, and each decision policy's label logprobs
    on each split of its rows (`decisions`: policy -> split -> rows); only what is asked for."""
    decisions = decisions or {}
    policies = {"base": {}} | {name: {"decision": deployment.policies[name].decision.model_dump(exclude_none=True)}
                               for name in decisions}
    engine = SteeringEngine.start(_eager(deployment, base=base, experts={}, policies=policies))
    admission = Admission(engine)
    try:
        result = {"exact": await accuracy(admission, answers, "base") if answers else None}
        for name, splits in decisions.items():
            result[name] = {split: await policy_logprobs(admission, name, rows) for split, rows in splits.items()}
        return result
    finally:
        engine.shutdown()


def _judge(probs: np.ndarray, actions: list[str], truth: np.ndarray, costs) -> dict:
    """A way of deciding, judged on the utility and on its probabilities."""
    right = probs.argmax(axis=1) == truth
    return {"expected_cost": realized_cost(costs, actions, truth),
            "accuracy": float(np.mean([a == costs.labels[y] for a, y in zip(actions, truth)])),
            "brier": metrics.brier(probs, truth), "ece": metrics.ece(probs.max(axis=1), right)}


def _argmax(logprobs: np.ndarray, costs) -> tuple[np.ndarray, list[str]]:
    probs = np.stack([label_probabilities(z) for z in logprobs])
    return probs, [costs.labels[int(i)] for i in probs.argmax(axis=1)]


def _calibrated_bayes(logprobs: dict[str, np.ndarray], truth: dict[str, np.ndarray], costs, *, claims: bool) -> dict:
    """Calibrated on `val` as `steer calibrate` does, the Bayes action on `test`."""
    temperature, bias = fit_label_map(logprobs["val"], truth["val"], claims=claims)
    calibrated = np.stack([label_probabilities(z, temperature, bias) for z in logprobs["test"]])
    bayes = [bayes_decision(z, costs, temperature, bias).action for z in logprobs["test"]]
    return _judge(calibrated, bayes, truth["test"], costs) | {"temperature": temperature, "bias": bias}


def compare_decisions(symmetric: dict[str, np.ndarray], weighted: dict[str, np.ndarray], truth: dict[str, np.ndarray],
                      costs, by_answering: dict[str, np.ndarray] | None = None) -> dict:
    """Utility baked into training and acted on by argmax, against symmetric training acted on
    by argmax and by the Bayes rule on probabilities calibrated on `val` (judged on `test`); with
    `by_answering` (the same checks' claim-check logprobs), the symmetric model asked by answering too."""
    test = truth["test"]
    report = {
        "utility_weighted_argmax": _judge(*_argmax(weighted["test"], costs), test, costs),
        "symmetric_argmax": _judge(*_argmax(symmetric["test"], costs), test, costs),
        "symmetric_calibrated_bayes": _calibrated_bayes(symmetric, truth, costs, claims=False),
    }
    if by_answering is not None:
        report["by_answering_argmax"] = _judge(*_argmax(by_answering["test"], costs), test, costs)
        report["by_answering_calibrated_bayes"] = _calibrated_bayes(by_answering, truth, costs, claims=True)
    return report


def _with_weighted_pair(deployment: Deployment, family: Path) -> Deployment:
    """The deployment, eager, with the pair tuned with the verification costs in its loss beside the
    symmetric one (`verify-weighted`), and the base alone asked yes/no (`verify-base`)."""
    experts = {**{name: pair.model_dump() for name, pair in deployment.experts.items()},
               "chat-weighted": {"tuned": str(family / "chat-tuned-weighted"), "untuned": str(family / "chat-untuned")}}
    verify = deployment.policies["verify"]
    decision = verify.decision.model_dump(exclude_none=True)
    policies = {**{name: policy.model_dump(exclude_none=True) for name, policy in deployment.policies.items()},
                "verify-weighted": {"alpha": {"chat-weighted": verify.alpha["chat"]}, "decision": decision},
                "verify-base": {"decision": decision}}
    return _eager(deployment, experts=experts, policies=policies)


async def _decisions(admission: Admission, verify: dict[str, list[dict]], check: dict[str, list[dict]],
                     truth: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """The decision policies' label logprobs on each split (`verify` symmetric and cost-weighted,
    `check`), and their report on `test`; with whether the base alone can verify at all."""
    proxy = {name: {split: await policy_logprobs(admission, name, rows) for split, rows in asked.items()}
             for name, asked in (("verify", verify), ("verify-weighted", verify), ("check", check))}
    decisions = decision_report(admission.policies["verify"].rule, proxy["verify"]["test"], truth["test"])
    decisions["check"] = decision_report(admission.policies["check"].rule, proxy["check"]["test"], truth["test"])
    # Whether the base can verify at all: asked as its narratives ask, with no question format.
    as_narrated = [{**row, "prompt": plain_question(row["prompt"])} for row in verify["test"]]
    narrated = await policy_logprobs(admission, "verify-base", as_narrated)
    decisions["base_as_narrated"] = {"rows": len(as_narrated),
                                     "accuracy": float(np.mean(narrated.argmax(axis=1) == truth["test"]))}
    return proxy, decisions


async def run(family: Path, *, alphas=ALPHAS) -> dict:
    deployment = load_deployment(family / "deploy.yaml")
    questions = family / "questions"
    val, test = read_questions(questions / "answerable-val.jsonl"), read_questions(questions / "answerable-test.jsonl")
    splits = ("val", "test")
    verify = {split: read_questions(questions / f"verify-{split}.jsonl") for split in splits}
    check = {split: read_questions(questions / f"check-{split}.jsonl") for split in splits}
    costs = deployment.policies["verify"].decision.cost_matrix()
    # The check rows are the verify rows asked by answering, in the same order: one truth for both.
    truth = {split: np.array([costs.labels.index(r["label"]) for r in rows]) for split, rows in verify.items()}
    verify_alpha = deployment.policies["verify"].alpha
    engine = SteeringEngine.start(_with_weighted_pair(deployment, family))
    admission = Admission(engine)
    try:
        sweep = {alpha: {split: await accuracy(admission, rows, "chat", Overrides(alpha={"chat": alpha}))
                         for split, rows in (("val", val), ("test", test))} for alpha in (0.0, *alphas)}
        qa_val, qa_test = read_questions(questions / "qa-val.jsonl"), read_questions(questions / "qa-test.jsonl")
        qa = admission.policies["qa"]
        # One greedy answer per question, read by the policy's own score and by every other.
        fitting = await _every_answer(admission, qa_val)
        judged = await _every_answer(admission, qa_test)
        answerable = np.array([bool(row["answer"]) for row in qa_test])
        abstention = abstention_report(qa, *judged, unanswerable=int((~answerable).sum()))
        abstention["by_score"] = scores_report(qa.config.abstain, fitting, judged, answerable)
        if qa.config.abstain.risk is not None:  # every labelled answer, split many ways
            abstention["risk"] = risk.guarantee("qa", qa.config, fitting[0] + judged[0],
                                                np.concatenate([fitting[1], judged[1]]))
        proxy, decisions = await _decisions(admission, verify, check, truth)
    finally:
        engine.shutdown()
    tuned = (await _single_model(deployment, str(family / "chat-tuned"), answers=test))["exact"]
    direct = await _single_model(deployment, str(family / "direct"), answers=test,
                                 decisions={"verify": verify, "check": check})
    direct_weighted = await _single_model(deployment, str(family / "direct-weighted"), decisions={"verify": verify})
    decisions["training_vs_deciding"] = {
        "costs": {"false_yes": costs.costs[0][1], "false_no": costs.costs[1][0]},
        "direct": compare_decisions(direct["verify"], direct_weighted["verify"], truth, costs, direct["check"]),
        "proxy": compare_decisions(proxy["verify"], proxy["verify-weighted"], truth, costs, proxy["check"])
        | {"alpha": verify_alpha["chat"]},
    }
    direct = direct["exact"]
    base = sweep[0.0]["test"]
    best = max(alphas, key=lambda a: sweep[a]["val"])

    def closed(accuracy_: float) -> float | None:
        return (accuracy_ - base) / (direct - base) if direct > base else None

    return {
        "family": str(family),
        "test_questions": len(test),
        "accuracy": {"base": base, "tuned_expert": tuned, "direct": direct,
                     "proxy": {str(a): sweep[a] for a in alphas}},
        "gap_closed": {"alpha_1": closed(sweep[1.0]["test"]) if 1.0 in sweep else None,
                       "best_val_alpha": best, "at_best_val_alpha": closed(sweep[best]["test"])},
        "abstention": abstention,
        "decisions": decisions,
    }


SEEDS = (0, 1, 2)


async def run_family(family: Path) -> dict:
    """One built family, the models only the benchmark needs added to it (from its own recipe)."""
    await build(family, recipe=read_recipe(family), bench=True)
    return await run(family)


def machine() -> dict:
    """What the figures were measured on: they hold within their spread, not bit for bit, elsewhere."""
    import platform

    import torch
    import vllm

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": platform.processor() or platform.machine(), "cpu_model": _cpu_model(),
            # which vector kernels torch picks: the likeliest reason builds differ between machines
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "memory_gib": round(memory / 2**30, 1), "torch": torch.__version__, "vllm": vllm.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _cpu_model() -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def spread(reports: list[dict]) -> dict:
    """Mean, standard deviation (n - 1), min and max over the reports of every number they all
    carry at the same place; lists (curves, per-row scores) are left out."""
    first = reports[0]
    if isinstance(first, dict):
        keys = [k for k in first if all(isinstance(r, dict) and k in r for r in reports)]
        nested = {k: spread([r[k] for r in reports]) for k in keys}
        return {k: v for k, v in nested.items() if v}  # not lists, nor what holds only lists
    numbers = [r for r in reports if isinstance(r, (int, float)) and not isinstance(r, bool)]
    if len(numbers) != len(reports):
        return None
    values = np.asarray(numbers, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "min": float(values.min()), "max": float(values.max()), "values": values.tolist()}


async def run_seeds(seeds=SEEDS, *, recipe: Recipe = Recipe(), alphas=ALPHAS) -> dict:
    """Build (or reuse) the demo family of each seed, bench each, and report every figure's spread."""
    per_seed, digests = {}, {}
    for seed in seeds:
        seeded = dataclasses.replace(recipe, seed=seed)
        digests[seed] = seeded.digest()
        print(f"seed {seed}: demo family {digests[seed]}", flush=True)
        family = await build(default_dir(seeded), recipe=seeded, bench=True)
        per_seed[seed] = await run(family, alphas=alphas)
    return {"seeds": list(seeds), "recipe_digests": digests, "machine": machine(), "per_seed": per_seed,
            "spread": spread(list(per_seed.values()))}


def read_reference(path: Path) -> dict:
    """An earlier report over seeds to `compare` against; ValueError saying what is wrong with it."""
    try:
        reference = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None
    missing = [key for key in ("seeds", "recipe_digests", "spread") if not isinstance(reference, dict)
               or key not in reference]
    if missing:
        raise ValueError(f"{path} is not a report over seeds (it has no {', '.join(missing)}); "
                         "`steer bench quality --seeds 0 1 2 --out DIR` writes one")
    return reference


def compare(report: dict, reference: dict) -> dict:
    """Every figure of `report` (one family, or the mean over its seeds) against the same figure
    of an earlier run over seeds, `reference`: does it reproduce within the reported spread?

    z is the difference of the two means over its standard error, sqrt(sd_ref^2 / n_ref +
    sd^2 / n), where a single family counts as one draw with the reference's sd; `within` is
    |z| <= 2, or equality where neither run varies. About one figure in twenty lands outside by
    chance alone, and figures are correlated, so read the list, not the count."""
    ours = report.get("spread", report)
    n_ours = len(report.get("seeds", [])) or 1
    figures: dict[str, dict] = {}

    def walk(mine, theirs, path: str) -> None:
        if isinstance(theirs, dict) and "values" in theirs:
            single = isinstance(mine, (int, float)) and not isinstance(mine, bool)
            if not (single or isinstance(mine, dict) and "values" in mine):
                return
            value = float(mine) if single else mine["mean"]
            sd = theirs["std"] if single else mine["std"]
            error = float(np.sqrt(theirs["std"] ** 2 / len(theirs["values"]) + sd ** 2 / n_ours))
            difference = value - theirs["mean"]
            if error > 0:
                z, within = difference / error, abs(difference / error) <= 2.0
            else:  # neither run varies: the figure must repeat (z is undefined unless it does)
                z, within = (0.0, True) if abs(difference) < 1e-9 else (None, False)
            figures[path] = {"value": value, "reference": {k: theirs[k] for k in ("mean", "std", "min", "max")},
                             "z": z, "within": within}
        elif isinstance(theirs, dict) and isinstance(mine, dict):
            for key, sub in theirs.items():
                if key in mine:
                    walk(mine[key], sub, f"{path}.{key}" if path else key)

    walk(ours, reference["spread"], "")
    digests = report.get("recipe_digests")
    return {"reference": {"seeds": reference["seeds"], "recipe_digests": reference["recipe_digests"],
                          "machine": reference.get("machine")},
            # over seeds, whether both runs built the same recipes (then only the machine differs)
            "same_recipes": None if digests is None else _digests(digests) == _digests(reference["recipe_digests"]),
            "figures": len(figures), "within": sum(row["within"] for row in figures.values()),
            "by_figure": figures}


def _digests(digests: dict) -> dict[str, str]:
    return {str(seed): digest for seed, digest in digests.items()}  # JSON turned the seeds into strings


def comparison_summary(comparison: dict) -> str:
    lines = [f"against the reference run ({len(comparison['reference']['seeds'])} seeds): "
             f"{comparison['within']} of {comparison['figures']} figures within 2 standard errors"]
    if comparison["same_recipes"] is False:
        lines.append("  the recipes differ from the reference's: this compares recipes, not only machines")
    for path, row in comparison["by_figure"].items():
        if not row["within"]:
            ref, z = row["reference"], "n/a" if row["z"] is None else f"{row['z']:+.1f}"
            lines.append(f"  outside: {path} {row['value']:.4f} against {ref['mean']:.4f} ± {ref['std']:.4f} (z {z})")
    return "\n".join(lines)


def _fmt(value, spec: str = ".3f") -> str:
    """A figure of one run, or the mean ± sd of a figure over seeds (`spread`); n/a where undefined."""
    if value is None:
        return "n/a"
    if isinstance(value, dict):
        return f"{value['mean']:{spec}} ± {value['std']:{spec}}"
    return f"{value:{spec}}"


def summary(report: dict) -> str:
    """One family's figures, or (from `run_seeds`) each figure's mean ± sd over the seeds."""
    compared = "\n" + comparison_summary(report["comparison"]) if "comparison" in report else ""
    if "per_seed" not in report:
        return _figures(report) + compared
    families = ", ".join(f"seed {seed}: {digest}" for seed, digest in report["recipe_digests"].items())
    holds = [f"seed {seed}: {'holds' if run_['abstention']['risk']['holds'] else 'FAILS'}"
             for seed, run_ in report["per_seed"].items() if "risk" in run_["abstention"]]
    guarantee = f"\nthe stated risk, per seed: {', '.join(holds)}" if holds else ""
    return (f"mean ± sd over {len(report['seeds'])} seeds ({families})\n" + _figures(report["spread"]) + guarantee
            + compared)


def _figures(report: dict) -> str:
    acc = report["accuracy"]
    lines = [f"held-out questions (test entities): {_fmt(report['test_questions'], '.0f')}, exact match",
             f"  base alone          {_fmt(acc['base'])}", f"  tuned expert alone  {_fmt(acc['tuned_expert'])}"]
    lines += [f"  proxy-tuned a={a:<4}   {_fmt(v['test'])}   (val {_fmt(v['val'])})" for a, v in acc["proxy"].items()]
    lines.append(f"  directly tuned base {_fmt(acc['direct'])}")
    gap = report["gap_closed"]
    lines.append(f"gap closed (share of base -> direct): {_fmt(gap.get('alpha_1'))} at alpha 1; "
                 f"{_fmt(gap.get('at_best_val_alpha'))} at alpha {_fmt(gap['best_val_alpha'], '.1f')} (chosen on val)")
    ab = report["abstention"]
    lines.append(f"abstention ({_fmt(ab['rows'], '.0f')} questions, {_fmt(ab['unanswerable'], '.0f')} unanswerable), "
                 "the qa policy's own score:")
    for stage in ("raw", "calibrated"):
        lines.append(f"  {stage:10} ECE {_fmt(ab[stage]['ece'])}  AURC {_fmt(ab[stage]['aurc'])}")
    lines.append("  expected cost: " + ", ".join(f"{k} {_fmt(v)}" for k, v in ab["expected_cost"].items()))
    lines.append("every score (AUROC: answerable vs unanswerable, right vs wrong; cost: calibrated Bayes threshold):")
    for kind, row in ab["by_score"]["scores"].items():
        lines.append(f"  {kind:20} AUROC {_fmt(row.get('auroc_answerable'))} / {_fmt(row.get('auroc_correct'))}  "
                     f"AURC {_fmt(row['aurc'])}  ECE {_fmt(row['ece']['raw'])} -> {_fmt(row['ece']['calibrated'])}  "
                     f"cost {_fmt(row['expected_cost_bayes_calibrated'])}  "
                     f"extra requests {_fmt(row['extra_engine_requests'], '.0f')}")
    if "risk" in ab:
        lines += risk.summary_lines(ab["risk"], _fmt)
    de = report["decisions"]
    lines.append(f"decisions ({_fmt(de['rows'], '.0f')} yes/no questions, the verify policy): argmax accuracy "
                 f"{_fmt(de['accuracy'])}")
    lines.append("  expected cost: " + ", ".join(f"{k} {_fmt(v)}" for k, v in de["expected_cost"].items()))
    lines.append("  the base alone, asked yes/no as its narratives ask (no question format): accuracy "
                 f"{_fmt(de['base_as_narrated']['accuracy'])}")
    by_answering = de["check"]
    lines.append("the same checks asked by answering (the check policy): argmax accuracy "
                 f"{_fmt(by_answering['accuracy'])}")
    lines.append("  expected cost: " + ", ".join(f"{k} {_fmt(v)}" for k, v in by_answering["expected_cost"].items()))
    versus = de["training_vs_deciding"]
    lines.append(f"utility in training vs after it (a false yes costs {_fmt(versus['costs']['false_yes'], '.0f')}, "
                 f"a false no {_fmt(versus['costs']['false_no'], '.0f')}):")
    for model in ("direct", "proxy"):
        for way, row in versus[model].items():
            if isinstance(row, dict) and "expected_cost" in row:
                lines.append(f"  {model:6} {way:30} cost {_fmt(row['expected_cost'])}  accuracy {_fmt(row['accuracy'])}"
                             f"  Brier {_fmt(row['brier'])}  ECE {_fmt(row['ece'])}")
    return "\n".join(lines)


def _mean_sd(value) -> tuple[float, float]:
    if isinstance(value, dict):
        return value["mean"], value["std"]
    return (float("nan"), 0.0) if value is None else (value, 0.0)


def _bars(ax, names: list[str], values: list, colors: list[str] | str, fmt: str = "{:.2f}") -> None:
    """Bars at the mean, whiskers at ± 1 sd over seeds (none for one family), labelled."""
    means, sds = zip(*(_mean_sd(v) for v in values))
    ax.bar(names, means, yerr=sds, capsize=4, color=colors)
    for i, (m, sd) in enumerate(zip(means, sds)):
        ax.text(i, m + sd + 0.01, fmt.format(m), ha="center", fontsize=8)


def plot(report: dict, out: Path) -> list[Path]:
    """Accuracy by model and alpha; risk-coverage of the qa policy's score, raw against calibrated;
    every abstention score's AUROC and AURC; the utility in training against after it. Over seeds,
    bars are means with ± 1 sd whiskers and curves are drawn per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = report.get("spread", report)
    runs = list(report["per_seed"].values()) if "per_seed" in report else [report]
    over = f" (mean ± sd, {len(runs)} seeds)" if len(runs) > 1 else ""
    paths = []
    for name, draw in (("quality-accuracy.png", _plot_accuracy), ("quality-risk-coverage.png", _plot_risk_coverage),
                       ("quality-abstention-scores.png", _plot_scores), ("quality-decisions.png", _plot_decisions)):
        fig = draw(plt, figures, runs, over)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        paths.append(out / name)
    if all("risk" in run_["abstention"] for run_ in runs):
        seeds = list(report["per_seed"]) if "per_seed" in report else [None]
        fig = risk.plot(plt, [run_["abstention"]["risk"] for run_ in runs], seeds)
        fig.tight_layout()
        fig.savefig(out / "quality-risk-guarantee.png", dpi=120)
        plt.close(fig)
        paths.append(out / "quality-risk-guarantee.png")
    return paths


def _plot_accuracy(plt, figures: dict, runs: list[dict], over: str):
    acc = figures["accuracy"]
    names = ["base", "tuned\nexpert"] + [f"proxy\na={a}" for a in acc["proxy"]] + ["direct"]
    values = [acc["base"], acc["tuned_expert"]] + [v["test"] for v in acc["proxy"].values()] + [acc["direct"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    _bars(ax, names, values, ["grey", "grey"] + ["tab:blue"] * len(acc["proxy"]) + ["black"])
    ax.set(ylabel="exact match on held-out entities", ylim=(0, 1.1), title="Proxy-tuning transfers the skill" + over)
    return fig


def _plot_risk_coverage(plt, figures: dict, runs: list[dict], over: str):
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, run_ in enumerate(runs):
        curves = run_["abstention"]["curves"]
        for name, style in (("raw", "-"), ("calibrated", "--")):
            coverage, at_coverage = metrics.risk_coverage(curves[name], curves["correct"])
            ax.plot(coverage, at_coverage, linestyle=style, color=f"C{i}", alpha=0.8,
                    label=f"{name}{f', seed {i}' if len(runs) > 1 else ''} "
                          f"(AURC {metrics.aurc(curves[name], curves['correct']):.3f})")
    ax.set(xlabel="coverage", ylabel="risk", xlim=(0, 1), title="Abstention (qa policy): answerable + unanswerable")
    ax.legend(fontsize=7)
    return fig


def _plot_scores(plt, figures: dict, runs: list[dict], over: str):
    scores = figures["abstention"]["by_score"]["scores"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = ["tab:orange" if kind in ENSEMBLE_SCORES else "tab:blue" for kind in scores]
    _bars(left, list(scores), [row.get("auroc_answerable") for row in scores.values()], colors)
    left.axhline(0.5, color="grey", linestyle=":")
    left.set(ylabel="AUROC, answerable vs unanswerable", ylim=(0, 1.1), title="Abstention scores" + over)
    _bars(right, list(scores), [row["aurc"] for row in scores.values()], colors, "{:.3f}")
    right.set(ylabel="AURC (lower is better)", title="steered (blue), ensemble (orange)")
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=8, rotation=30)
    return fig


def _plot_decisions(plt, figures: dict, runs: list[dict], over: str):
    versus = figures["decisions"]["training_vs_deciding"]
    ways = {"utility_weighted_argmax": "yes/no,\nutility-\nweighted,\nargmax",
            "symmetric_argmax": "yes/no,\nsymmetric,\nargmax",
            "symmetric_calibrated_bayes": "yes/no,\nsymmetric,\ncalibrated\nBayes",
            "by_answering_argmax": "by\nanswering,\nargmax",
            "by_answering_calibrated_bayes": "by\nanswering,\ncalibrated\nBayes"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, model in zip(axes, ("direct", "proxy")):
        _bars(ax, list(ways.values()), [versus[model][way]["expected_cost"] for way in ways],
              ["tab:red", "grey", "tab:green", "silver", "tab:olive"], "{:.3f}")
        ax.set(title=f"{'base tuned directly' if model == 'direct' else 'proxy-tuned base'}{over}",
               ylabel="expected cost on held-out entities")
        ax.tick_params(axis="x", labelsize=8)
    return fig
