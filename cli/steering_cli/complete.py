"""`steer complete`: one prompt under one or more policies, as the server answers it: each policy
admitted and run by its kind, so a decision policy decides and an abstention policy may abstain."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from steering_cli.arguments import alpha_override

# What `steer complete` calls the request fields it sets, for its errors.
FLAGS = {"steering.alpha": "--alpha", "steering.claim": "--claim"}


def add_to(commands) -> None:
    complete = commands.add_parser("complete", help="answer one prompt under one or more policies, as the server "
                                   "would: decision policies decide, abstention policies may abstain")
    complete.add_argument("--config", required=True, type=Path, help="deployment YAML")
    complete.add_argument("--policy", action="append", required=True,
                          help="policy name; repeat to compare policies on one engine")
    complete.add_argument("--alpha", action="append", type=alpha_override, default=[], metavar="PAIR=VALUE",
                          help="override a pair's alpha (within the policy's max_alpha)")
    complete.add_argument("--max-tokens", type=int, default=32)
    complete.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    complete.add_argument("--seed", type=int, default=None)
    complete.add_argument("--chat", action="store_true", help="send PROMPT as a user message")
    complete.add_argument("--claim", help="claim-check policies: the answer to PROMPT to check "
                          "(mind the leading space)")
    complete.add_argument("--json", action="store_true", help="print one JSON object per policy")
    complete.add_argument("prompt")
    complete.set_defaults(handler=lambda args: asyncio.run(run(args)))


async def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from steering.admission import Admission, PolicyRequest
    from steering.config import load_deployment
    from steering.engine import SteeringEngine
    from steering.kinds import answer
    from steering.policy import Overrides, Policies
    from steering.prompts import Conversation

    deployment = load_deployment(args.config)
    overrides = Overrides(alpha=dict(args.alpha) or None, claim=args.claim)
    tokenizer = AutoTokenizer.from_pretrained(deployment.base)
    policies = Policies.build(deployment, lambda text: tokenizer.encode(text, add_special_tokens=False))
    for name in args.policy:  # refused before an engine starts, naming the flag
        _named_by_flag(lambda: policies[name].resolve(overrides))
    prompt = Conversation([{"role": "user", "content": args.prompt}]) if args.chat else [args.prompt]
    sampling = {"temperature": args.temperature, "seed": args.seed}
    engine = SteeringEngine.start(deployment)
    try:
        admission = Admission(engine)
        for name in args.policy:
            plan = admission.admit(PolicyRequest(name, prompt, overrides=overrides, sampling=sampling,
                                                 max_tokens=args.max_tokens))
            (piece,), outcome = await answer(engine, plan)
            report = outcome.report()
            if args.json:
                print(json.dumps({"policy": name, "alpha": outcome.alpha, "text": piece.text,
                                  "token_ids": list(piece.token_ids), "prompt_token_ids": list(plan.prompts[0]),
                                  "finish_reason": piece.finish_reason,
                                  "steering": {key: value for key, value in report.items() if value is not None}}))
            else:
                shown = ", ".join(f"{pair}={value:g}" for pair, value in outcome.alpha.items()) or "unsteered"
                print(f"[{name}: {shown}]\n{piece.text}\n{judgement(report)}")
    finally:
        engine.shutdown()
    return 0


def _named_by_flag(resolve) -> None:
    from steering.errors import RequestError

    try:
        resolve()
    except RequestError as error:
        flag = next((flag for field, flag in FLAGS.items() if (error.param or "").startswith(field)), None)
        raise RequestError(f"{error} ({flag})" if flag else str(error), param=error.param) from None


def judgement(report: dict) -> str:
    """What a decision or abstention policy decided, and on what, in a line (blank for plain policies)."""
    if report["decision"] is not None:
        decision = report["decision"]
        calibrated = ", ".join(f"{label!r} {p:.3f}" for label, p in decision["calibrated"].items())
        costs = ", ".join(f"{action!r} {cost:.3f}" for action, cost in decision["expected_costs"].items())
        return f"(decided {decision['action']!r}: p {calibrated}; expected costs {costs})\n"
    if report["abstention"] is not None:
        abstention = report["abstention"]
        verdict = "abstained" if report["abstained"] else "answered"
        return (f"({verdict}: {abstention['score']} {abstention['raw']:.3f}, calibrated "
                f"{abstention['confidence']:.3f}, threshold {abstention['threshold']:.3f})\n")
    return ""
