"""`steer bench quality`, the stated risk: does a certified threshold keep it on rows it never saw?

The `qa` policy states a risk (at most epsilon wrong among the answers given, with probability at
least 1 - delta over the calibration rows). Over many random splits of the family's labelled
answers into a calibration half and a test half, each split is calibrated as `steer calibrate`
calibrates (the score's fit and Platt map on one part of the calibration half, the threshold
certified on the other) and judged on its test half. The guarantee holds if the share of splits
whose test risk exceeds epsilon is at most delta, within sampling error: a one-sided binomial test
of that share against delta. What certifying costs is the coverage given up against the threshold
of least cost that the same calibration fits.

The test half is finite, so its risk is a noisy reading of the true one: a threshold whose true
risk sits just under epsilon exceeds it on about half the test halves. The share is therefore an
upper reading of how often the guarantee fails.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest

from steering.config import PolicyConfig
from steering.errors import ConfigError
from steering.rules.calibration import platt
from steering_tools.calibrate import Answer, fit_abstention, raw_scores, split

SPLITS = 500
FIT_FRACTION = 0.5  # of the calibration half, as `steer calibrate` splits by default
SIGNIFICANCE = 0.05  # the binomial test's level: "within sampling error"


def guarantee(name: str, config: PolicyConfig, answers: list[Answer], correct: np.ndarray, *,
              splits: int = SPLITS, seed: int = 0) -> dict:
    """The stated risk checked on `splits` random calibration/test splits of the answers."""
    risk = config.abstain.risk
    rng = np.random.default_rng(seed)
    test_risks, certified, fitted, refused = [], [], [], 0
    for number in range(splits):
        order = rng.permutation(len(answers))
        half = len(order) // 2
        calibration_rows, test_rows = order[:half], order[half:]
        fit, held = split(half, FIT_FRACTION, seed=number)
        try:
            calibration, report, _ = fit_abstention(
                name, config, [answers[i] for i in calibration_rows], correct[calibration_rows], fit, held, bins=10)
        except ConfigError:  # no threshold certifies epsilon on this calibration half
            refused += 1
            continue
        scores = raw_scores(config.abstain.score, [answers[i] for i in test_rows], calibration.weights)
        confidence = platt(scores, calibration.platt_a, calibration.platt_b)
        truth = correct[test_rows] > 0
        answered = confidence >= calibration.threshold
        test_risks.append(float(np.mean(~truth[answered])) if answered.any() else 0.0)
        certified.append(float(answered.mean()))
        fitted.append(float(np.mean(confidence >= report["threshold"])))  # the cost-fitted threshold's
    judged = len(test_risks)
    exceeded = int(np.sum(np.asarray(test_risks) > risk.epsilon))
    p_value = binomtest(exceeded, judged, risk.delta, alternative="greater").pvalue if judged else None
    certified, fitted = np.asarray(certified), np.asarray(fitted)
    return {
        "epsilon": risk.epsilon, "delta": risk.delta, "rows": len(answers), "splits": splits,
        "refused": refused, "judged": judged, "exceeded": exceeded,
        "exceeded_share": exceeded / judged if judged else None,
        "p_value": p_value,  # of a share this high, were the true share delta
        "holds": None if p_value is None else bool(p_value >= SIGNIFICANCE),
        "test_risk": _quantiles(test_risks),
        "coverage": {"certified": _quantiles(certified), "cost_fitted": _quantiles(fitted),
                     "given_up": float(np.mean(fitted - certified)) if judged else None},
        "test_risks": test_risks, "certified_coverages": certified.tolist(), "fitted_coverages": fitted.tolist(),
    }


def _quantiles(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return {"mean": None, "median": None, "p90": None}
    return {"mean": float(values.mean()), "median": float(np.median(values)), "p90": float(np.quantile(values, 0.9))}


def summary_lines(report: dict, fmt) -> list[str]:
    """The guarantee's lines in the benchmark's summary (`fmt` formats one figure or its spread)."""
    return [
        f"stated risk (qa: at most {fmt(report['epsilon'], '.2f')} wrong among answers, delta "
        f"{fmt(report['delta'], '.2f')}) on {fmt(report['splits'], '.0f')} random calibration/test splits of "
        f"{fmt(report['rows'], '.0f')} answers:",
        f"  refused (nothing certifies) {fmt(report['refused'], '.0f')}; test risk above epsilon in "
        f"{fmt(report['exceeded_share'])} of the rest (binomial p {fmt(report['p_value'])}); "
        f"test risk median {fmt(report['test_risk']['median'])}, p90 {fmt(report['test_risk']['p90'])}",
        f"  coverage: certified {fmt(report['coverage']['certified']['mean'])}, cost-fitted "
        f"{fmt(report['coverage']['cost_fitted']['mean'])}; given up {fmt(report['coverage']['given_up'])}",
    ]


def plot(plt, runs: list[dict], seeds: list):
    """Per seed: the test risks over the splits against epsilon, and the coverage each threshold keeps."""
    names = [f"seed {seed}" if seed is not None else "this family" for seed in seeds]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    epsilon = runs[0]["epsilon"]
    bins = np.linspace(0, max(2 * epsilon, max((max(r["test_risks"], default=0) for r in runs), default=0)), 30)
    for i, (run_, name) in enumerate(zip(runs, names)):
        label = f"{name}: above epsilon in {run_['exceeded_share'] or 0:.3f} (delta {run_['delta']})"
        left.hist(run_["test_risks"], bins=bins, histtype="step", color=f"C{i}", label=label)
    left.axvline(epsilon, color="black", linestyle="--", label=f"epsilon {epsilon}")
    left.set(xlabel="test risk (wrong among answered)", ylabel="splits",
             title=f"Certified threshold on unseen rows ({runs[0]['splits']} splits per seed)")
    left.legend(fontsize=7)
    positions = np.arange(len(runs))
    for offset, key, color, name in ((-0.2, "fitted_coverages", "grey", "cost-fitted threshold"),
                                     (0.2, "certified_coverages", "tab:green", "certified threshold")):
        right.boxplot([r[key] for r in runs], positions=positions + offset, widths=0.35, patch_artist=True,
                      boxprops={"facecolor": color, "alpha": 0.6}, medianprops={"color": "black"})
        right.plot([], [], color=color, linewidth=8, alpha=0.6, label=name)
    right.set_xticks(positions, names)
    right.set(ylabel="coverage on the test half (share answered)", ylim=(0, 1), title="What certifying costs")
    right.legend(fontsize=8)
    return fig
