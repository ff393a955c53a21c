"""`steer demo run`: serve the demo family in the background, show what each policy does, and
run the decision loop on it: a certified risk, outcomes fed back, the calibration series, a refit
from the feedback and its rollout.

The server runs a copy of the family's deployment (`<family>/live/`, remade whenever the demo
starts a server) with feedback on: refitting changes the copy, never the cached build.
"""

from __future__ import annotations

import json
import math
import secrets
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families
from steering_client import SteeringClient

from steering_tools.calibrate import is_correct
from steering_tools.demo_family import read_questions
from steering_tools.server_process import ServerProcess, is_ready
from steering_tools.world import plain_question

READY_TIMEOUT_SECONDS = 900
IN_FLIGHT = 8  # the feedback batch's requests at once
TRITON_NOTICE = "Triton is installed, but doesn't include CPU backend"  # torch's, on every CPU import


def live_deployment(family: Path) -> Path:
    """A fresh copy of the family's deploy.yaml in `<family>/live/`, taking feedback: models named
    by absolute path, calibrations copied beside it, a new feedback store and secret."""
    live = family / "live"
    shutil.rmtree(live, ignore_errors=True)
    (live / "calibration").mkdir(parents=True)
    config = yaml.safe_load((family / "deploy.yaml").read_text())
    config["base"] = str((family / config["base"]).resolve())
    for pair in config["experts"].values():
        pair.update({side: str((family / path).resolve()) for side, path in pair.items()})
    for policy in config["policies"].values():
        if "calibration" in policy:
            shutil.copy(family / policy["calibration"], live / policy["calibration"])
    # The secret signs feedback ids; a deployment keeps it in $STEER_FEEDBACK_SECRET (README).
    config["feedback"] = {"store": "feedback.sqlite", "secret": secrets.token_hex(16)}
    (live / "deploy.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return live / "deploy.yaml"


def start_server(config: Path, port: int, log: Path) -> tuple[str, int | None]:
    """Start `steer serve` detached and wait until it is ready."""
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "steering_cli", "serve", "--config", str(config), "--port", str(port)]
    server = ServerProcess.start(command, port=port, log=log, detach=True)
    print(f"starting steer serve (pid {server.process.pid}, log {log}); the engine takes a minute to load…",
          flush=True)
    server.wait_ready(READY_TIMEOUT_SECONDS)
    return url, server.process.pid


def _ask(http: httpx.Client, policy: str, question: str, **steering) -> dict:
    body = {"model": policy, "messages": [{"role": "user", "content": question}], "max_tokens": 8,
            "temperature": 0.0, "stop": ["\n"]}
    if steering:
        body["steering"] = steering
    response = http.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    return response.json()


def show(url: str, family: Path) -> None:
    """A held-out question to the base and to the proxy-tuned policy; the certified abstention; a
    decision asked by answering."""
    questions = family / "questions"
    held_out = read_questions(questions / "answerable-test.jsonl")
    strangers = read_questions(questions / "unanswerable-test.jsonl")
    check = read_questions(questions / "check-test.jsonl")[0]
    with httpx.Client(base_url=url, timeout=120) as http:
        print("\n== proxy-tuning: the base knows the facts, the small tuned pair knows the format")
        for row in held_out[:3]:
            question = plain_question(row["prompt"])
            print(f"Q: {question}   (expected: {row['answer']})")
            for policy in ("base", "chat"):
                answer = _ask(http, policy, question)["choices"][0]["message"]["content"]
                print(f"   {policy:5} -> {answer!r}")

        steering = _ask(http, "qa", plain_question(held_out[0]["prompt"]))["steering"]
        if certified := steering.get("certified"):
            print(f"\n== a stated risk: the qa policy answers only where at most {certified['epsilon']:.0%} of its "
                  f"answers are wrong,\n   certified with probability {1 - certified['delta']:.0%} on "
                  f"{certified['n']} held-out calibration questions: it answers at calibrated confidence >= "
                  f"{certified['threshold']:.3f}")
        else:  # a family too small to certify a risk (demo_family.QA_RISK_ROWS)
            print(f"\n== abstention: the qa policy answers at calibrated confidence >= "
                  f"{steering['abstention']['threshold']:.3f}, the threshold of least cost")
        print("   (one answered and one abstained example, picked to show both; rates: steer bench quality)")
        for rows, wants_abstention in ((held_out, False), (strangers, True)):
            for row in rows[:20]:
                reply = _ask(http, "qa", plain_question(row["prompt"]))
                if reply["steering"]["abstained"] == wants_abstention:
                    break
            steering = reply["steering"]
            print(f"Q: {plain_question(row['prompt'])}   (expected: {row['answer'] or 'nobody knows: no such person'})")
            print(f"   qa    -> {reply['choices'][0]['message']['content']!r}  abstained={steering['abstained']} "
                  f"confidence={steering['confidence']:.3f}")

        print("\n== a decision, asked by answering: yes iff the answer to the open question is the claim;")
        print("   a false yes costs 10, a false no 1. (Asked yes/no instead -- the verify policy -- this base")
        print("   stays at chance: it cannot learn yes/no verification, docs/benchmarks.md.)")
        reply = _ask(http, "check", plain_question(check["prompt"]), claim=check["claim"])
        decision = reply["steering"]["decision"]
        print(f"Q: {plain_question(check['prompt'])}   claim: {check['claim'].strip()!r}   (truth: {check['label']})")
        print(f"   p(answer is the claim) = {math.exp(decision['claim_logprob']):.3f}; "
              f"calibrated p: { {k: round(v, 3) for k, v in decision['calibrated'].items()} }")
        print(f"   expected cost: { {k: round(v, 3) for k, v in decision['expected_costs'].items()} }")
        print(f"   check  -> {reply['choices'][0]['message']['content']!r}")


def _judged(client: SteeringClient, row: dict) -> tuple[str, float, bool, bool]:
    """One qa answer with its outcome: the feedback id, its confidence, abstained, and whether the
    answer (given or withheld) was right. A withheld answer is read from the chat policy, which is
    qa's steering without the rule: greedy, the same alpha, the same words."""
    ask = {"messages": [{"role": "user", "content": plain_question(row["prompt"])}], "max_tokens": 8,
           "temperature": 0.0, "stop": ["\n"]}
    reply = client.chat.completions.create(model="qa", **ask)
    steering = reply.steering
    text = (client.chat.completions.create(model="chat", **ask) if steering.abstained else reply).choices[0]
    right = bool(row["answer"]) and is_correct(text.message.content, row["answer"])
    return steering.feedback_id, steering.confidence, steering.abstained, right


def _series(url: str, policy: str) -> dict:
    """The feedback series of `policy` from /metrics, and ECE and Brier computed from them as the
    PrometheusRule in deploy/ computes them."""
    bins: dict[str, dict[str, float]] = {}
    totals = {"brier": 0.0, "over_answering": 0.0, "over_abstaining": 0.0}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.labels.get("policy") != policy or not sample.name.endswith("_total"):
                continue
            name = sample.name.removeprefix("steer_feedback").removesuffix("_total").lstrip("_") or "outcomes"
            if "bin" in sample.labels:
                bins.setdefault(sample.labels["bin"], {})[name] = sample.value
            elif name in totals:
                totals[name] = sample.value
    outcomes = sum(row.get("outcomes", 0) for row in bins.values())
    ece = sum(abs(row.get("confidence", 0) - row.get("correct", 0)) for row in bins.values()) / outcomes \
        if outcomes else None
    return {"outcomes": outcomes, "ece": ece, "brier": totals["brier"] / outcomes if outcomes else None,
            "over_answering": totals["over_answering"], "over_abstaining": totals["over_abstaining"],
            "bins": dict(sorted(bins.items()))}


def _print_series(series: dict) -> None:
    if not series["outcomes"]:
        print("   no outcomes yet")
        return
    print(f"   outcomes {series['outcomes']:.0f}: ECE {series['ece']:.3f}, Brier {series['brier']:.3f}; answered and "
          f"wrong {series['over_answering']:.0f}, abstained though right {series['over_abstaining']:.0f}")
    print("   confidence bin   outcomes   mean confidence   right")
    for bin_, row in series["bins"].items():
        print(f"   {bin_:>14}   {row['outcomes']:8.0f}   {row['confidence'] / row['outcomes']:15.3f}   "
              f"{row['correct'] / row['outcomes']:5.3f}")


def feedback_loop(url: str, config: Path, family: Path) -> None:
    """Outcomes for a batch of qa answers, the series they move, a refit from them and its rollout."""
    rows = read_questions(family / "questions" / "qa-test.jsonl")
    print(f"\n== outcomes fed back: {len(rows)} questions about unseen people (and invented ones) to qa; each answer")
    print("   judged against the truth and sent with its feedback id (client.feedback.create)")
    print("   before:")
    _print_series(_series(url, "qa"))
    with SteeringClient(base_url=f"{url}/v1", api_key="unused", timeout=120) as client, \
            ThreadPoolExecutor(IN_FLIGHT) as pool:
        judged = list(pool.map(lambda row: _judged(client, row), rows))
        for feedback_id, _, _, right in judged:
            client.feedback.create(id=feedback_id, outcome="correct" if right else "incorrect")
    answered = [right for _, _, abstained, right in judged if not abstained]
    wrong = answered.count(False)
    print(f"   qa answered {len(answered)} of {len(rows)}; {wrong} of those wrong "
          f"({wrong / max(len(answered), 1):.1%})")
    print("   after (what Prometheus scrapes from every replica; deploy/kubernetes/monitoring charts ECE from it):")
    _print_series(_series(url, "qa"))

    store = config.parent / "feedback.sqlite"
    command = ["steer", "calibrate", "--config", str(config), "--policy", "qa", "--from-feedback", str(store),
               "--apply", "--url", f"{url}/v1"]
    print("\n== refit from the feedback, then roll it out (no restart):")
    print("   $ " + " ".join(command))
    done = subprocess.run([sys.executable, "-m", "steering_cli", *command[1:]], capture_output=True, text=True)
    said = [line for line in (done.stdout + done.stderr).strip().splitlines() if not line.startswith(TRITON_NOTICE)]
    print("\n".join("   " + line for line in said))
    if done.returncode:
        print("   (the refit was refused: the policy serves its earlier calibration)")
        return
    with httpx.Client(base_url=url, timeout=120) as http:
        steering = _ask(http, "qa", plain_question(rows[0]["prompt"]))["steering"]
    if certified := steering.get("certified"):
        print(f"   qa now certifies at most {certified['epsilon']:.0%} wrong on {certified['n']} outcomes held out of "
              f"the refit: it answers at calibrated confidence >= {certified['threshold']:.3f}")
    else:
        print(f"   qa now answers at calibrated confidence >= {steering['abstention']['threshold']:.3f}")


def run(family: Path, port: int) -> int:
    url = f"http://127.0.0.1:{port}"
    pid, config = None, family / "live" / "deploy.yaml"
    if not is_ready(url):
        config = live_deployment(family)
        url, pid = start_server(config, port, family / "server.log")
    show(url, family)
    if config.exists() and _takes_feedback(url):
        feedback_loop(url, config, family)
    else:
        print(f"\n(the server already running at {url} takes no feedback: stop it and rerun to see the loop)")
    print(f"\nThe server keeps running at {url} (policies: base, chat, qa, verify, check).")
    print(f"Playground: {url}/playground")
    question = plain_question(read_questions(family / "questions" / "answerable-test.jsonl")[0]["prompt"])
    body = {"model": "chat", "messages": [{"role": "user", "content": question}], "max_tokens": 8}
    print(f"Try: curl -s {url}/v1/chat/completions -H 'content-type: application/json' -d '{json.dumps(body)}'")
    if pid is not None:
        print(f"Stop it with: kill {pid}")
    return 0


def _takes_feedback(url: str) -> bool:
    with httpx.Client(base_url=url, timeout=120) as http:
        return "feedback_id" in _ask(http, "qa", "Where does anyone live?")["steering"]
