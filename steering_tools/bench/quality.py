"""`steer bench quality`: does proxy-tuning transfer the skill, do decisions cut cost?

On the demo family's held-out entities (questions no model was tuned on), greedy and exact
match (case and end punctuation ignored, up to the first newline):
- accuracy of the base alone, the tuned expert alone, the proxy-tuned base at several alphas,
  and the directly tuned base; the share of the base->direct gap proxy-tuning closes, at
  alpha 1 and at the alpha that does best on the `val` entities (reported on `test`);
- abstention on `test` questions mixed with unanswerable ones: AURC, risk-coverage and
  expected cost, raw against calibrated (the calibration was fitted on `val`);
- decisions on `test` yes/no questions under the policy's 1:10 cost matrix: expected cost of
  acting on the argmax against the Bayes action, raw and calibrated.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from vllm import SamplingParams

from steering.config import Deployment, load_deployment, parse_deployment
from steering.engine import SteeringEngine, answer_logprobs
from steering.policy import Overrides, Steering
from steering.rules.abstention import confidence_score
from steering.rules.decisions import decide
from steering_tools import metrics
from steering_tools.calibrate import abstention_cost, normalize, realized_cost
from steering_tools.demo_family import read_questions

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


async def _answers(engine: SteeringEngine, rows: list[dict], steering: Steering, *, logprobs: bool = False):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, stop=["\n"], logprobs=0 if logprobs else None)
    return await asyncio.gather(*(engine.complete(row["prompt"], params, steering=steering) for row in rows))


async def accuracy(engine: SteeringEngine, rows: list[dict], steering: Steering) -> float:
    outputs = await _answers(engine, rows, steering)
    return float(np.mean([exact_match(o.outputs[0].text, row["answer"]) for o, row in zip(outputs, rows)]))


async def abstention_report(engine: SteeringEngine, rows: list[dict]) -> dict:
    policy = engine.policies["qa"]
    abstain, rule = policy.config.abstain, policy.rule
    outputs = await _answers(engine, rows, policy.resolve(), logprobs=True)
    completions = [o.outputs[0] for o in outputs]
    raw = np.array([confidence_score(abstain.score, answer_logprobs(c.token_ids, c.logprobs)) for c in completions])
    correct = np.array([exact_match(c.text, row["answer"]) for c, row in zip(completions, rows)], dtype=float)
    calibrated = np.array([rule.calibration.confidence(s) for s in raw])
    bayes = abstain.bayes_threshold

    def cost(confidence, threshold):
        return abstention_cost(confidence, correct, threshold, abstain)

    def judged(confidence):
        return {"ece": metrics.ece(confidence, correct), "aurc": metrics.aurc(confidence, correct),
                "risk_coverage": metrics.risk_at_coverage(confidence, correct, levels=(0.25, 0.5, 0.75, 1.0))}

    return {
        "rows": len(rows), "unanswerable": sum(1 for r in rows if not r["answer"]),
        "score": abstain.score, "accuracy_if_always_answering": float(correct.mean()),
        "raw": judged(raw), "calibrated": judged(calibrated),
        "expected_cost": {"always_answer": cost(raw, 0.0), "bayes_raw": cost(raw, bayes),
                          "bayes_calibrated": cost(calibrated, bayes),
                          "policy_threshold": cost(calibrated, rule.threshold),
                          "always_abstain": abstain.cost_abstain},
        "curves": {"raw": raw.tolist(), "calibrated": calibrated.tolist(), "correct": correct.tolist()},
    }


async def decision_report(engine: SteeringEngine, rows: list[dict]) -> dict:
    steering = engine.policies["verify"].resolve()
    costs = steering.rule.costs
    logprobs = await asyncio.gather(*(engine.label_logprobs(r["prompt"], steering) for r in rows))
    truth = np.array([costs.labels.index(r["label"]) for r in rows])
    argmax = [costs.labels[int(np.argmax(z))] for z in logprobs]
    return {
        "rows": len(rows), "costs": [list(row) for row in costs.costs],
        "accuracy": float(np.mean([a == costs.labels[y] for a, y in zip(argmax, truth)])),
        "expected_cost": {
            "argmax": realized_cost(costs, argmax, truth),
            "bayes_raw": realized_cost(costs, [decide(z, costs).action for z in logprobs], truth),
            "bayes_calibrated": realized_cost(costs, [steering.rule.decide(z).action for z in logprobs], truth),
        },
    }


async def _single_model_accuracy(deployment: Deployment, base: str, rows: list[dict]) -> float:
    engine = SteeringEngine.start(_eager(deployment, base=base, experts={}, policies={"base": {}}))
    try:
        return await accuracy(engine, rows, engine.policies["base"].resolve())
    finally:
        engine.shutdown()


async def run(family: Path, *, alphas=ALPHAS) -> dict:
    deployment = load_deployment(family / "deploy.yaml")
    questions = family / "questions"
    val, test = read_questions(questions / "answerable-val.jsonl"), read_questions(questions / "answerable-test.jsonl")
    engine = SteeringEngine.start(_eager(deployment))
    try:
        sweep = {}
        for alpha in (0.0, *alphas):
            steering = engine.policies["chat"].resolve(Overrides(alpha={"chat": alpha}))
            sweep[alpha] = {"val": await accuracy(engine, val, steering), "test": await accuracy(engine, test, steering)}
        abstention = await abstention_report(engine, read_questions(questions / "qa-test.jsonl"))
        decisions = await decision_report(engine, read_questions(questions / "verify-test.jsonl"))
    finally:
        engine.shutdown()
    tuned = await _single_model_accuracy(deployment, str(family / "chat-tuned"), test)
    direct = await _single_model_accuracy(deployment, str(family / "direct"), test)
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


def summary(report: dict) -> str:
    acc = report["accuracy"]
    lines = [f"held-out questions (test entities): {report['test_questions']}, exact match",
             f"  base alone          {acc['base']:.3f}", f"  tuned expert alone  {acc['tuned_expert']:.3f}"]
    lines += [f"  proxy-tuned a={a:<4}   {v['test']:.3f}   (val {v['val']:.3f})" for a, v in acc["proxy"].items()]
    lines.append(f"  directly tuned base {acc['direct']:.3f}")
    gap = report["gap_closed"]
    share = lambda value: "n/a (direct is no better than base)" if value is None else f"{value:.1%}"  # noqa: E731
    lines.append(f"gap closed: {share(gap['alpha_1'])} at alpha 1; {share(gap['at_best_val_alpha'])} at alpha "
                 f"{gap['best_val_alpha']} (chosen on val)")
    ab = report["abstention"]
    lines.append(f"abstention ({ab['rows']} questions, {ab['unanswerable']} unanswerable, score {ab['score']}):")
    for stage in ("raw", "calibrated"):
        lines.append(f"  {stage:10} ECE {ab[stage]['ece']:.3f}  AURC {ab[stage]['aurc']:.3f}")
    lines.append("  expected cost: " + ", ".join(f"{k} {v:.3f}" for k, v in ab["expected_cost"].items()))
    de = report["decisions"]
    lines.append(f"decisions ({de['rows']} yes/no questions, costs {de['costs']}, argmax accuracy {de['accuracy']:.3f}):")
    lines.append("  expected cost: " + ", ".join(f"{k} {v:.3f}" for k, v in de["expected_cost"].items()))
    return "\n".join(lines)


def plot(report: dict, out: Path) -> list[Path]:
    """Accuracy by model and alpha; abstention risk-coverage, raw against calibrated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = report["accuracy"]
    names = ["base", "tuned\nexpert"] + [f"proxy\na={a}" for a in acc["proxy"]] + ["direct"]
    values = [acc["base"], acc["tuned_expert"]] + [v["test"] for v in acc["proxy"].values()] + [acc["direct"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(names, values, color=["grey", "grey"] + ["tab:blue"] * len(acc["proxy"]) + ["black"])
    for i, v in enumerate(values):
        ax.text(i, v + 0.01, f"{v:.2f}", ha="center")
    ax.set(ylabel="exact match on held-out entities", ylim=(0, 1.08), title="Proxy-tuning transfers the skill")
    fig.tight_layout()
    accuracy_path = out / "quality-accuracy.png"
    fig.savefig(accuracy_path, dpi=120)
    plt.close(fig)

    curves = report["abstention"]["curves"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, style) in (("raw", "-"), ("calibrated", "--")):
        coverage, risk = metrics.risk_coverage(curves[name], curves["correct"])
        ax.plot(coverage, risk, linestyle=style, label=f"{name} (AURC {metrics.aurc(curves[name], curves['correct']):.3f})")
    ax.set(xlabel="coverage", ylabel="risk", xlim=(0, 1), title="Abstention: answerable + unanswerable questions")
    ax.legend()
    fig.tight_layout()
    risk_path = out / "quality-risk-coverage.png"
    fig.savefig(risk_path, dpi=120)
    plt.close(fig)
    return [accuracy_path, risk_path]
