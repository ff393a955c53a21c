"""`steer demo run`: serve the demo family in the background and show what each policy does."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import httpx

from steering_tools.demo_family import read_questions
from steering_tools.server_process import ServerProcess, is_ready
from steering_tools.world import plain_question

READY_TIMEOUT_SECONDS = 900


def start_server(config: Path, port: int, log: Path) -> tuple[str, int | None]:
    """Reuse a ready server on the port, or start `steer serve` detached; wait until it is ready."""
    url = f"http://127.0.0.1:{port}"
    if is_ready(url):
        return url, None
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
    """A held-out question to the base and to the proxy-tuned policy, an abstention, a decision."""
    questions = family / "questions"
    held_out = read_questions(questions / "answerable-test.jsonl")
    strangers = read_questions(questions / "unanswerable-test.jsonl")
    verify = read_questions(questions / "verify-test.jsonl")[0]
    check = read_questions(questions / "check-test.jsonl")[0]  # the same question, asked by answering
    with httpx.Client(base_url=url, timeout=120) as http:
        print("\n== proxy-tuning: the base knows the facts, the small tuned pair knows the format")
        for row in held_out[:3]:
            question = plain_question(row["prompt"])
            print(f"Q: {question}   (expected: {row['answer']})")
            for policy in ("base", "chat"):
                answer = _ask(http, policy, question)["choices"][0]["message"]["content"]
                print(f"   {policy:5} -> {answer!r}")

        print("\n== abstention: the qa policy answers when its calibrated confidence is high enough")
        print("   (one answered and one abstained example, picked to show both; rates: steer bench quality)")
        for rows, wants_abstention in ((held_out, False), (strangers, True)):
            for row in rows[:20]:
                reply = _ask(http, "qa", plain_question(row["prompt"]))
                if reply["steering"]["abstained"] == wants_abstention:
                    break
            steering = reply["steering"]
            print(f"Q: {plain_question(row['prompt'])}   (expected: {row['answer'] or 'nobody knows: no such person'})")
            print(f"   qa    -> {reply['choices'][0]['message']['content']!r}  abstained={steering['abstained']} "
                  f"confidence={steering['confidence']:.3f} threshold={steering['abstention']['threshold']:.3f}")

        print("\n== decision: yes/no where a false yes costs 10 and a false no 1")
        reply = _ask(http, "verify", plain_question(verify["prompt"]))
        decision = reply["steering"]["decision"]
        print(f"Q: {plain_question(verify['prompt'])}   (truth: {verify['label'].strip()})")
        print(f"   calibrated p: { {k.strip(): round(v, 3) for k, v in decision['calibrated'].items()} }")
        print(f"   expected cost: { {k.strip(): round(v, 3) for k, v in decision['expected_costs'].items()} }")
        print(f"   verify -> {reply['choices'][0]['message']['content']!r}")

        print("\n== the same decision by answering: yes iff the answer to the open question is the claim")
        reply = _ask(http, "check", plain_question(check["prompt"]), claim=check["claim"])
        decision = reply["steering"]["decision"]
        print(f"Q: {plain_question(check['prompt'])}   claim: {check['claim'].strip()!r}   (truth: {check['label']})")
        print(f"   p(answer is the claim) = {math.exp(decision['claim_logprob']):.3f}; "
              f"calibrated p: { {k: round(v, 3) for k, v in decision['calibrated'].items()} }")
        print(f"   expected cost: { {k: round(v, 3) for k, v in decision['expected_costs'].items()} }")
        print(f"   check  -> {reply['choices'][0]['message']['content']!r}")


def run(family: Path, port: int) -> int:
    url, pid = start_server(family / "deploy.yaml", port, family / "server.log")
    show(url, family)
    print(f"\nThe server keeps running at {url} (policies: base, chat, qa, verify, check).")
    question = plain_question(read_questions(family / "questions" / "answerable-test.jsonl")[0]["prompt"])
    body = {"model": "chat", "messages": [{"role": "user", "content": question}], "max_tokens": 8}
    print(f"Try: curl -s {url}/v1/chat/completions -H 'content-type: application/json' -d '{json.dumps(body)}'")
    if pid is not None:
        print(f"Stop it with: kill {pid}")
    return 0
