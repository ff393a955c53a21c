"""A base that thinks before it answers, through vLLM's own reasoning parsers (`vllm serve --reasoning-parser`).

Such a base writes its thinking between markers its parser knows (`<think>…</think>` for qwen3
and deepseek_r1), then its final answer. The deployment's `reasoning_parser` names vLLM's parser:
checked against the base's tokenizer before an engine starts, and given to the engine too, so that
a format constraint holds the final answer and leaves the thinking free, as under `vllm serve`.
The chat door shows the thinking as `reasoning` (`steering.parsing`). The policies judge the final
answer: an abstention scores the tokens after the thinking (`FinalAnswer`), and a decision, which
scores its labels as the answer's first token, is taken only where the prompt has ended the thinking.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.reasoning import ReasoningParser, ReasoningParserManager

from steering.errors import ConfigError

if TYPE_CHECKING:  # the config's checks call this module
    from steering.config import Deployment


def reasoning_parser_class(deployment: Deployment, tokenizer) -> type[ReasoningParser] | None:
    """vLLM's parser for the deployment's `reasoning_parser`, checked against the base's tokenizer
    (its markers must be tokens of it): before an engine starts, once."""
    name = deployment.reasoning_parser
    if name is None:
        return None
    parser_class = ReasoningParserManager.get_reasoning_parser(name)
    try:
        parser_class(tokenizer)
    except Exception as error:  # vLLM's parsers look their markers up in the vocabulary as they are built
        raise ConfigError("reasoning_parser",
                          f"vLLM's {name} parser cannot read this base's answers: {error}") from None
    return parser_class


@dataclass(frozen=True)
class Thinking:
    """One request's answers as its base thinks them: the deployment's reasoning parser, built as
    vLLM builds it for a request, with the chat template's variables (which may turn thinking off)."""

    parser_class: type[ReasoningParser]
    tokenizer: Any
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def parser(self) -> ReasoningParser:
        """A fresh parser (some keep state as they read)."""
        return self.parser_class(self.tokenizer, chat_template_kwargs=dict(self.template_kwargs))

    def ended_by(self, prompt: Sequence[int]) -> bool:
        """Whether the prompt has ended the thinking, so the answer's first token is the final answer's."""
        return self.parser().is_reasoning_end(list(prompt))

    def engine_hints(self, prompt: Sequence[int]) -> dict[str, Any]:
        """What vLLM's chat serving tells the engine of such a request (`AsyncLLM.generate`'s
        `reasoning_ended`, `reasoning_parser_kwargs`), so that its grammar starts where vLLM's would."""
        return {"reasoning_ended": self.ended_by(prompt),
                "reasoning_parser_kwargs": {"chat_template_kwargs": dict(self.template_kwargs)}}

    def final_answer(self, prompt: Sequence[int]) -> FinalAnswer:
        return FinalAnswer(self.parser(), prompt)


class FinalAnswer:
    """Where an answer's final answer begins, read as its tokens arrive, the way vLLM's structured
    output gate reads it: right after the token that ends the thinking, or at once where the prompt
    ended it."""

    def __init__(self, parser: ReasoningParser, prompt: Sequence[int]):
        self.parser = parser
        self.prompt_tokens = len(prompt)
        self.token_ids = list(prompt)  # the prompt, then the answer so far
        self.start: int | None = 0 if parser.is_reasoning_end(self.token_ids) else None

    def read(self, token_ids: Sequence[int]) -> int | None:
        """With the answer's next tokens: the index among the answer's tokens where the final answer
        begins, or None while the base still thinks."""
        delta = list(token_ids)
        self.token_ids += delta
        if self.start is None and delta and self.parser.is_reasoning_end_streaming(self.token_ids, delta):
            after = self.parser.extract_content_ids(delta)
            self.start = len(self.token_ids) - self.prompt_tokens - len(after)
        return self.start
