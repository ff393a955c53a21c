"""Log-probabilities the policy kinds score with: of chosen next tokens, of labels, of a claim, and
of an answer's first step as the base alone sees it. All of the steered distribution at
temperature 1 (the V1 runner's raw logprobs), or of the base alone under an all-zero alpha row.

A chosen token is scored by a single-token request forced to it (`allowed_token_ids`): the
sampler reports a sampled token's logprob from the steered logits, before any mask. Not by
`logprob_token_ids`, which vLLM 0.32's V1 sampler applies to every request of the step, erasing
the others' top logprobs.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

import numpy as np
from vllm import SamplingParams
from vllm.outputs import RequestOutput

from steering.engine import SteeringEngine
from steering.rules.abstention import FirstStep
from steering.rules.decisions import claim_label_logprobs


def answer_logprobs(token_ids: Sequence[int], logprobs: Sequence[Mapping[int, Any]] | None) -> list[float]:
    """The steered log-probability of each generated token (the request must ask for logprobs)."""
    return [step[token].logprob for step, token in zip(logprobs or (), token_ids)]


async def next_token_logprobs(
    engine: SteeringEngine,
    prompt: Sequence[int],
    tokens: Sequence[int],
    alpha_row: Sequence[float],
    *,
    prompt_logprobs: bool = False,
    request_id: str | None = None,
) -> tuple[dict[int, float], RequestOutput]:
    """Log-probabilities of each of `tokens` next after `prompt`, and the first request's output
    (with the prompt's logprobs if `prompt_logprobs`). Where the prefix cache can keep part of the
    prompt (`caches_prompt`), the first request runs alone and the rest read it from there; else
    all run together, in one step."""
    tokens = list(dict.fromkeys(tokens))
    request_id = request_id or uuid.uuid4().hex

    def ask(i: int) -> Awaitable[RequestOutput]:
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=0, allowed_token_ids=[tokens[i]],
                                ignore_eos=True, prompt_logprobs=0 if prompt_logprobs and i == 0 else None)
        return engine.complete(prompt, params, alpha_row=alpha_row,
                               request_id=f"{request_id}-{i}" if i else request_id)

    if engine.caches_prompt(len(prompt)):
        outputs = [await ask(0), *await asyncio.gather(*map(ask, range(1, len(tokens))))]
    else:
        outputs = await asyncio.gather(*map(ask, range(len(tokens))))
    found = {token: output.outputs[0].logprobs[0][token].logprob for token, output in zip(tokens, outputs)}
    return found, outputs[0]


async def decision_logprobs(engine: SteeringEngine, prompt: Sequence[int], label_token_ids: Sequence[int],
                            claim: Sequence[int], alpha_row: Sequence[float], *,
                            request_id: str | None = None) -> tuple[list[float], float | None]:
    """Each label's log-probability, in label order: its first token's, next. For a claim check (no
    label tokens), [log p, log(1 - p)], p the probability that the answer is exactly the claim: its
    tokens (the prompt logprobs of prompt + claim), then one of the tokens that end an answer
    (one single-token request per end token). And the claim's log p (None without a claim)."""
    checks_claim = not label_token_ids
    asked, tokens = ([*prompt, *claim], engine.end_token_ids) if checks_claim else (prompt, label_token_ids)
    found, first = await next_token_logprobs(engine, asked, tokens, alpha_row, prompt_logprobs=checks_claim,
                                             request_id=request_id)
    if not checks_claim:
        return [found[token] for token in label_token_ids], None
    said = sum(entry[token].logprob for entry, token in zip(first.prompt_logprobs[len(prompt):], claim))
    said += float(np.logaddexp.reduce(list(found.values())))
    return claim_label_logprobs(said), said


async def first_step(engine: SteeringEngine, prompt: Sequence[int], token_ids: Sequence[int],
                     logprobs: Sequence[Mapping[int, Any]], *, num_pairs: int, familiarity: bool = False,
                     thought: Sequence[int] = ()) -> FirstStep | None:
    """An answer's first step as the steered distribution (the answer's own logprobs) and the base
    alone see it, and with `familiarity` the base alone's prompt logprobs; None for an empty
    answer. Single-token requests with every alpha 0, so the steered sum is exactly the base's
    logits: one per token of the steered step. A reasoning base's `thought` (its thinking, up to
    the final answer) is read by the base as context, and is not part of the prompt familiarity reads."""
    if not token_ids:
        return None
    steered = {token: entry.logprob for token, entry in logprobs[0].items()}
    base, first = await next_token_logprobs(engine, [*prompt, *thought], list(steered), (0.0,) * num_pairs,
                                            prompt_logprobs=familiarity)
    known = None
    if familiarity:  # entry 0 is None: the first token has no context
        steps = zip(first.prompt_logprobs[1:len(prompt)], first.prompt_token_ids[1:len(prompt)])
        known = [entry[token].logprob for entry, token in steps]
    return FirstStep(token_ids[0], steered, {token: base[token] for token in steered}, known)
