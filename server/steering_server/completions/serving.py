"""POST /v1/completions: prompts (text or token ids) to their policy, and the pieces back as
OpenAI's legacy completion or chunks, with vLLM's echo and prompt logprobs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence

from vllm.logprobs import Logprob

from steering.admission import PolicyRequest
from steering.kinds import Piece, Plan
from steering_server.completions.protocol import (
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
)
from steering_server.generation import GenerationServing
from steering_server.protocol import prompt_logprobs_body, trace_body


class CompletionServing(GenerationServing):
    endpoint = "completions"

    def policy_request(self, body: CompletionRequest) -> PolicyRequest:
        sampling = body.sampling()
        if body.echo and sampling["prompt_logprobs"] is None:
            sampling["prompt_logprobs"] = body.logprobs  # the echoed prompt's logprobs, as vLLM does
        scores_prompt = "echo" if body.echo else "prompt_logprobs" if body.prompt_logprobs is not None else None
        return PolicyRequest(body.model, body.prompts(), overrides=body.overrides(), sampling=sampling,
                             max_tokens=body.max_tokens, num_logprobs=body.num_logprobs, scores_prompt=scores_prompt,
                             constraint=body.constraint, collect=body.collect, trace=body.trace)

    def response(self, body: CompletionRequest, plan: Plan, pieces: list[Piece]) -> Completion:
        return Completion(model=plan.name, choices=[self._choice(body, plan, p, echo=body.echo) for p in pieces],
                          usage=self.usage(plan), steering=self.steering(plan))

    async def chunks(self, body: CompletionRequest, plan: Plan) -> AsyncIterator[CompletionChunk]:
        chunk_id = f"cmpl-{plan.request_id}"
        echoed: set[tuple[int, int]] = set()  # (prompt, choice): the prompt goes before its first piece
        prompt_logprobs: dict[int, list] = {}  # by prompt; with n > 1 they come with one choice's piece
        async for p in self.pieces(plan):
            if p.prompt_logprobs is not None:
                prompt_logprobs[p.prompt_index] = p.prompt_logprobs
            echo = body.echo and (p.prompt_index, p.index) not in echoed
            echoed.add((p.prompt_index, p.index))
            choice = self._choice(body, plan, p, echo=echo, prompt_logprobs=prompt_logprobs.get(p.prompt_index))
            yield CompletionChunk(id=chunk_id, created=plan.created, model=plan.name, choices=[choice],
                                  usage=self.chunk_usage(body, plan))
        yield CompletionChunk(id=chunk_id, created=plan.created, model=plan.name, choices=[],
                              usage=self.stream_usage(body, plan), steering=self.steering(plan))

    def _choice(self, body: CompletionRequest, plan: Plan, p: Piece, *, echo: bool = False,
                prompt_logprobs=None) -> CompletionChoice:
        """One choice's piece; with `echo`, the prompt (and its logprobs) goes first, as in vLLM."""
        prompt_logprobs = p.prompt_logprobs or prompt_logprobs
        text, token_ids, logprobs, trace = p.text, list(p.token_ids), p.logprobs, p.trace
        if body.max_tokens == 0:  # echo only: the one token generated is left out
            text, token_ids, logprobs = "", [], None if logprobs is None else []
            trace = None if trace is None else []
        decode = self.lifecycle.ready().engine.prompts.decode
        if echo:
            prompt = plan.prompts[p.prompt_index]
            given = body.prompts()[p.prompt_index]
            text = (given if isinstance(given, str) else decode(prompt)) + text
            token_ids = [*prompt, *token_ids]
            if logprobs is not None and prompt_logprobs is not None:  # None: only a trace read logprobs
                logprobs = [*prompt_logprobs, *logprobs]
        shown = None
        if plan.num_logprobs is not None and logprobs is not None:
            shown = completion_logprobs(token_ids, logprobs, plan.num_logprobs, decode=lambda token: decode([token]))
        return CompletionChoice(index=p.prompt_index * body.n + p.index, text=text, logprobs=shown,
                                finish_reason=p.finish_reason, stop_reason=p.stop_reason, trace=trace_body(trace),
                                prompt_logprobs=prompt_logprobs_body(prompt_logprobs)
                                if body.prompt_logprobs is not None and prompt_logprobs else None)


def completion_logprobs(
    token_ids: Sequence[int],
    logprobs: Sequence[Mapping[int, Logprob] | None],
    top: int,
    *,
    decode: Callable[[int], str],
    text_offset: int = 0,
) -> CompletionLogprobs:
    """Legacy completions logprobs: parallel lists of tokens, logprobs, top alternatives, offsets.
    An echoed prompt's first token has no logprob (null), and `decode` spells it."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, candidates in zip(token_ids, logprobs):
        if candidates is None:
            text, logprob, alternatives = decode(token_id), None, None
        else:
            chosen = candidates[token_id]
            text, logprob = chosen.decoded_token or "", chosen.logprob
            ranked = sorted(candidates.values(), key=lambda lp: lp.rank or 0)[:top]
            alternatives = {lp.decoded_token or "": lp.logprob for lp in ranked} if top else None
        tokens.append(text)
        token_logprobs.append(logprob)
        top_logprobs.append(alternatives)
        offsets.append(text_offset)
        text_offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top_logprobs,
                              text_offset=offsets)
