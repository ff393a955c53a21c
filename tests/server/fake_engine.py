"""A `SteeringEngine` whose vLLM and base tokenizer are fakes, so the app runs in-process in milliseconds.

Only vLLM's half is faked: the token stream (`generate`), the tokenizer and the chat renderer
(`chat_prompt`). What the server calls on top of it (`encode`, `check_request`, `complete`,
`label_logprobs`, the policies) is the real `SteeringEngine` and `Policies` code. The fake model, in full:

- a token is a character, its id the code point (below 0xD800); `encode` puts BOS (id 1) first.
- choice j answers ANSWER_LEN lower-case letters, letter k being `(sum(prompt) + 3k + j + shift) % 26`
  of the alphabet, with `shift = round(10 * sum((i + 1) * alpha_i))` over the pairs: steering shows.
- the k-th answer token has probability `token_prob(k)`; the top-N alternatives are upper-case letters.
- a request forced to one token by `allowed_token_ids` (decision labels) answers it, with probability
  `label_prob(token, alpha_row)`.
- every prompt token after the first has probability PROMPT_PROB (prompt logprobs, rank 1).
- a prompt with the BEL character (id 7) ends its answers with vLLM's finish_reason "error".
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Sequence

from vllm import SamplingParams
from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind

from steering.config import Deployment
from steering.engine import SteeringEngine
from steering.policy import Policies, Steering

BOS = 1
BEL = 7
ANSWER_LEN = 6
PROMPT_PROB = 0.5


def shift(alpha_row: Sequence[float]) -> int:
    return round(10 * sum((i + 1) * a for i, a in enumerate(alpha_row)))


def answer(prompt_ids: Sequence[int], alpha_row: Sequence[float], choice: int = 0) -> str:
    """The whole answer of `choice` (before any max_tokens cut)."""
    start = sum(prompt_ids) + choice + shift(alpha_row)
    return "".join(chr(ord("a") + (start + 3 * k) % 26) for k in range(ANSWER_LEN))


def token_prob(k: int) -> float:
    """Probability of the k-th answer token: 0.9, 0.45, 0.3, ..."""
    return 0.9 / (k + 1)


def label_prob(token: int, alpha_row: Sequence[float]) -> float:
    """Next-token probability of a label's first token: 0.1 to 0.4 (not a distribution over labels)."""
    return (1 + (token + shift(alpha_row)) % 4) / 10


class CharTokenizer:
    """Characters as tokens, with a one-line-per-message chat template."""

    chat_template = "{role}: {content}\n"  # `apply_chat_template` renders it

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [BOS] * add_special_tokens + [ord(c) for c in text]

    def apply_chat_template(self, messages, *, add_generation_prompt: bool, tokenize: bool, return_dict: bool):
        text = "".join(self.chat_template.format(**m) for m in messages)
        return self.encode(text + ("assistant: " if add_generation_prompt else ""))

    def __len__(self) -> int:
        return 0xD800  # the code points below the surrogates: every id decodes to valid text

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(chr(t) for t in token_ids if t != BOS)

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        return ["<s>" if t == BOS else chr(t) for t in token_ids]


class FakeEngine(SteeringEngine):
    """The real engine facade over the fake model; `SteeringEngine.__init__` would start vLLM."""

    def __init__(self, deployment: Deployment, *, max_model_len: int = 64):
        self.tokenizer = CharTokenizer()
        self.policies = Policies.build(deployment, self._encode_text)
        self.max_model_len = max_model_len
        self.logprobs_at_temperature_one = True
        self.prefix_cache_block = None  # no prefix cache: chosen-token requests run together
        self.running = 0
        self.is_shut_down = False

    async def generate(
        self, prompt: str | Sequence[int], params: SamplingParams, *, steering: Steering, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """vLLM's stream: one delta per token (all choices), or the final output alone."""
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        length = min(ANSWER_LEN, params.max_tokens)
        answers = [[ord(c) for c in answer(prompt_ids, steering.alpha_row, j)[:length]] for j in range(params.n)]
        if params.allowed_token_ids:  # a forced sample: the label's own step
            length, answers = 1, [params.allowed_token_ids[:1]] * params.n
        finish = "error" if BEL in prompt_ids else "length" if length < ANSWER_LEN else "stop"

        def output(start: int, stop: int) -> RequestOutput:
            done = stop == length
            choices = [_completion(j, ids[start:stop], start, params, steering, finish if done else None)
                       for j, ids in enumerate(answers)]
            prompt_logprobs = None
            if params.prompt_logprobs is not None and start == 0:  # sent once, with the first output
                prompt_logprobs = [None, *({t: Logprob(math.log(PROMPT_PROB), rank=1, decoded_token=chr(t))}
                                           for t in prompt_ids[1:])]
            return RequestOutput(request_id or "fake", None, prompt_ids, prompt_logprobs, choices, finished=done)

        self.running += 1
        try:
            if params.output_kind == RequestOutputKind.FINAL_ONLY:
                yield output(0, length)
            else:
                for k in range(length):
                    await asyncio.sleep(0)  # let the server interleave, as with a real engine
                    yield output(k, k + 1)
        finally:
            self.running -= 1

    def chat_prompt(self, messages, *, add_generation_prompt: bool = True, template_kwargs=None, tools=None) -> list[int]:
        """vLLM's renderer, faked: text parts joined by newlines, as vLLM joins them; the template's
        one variable, `persona`, is said first; tools are not shown to the fake model."""
        def text(content) -> str:  # a string, text parts, or none beside tool calls
            return content if isinstance(content, str) else "\n".join(p["text"] for p in content or ())

        flat = [{**m, "content": text(m.get("content"))} for m in messages]
        ids = self.tokenizer.apply_chat_template(flat, add_generation_prompt=add_generation_prompt, tokenize=True,
                                                 return_dict=False)
        persona = (template_kwargs or {}).get("persona")
        return [*ids[:1], *self.tokenizer.encode(f"{persona}\n", add_special_tokens=False), *ids[1:]] if persona else ids

    chat_template_variables = frozenset({"messages", "add_generation_prompt", "persona"})

    def verify(self, params: SamplingParams) -> None:
        """There is no vLLM configuration to check against: what it refuses is tested live."""

    @property
    def num_unfinished_requests(self) -> int:
        return self.running

    errored = False  # a test sets it: vLLM's engine core has died

    def shutdown(self) -> None:
        self.is_shut_down = True


def _completion(index: int, token_ids: list[int], start: int, params: SamplingParams, steering: Steering,
                finish: str | None) -> CompletionOutput:
    wants_logprobs = params.logprobs is not None
    logprobs = [_step(t, start + i, params, steering) for i, t in enumerate(token_ids)] if wants_logprobs else None
    return CompletionOutput(index, "".join(map(chr, token_ids)), token_ids, None, logprobs, finish_reason=finish)


def _step(token: int, k: int, params: SamplingParams, steering: Steering) -> dict[int, Logprob]:
    """One position's logprobs: the chosen token (rank 1), or a forced label, and top-N alternatives."""
    p = label_prob(token, steering.alpha_row) if params.allowed_token_ids else token_prob(k)
    step = {token: Logprob(math.log(p), rank=1, decoded_token=chr(token))}
    for rank in range(2, (params.logprobs or 0) + 1):
        step[ord("A") + rank] = Logprob(math.log((1 - p) / 20), rank=rank, decoded_token=chr(ord("A") + rank))
    return step
