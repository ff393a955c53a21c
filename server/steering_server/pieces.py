"""What the policy kinds hand the endpoint services: answer pieces, and the outcome they add up to."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vllm.logprobs import Logprob

from steering_server.protocol import SteeringInfo


@dataclass
class Piece:
    """Part of one choice's answer: a streamed delta, or the whole answer."""

    prompt_index: int
    index: int
    text: str
    token_ids: Sequence[int] = ()
    logprobs: Sequence[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    prompt_logprobs: Sequence[dict[int, Logprob] | None] | None = None  # on a prompt's first piece, if asked


@dataclass
class Outcome:
    """The steering block and token count, complete once the answer is."""

    steering: SteeringInfo
    completion_tokens: int = 0


def joined(pieces: list[Piece]) -> list[Piece]:
    """Deltas merged into one whole piece per (prompt, choice), in choice order."""
    whole: dict[tuple[int, int], Piece] = {}
    for p in pieces:
        key = (p.prompt_index, p.index)
        if key not in whole:
            whole[key] = Piece(p.prompt_index, p.index, "", [], [] if p.logprobs is not None else None)
        w = whole[key]
        w.text += p.text
        w.token_ids = [*w.token_ids, *p.token_ids]
        if p.logprobs is not None and w.logprobs is not None:
            w.logprobs = [*w.logprobs, *p.logprobs]
        w.finish_reason = p.finish_reason or w.finish_reason
        w.prompt_logprobs = w.prompt_logprobs or p.prompt_logprobs
    return [whole[key] for key in sorted(whole)]
