"""A `SteeringEngine` over a fake vLLM client and base tokenizer, so the app runs in-process in milliseconds.

Only vLLM's half is faked: its client (`FakeLLM`: the token stream, the renderer, the configs its
parameter checks read) and the tokenizer. The engine is built through `SteeringEngine`'s own
constructor, so everything of ours on top of it (admission, the policy kinds, scoring, claim
checks, vLLM's own checks of sampling parameters) runs for real. The fake model, in full:

- a token is a character, its id the code point (below 0xD800); `encode` puts BOS (id 1) first.
- choice j answers ANSWER_LEN lower-case letters, letter k being `(sum(prompt) + 3k + j + shift) % 26`
  of the alphabet, with `shift = round(10 * sum((i + 1) * alpha_i))` over the pairs: steering shows.
- the k-th answer token has probability `token_prob(k)`; the top-N alternatives are upper-case letters.
- a request forced to one token by `allowed_token_ids` (decision labels, a claim's end) answers it,
  with probability `label_prob(token, alpha_row)`; ETX (id 3) is the end of text.
- every prompt token after the first has probability PROMPT_PROB (prompt logprobs, rank 1); under a
  trace's view v (0 the base, 1 + 2 * pair + untuned an expert), `view_prob(v)`, and the base's own
  likeliest token is FLIP (probability FLIP_PROB) where the token's id is even.
- a prompt with the BEL character (id 7) ends its answers with vLLM's finish_reason "error".
- the chat template is a real Jinja template: `role: content` a line, the template variable
  `persona` said first; vLLM's renderer joins text parts with newlines, and tools are not shown.
  `enable_thinking` (as Qwen3's templates take it) opens the answer's thinking, `<think>`, or
  closes it at once where false, `<think></think>`: each marker one token (THINK, END_THINK), as
  vLLM's reasoning parsers (qwen3, deepseek_r1) want them. A prompt that leaves a thinking open
  thinks THOUGHT letters, then ends it: the answer's token THOUGHT is END_THINK instead of a letter.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import jinja2
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind

from steering.config import Deployment
from steering.engine import SteeringEngine
from steering.steer import ALPHA_KEY, VIEW_KEY

BOS = 1
EOS = 3
BEL = 7
ANSWER_LEN = 6
THINK, END_THINK = 0xD7FE, 0xD7FF  # the last code points before the surrogates: no test types them
MARKERS = {"<think>": THINK, "</think>": END_THINK}
THOUGHT = 2  # the letters a thinking answer thinks before its END_THINK
PROMPT_PROB = 0.5
FLIP, FLIP_PROB = ord("?"), 0.6


def shift(alpha_row: Sequence[float]) -> int:
    return round(10 * sum((i + 1) * a for i, a in enumerate(alpha_row)))


def answer(prompt_ids: Sequence[int], alpha_row: Sequence[float], choice: int = 0) -> str:
    """The whole answer of `choice` (before any max_tokens cut)."""
    start = sum(prompt_ids) + choice + shift(alpha_row)
    return "".join(chr(ord("a") + (start + 3 * k) % 26) for k in range(ANSWER_LEN))


def thinks(prompt_ids: Sequence[int]) -> bool:
    """Whether the prompt leaves a thinking open (its last marker is THINK)."""
    markers = [t for t in prompt_ids if t in (THINK, END_THINK)]
    return bool(markers) and markers[-1] == THINK


def answer_ids(prompt_ids: Sequence[int], alpha_row: Sequence[float], choice: int = 0) -> list[int]:
    """The whole answer's token ids: `answer`'s letters, with END_THINK at THOUGHT where the prompt thinks."""
    ids = [ord(c) for c in answer(prompt_ids, alpha_row, choice)]
    if thinks(prompt_ids):
        ids[THOUGHT] = END_THINK
    return ids


def piece(token: int) -> str:
    """A token's text: its character, or a marker's text."""
    return next((text for text, marker in MARKERS.items() if marker == token), chr(token))


def decode(token_ids: Sequence[int]) -> str:
    return "".join(piece(t) for t in token_ids if t != BOS)


def token_prob(k: int) -> float:
    """Probability of the k-th answer token: 0.9, 0.45, 0.3, ..."""
    return 0.9 / (k + 1)


def view_prob(view: int) -> float:
    """A prompt token's probability under a trace's view: 0.5 for the base, 0.25, 0.1667, ... for experts."""
    return PROMPT_PROB / (1 + view)


def _prompt_step(token: int, view: int | None) -> dict[int, Logprob]:
    if view is None:
        return {token: Logprob(math.log(PROMPT_PROB), rank=1, decoded_token=piece(token))}
    flips = view == 0 and token % 2 == 0 and token != FLIP
    step = {token: Logprob(math.log(view_prob(view)), rank=2 if flips else 1, decoded_token=piece(token))}
    return {FLIP: Logprob(math.log(FLIP_PROB), rank=1, decoded_token=chr(FLIP)), **step} if flips else step


def label_prob(token: int, alpha_row: Sequence[float]) -> float:
    """Next-token probability of a label's first token: 0.1 to 0.4 (not a distribution over labels)."""
    return (1 + (token + shift(alpha_row)) % 4) / 10


class CharTokenizer:
    """Characters as tokens, with a one-line-per-message chat template."""

    chat_template = ("{% if persona %}{{ persona }}\n{% endif %}{% for m in messages %}{{ m['role'] }}: "
                     "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: "
                     "{% if enable_thinking is defined %}<think>{% if not enable_thinking %}</think>{% endif %}"
                     "{% endif %}{% endif %}")
    eos_token_id = EOS

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        parts = re.split("(</?think>)", text)
        return [BOS] * add_special_tokens + [i for part in parts for i in ([MARKERS[part]] if part in MARKERS
                                                                            else map(ord, part))]

    def apply_chat_template(self, messages, *, add_generation_prompt: bool, tokenize: bool = True,
                            return_dict: bool = False, **variables):
        template = jinja2.Environment().from_string(self.chat_template)
        text = template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        return self.encode(text) if tokenize else text

    def __len__(self) -> int:
        return 0xD800  # the code points below the surrogates: every id decodes to valid text

    def decode(self, token_ids: Sequence[int], **options) -> str:
        return decode(token_ids)

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        return ["<s>" if t == BOS else piece(t) for t in token_ids]

    def get_vocab(self) -> dict[str, int]:
        """What vLLM's reasoning parsers look up: their markers' ids."""
        return dict(MARKERS)


@dataclass(frozen=True)
class TokenizeParams:
    max_total_tokens: int | None = None


class FakeRenderer:
    """vLLM's renderer: conversations through the tokenizer's chat template; token prompts as they are."""

    default_chat_tok_params = TokenizeParams()

    def __init__(self, tokenizer: CharTokenizer):
        self.tokenizer = tokenizer

    def render_chat(self, conversations, params, tok_params):
        (messages,) = conversations
        flat = [{**m, "content": _text(m.get("content"))} for m in messages]
        variables = {key: value for key, value in params.chat_template_kwargs.items() if key != "tools"}
        return None, [{"prompt_token_ids": self.tokenizer.apply_chat_template(flat, **variables)}]

    def render_cmpl(self, prompts):
        return list(prompts)

    def validate_token_ids(self, token_ids, *, parameter=None):
        """vLLM's check, over the fake's vocabulary (code points below 0xD800)."""
        for token in token_ids:
            if not 0 <= token < len(self.tokenizer):
                raise VLLMValidationError(f"Token id {token} is out of vocabulary", parameter=parameter)


def _text(content) -> str:
    """A message's content: a string, text parts (joined by newlines, as vLLM joins them), or none."""
    return content if isinstance(content, str) else "\n".join(p["text"] for p in content or ())


class FakeLLM:
    """vLLM's `AsyncLLM` as the engine uses it, over the fake model."""

    def __init__(self, max_model_len: int):
        self.tokenizer = CharTokenizer()
        self.renderer = FakeRenderer(self.tokenizer)
        self.model_config = SimpleNamespace(
            max_model_len=max_model_len, logprobs_mode="raw_logprobs", is_encoder_decoder=False, is_diffusion=False,
            max_logprobs=20, get_vocab_size=lambda: len(self.tokenizer), try_get_generation_config=lambda: {})
        # No prefix cache: chosen-token requests run together; no grammar backend: constraints pass as sent.
        self.vllm_config = SimpleNamespace(model_config=self.model_config, speculative_config=None,
                                           structured_outputs_config=None,
                                           cache_config=SimpleNamespace(block_size=16, enable_prefix_caching=False))
        self.running = 0
        self.hints: dict = {}  # what the last request told of a reasoning base's grammar start
        self.errored = False  # a test sets it: vLLM's engine core has died
        self.is_shut_down = False

    async def generate(self, engine_input, params: SamplingParams, request_id: str,
                       **reasoning) -> AsyncIterator[RequestOutput]:
        """vLLM's stream: one delta per token (all choices), or the final output alone. (`reasoning`,
        where a grammar starts, means nothing to a fake without grammars; `hints` keeps it.)"""
        self.hints = reasoning
        prompt_ids = list(engine_input["prompt_token_ids"])
        alpha_row = params.extra_args[ALPHA_KEY]
        length = min(ANSWER_LEN, params.max_tokens)
        answers = [answer_ids(prompt_ids, alpha_row, j)[:length] for j in range(params.n)]
        if params.allowed_token_ids:  # a forced sample: the label's own step
            length, answers = 1, [params.allowed_token_ids[:1]] * params.n
        finish = "error" if BEL in prompt_ids else "length" if length < ANSWER_LEN else "stop"

        def output(start: int, stop: int) -> RequestOutput:
            done = stop == length
            choices = [_completion(j, ids[start:stop], start, params, alpha_row, finish if done else None)
                       for j, ids in enumerate(answers)]
            prompt_logprobs = None
            if params.prompt_logprobs is not None and start == 0:  # sent once, with the first output
                view = params.extra_args.get(VIEW_KEY)
                prompt_logprobs = [None, *(_prompt_step(t, view) for t in prompt_ids[1:])]
            return RequestOutput(request_id, None, prompt_ids, prompt_logprobs, choices, finished=done)

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

    async def abort(self, request_id: str) -> None:
        pass

    def get_num_unfinished_requests(self) -> int:
        return self.running

    def shutdown(self) -> None:
        self.is_shut_down = True


class FakeEngine(SteeringEngine):
    """The real engine facade, through its own constructor, over the fake vLLM client."""

    def __init__(self, deployment: Deployment, *, max_model_len: int = 64):
        llm = FakeLLM(max_model_len)
        super().__init__(llm, llm.tokenizer, deployment)


def _completion(index: int, token_ids: list[int], start: int, params: SamplingParams, alpha_row: Sequence[float],
                finish: str | None) -> CompletionOutput:
    wants_logprobs = params.logprobs is not None
    logprobs = [_step(t, start + i, params, alpha_row) for i, t in enumerate(token_ids)] if wants_logprobs else None
    return CompletionOutput(index, decode(token_ids), token_ids, None, logprobs, finish_reason=finish)


def _step(token: int, k: int, params: SamplingParams, alpha_row: Sequence[float]) -> dict[int, Logprob]:
    """One position's logprobs: the chosen token (rank 1), or a forced label, and top-N alternatives."""
    p = label_prob(token, alpha_row) if params.allowed_token_ids else token_prob(k)
    step = {token: Logprob(math.log(p), rank=1, decoded_token=piece(token))}
    for rank in range(2, (params.logprobs or 0) + 1):
        step[ord("A") + rank] = Logprob(math.log((1 - p) / 20), rank=rank, decoded_token=chr(ord("A") + rank))
    return step
