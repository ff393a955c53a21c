"""Prompts as the base reads them: its tokenizer, and vLLM's chat renderer with its chat template,
so a conversation is rendered here as `vllm serve` renders it. Every policy shares them."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.meta
from vllm.renderers.params import ChatParams

from steering.errors import InvalidRequest

# Set by the endpoint (or its own field), never through chat_template_kwargs.
RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "add_generation_prompt", "continue_final_message", "tools",
                                         "documents"})


@dataclass(frozen=True)
class Conversation:
    """A chat: rendered with the base's template (and its tools, offered to the policy)."""

    messages: Sequence[Mapping[str, Any]]
    template_kwargs: Mapping[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the last (assistant) message left open: the answer continues it
    tools: Sequence[Mapping[str, Any]] | None = None
    tool_choice: str | Mapping[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @property
    def chat_template_kwargs(self) -> dict[str, Any]:
        """The chat template's variables but the messages and tools, as vLLM gives them to the
        template and to its parsers (a reasoning parser may read whether thinking is on)."""
        return {**(self.template_kwargs or {}), "add_generation_prompt": self.add_generation_prompt,
                "continue_final_message": self.continue_final_message}


class Prompts:
    """Text, token ids and conversations, through the base's tokenizer and vLLM's renderer."""

    def __init__(self, tokenizer, renderer):
        self.tokenizer = tokenizer
        self.renderer = renderer

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def encode_text(self, text: str) -> list[int]:
        """A piece of text inside a prompt or an answer (a label, a claim): no special tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, token_ids: Sequence[int], *, param: str = "tokens") -> str:
        """The text of `token_ids`; an id outside the base's vocabulary is the request's error."""
        vocabulary = len(self.tokenizer)
        for i, token in enumerate(token_ids):
            if not 0 <= token < vocabulary:
                raise InvalidRequest(f"token id {token} is not in the base's vocabulary of {vocabulary} tokens",
                                     param=f"{param}[{i}]")
        return self.tokenizer.decode(list(token_ids))

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(list(token_ids))

    def prompt_ids(self, prompt: Conversation | Sequence[str | Sequence[int]]) -> list[list[int]]:
        """The token ids the engine reads: a conversation's one prompt, or each text or token-id prompt."""
        if isinstance(prompt, Conversation):
            return [self.render_chat(prompt.messages, add_generation_prompt=prompt.add_generation_prompt,
                                     continue_final_message=prompt.continue_final_message,
                                     template_kwargs=prompt.template_kwargs, tools=prompt.tools)]
        return [self.encode(p) if isinstance(p, str) else list(p) for p in prompt]

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of a conversation (and its tools), rendered by vLLM's chat renderer with the
        base's template. vLLM drops a `template_kwargs` key the template does not read; here it is
        refused, so a typo is not silently a different prompt. The context length is checked at
        admission, by name."""
        if not self.tokenizer.chat_template:
            raise InvalidRequest("the base model has no chat template; use /v1/completions", param="messages")
        for key in template_kwargs or {}:
            if key in RESERVED_TEMPLATE_VARIABLES or key not in self.template_variables:
                readable = sorted(self.template_variables - RESERVED_TEMPLATE_VARIABLES)
                raise InvalidRequest(f"the base's chat template does not read {key!r}; it reads {readable}",
                                     param=f"chat_template_kwargs.{key}")
        variables = {**(template_kwargs or {}), "add_generation_prompt": add_generation_prompt,
                     "continue_final_message": continue_final_message}  # as vLLM passes them
        if tools:
            variables["tools"] = list(tools)
        tokenize = dataclasses.replace(self.renderer.default_chat_tok_params, max_total_tokens=None)
        try:
            _, (prompt,) = self.renderer.render_chat([list(messages)], ChatParams(chat_template_kwargs=variables),
                                                     tokenize)
        except (ValueError, jinja2.TemplateError) as error:  # vLLM's template resolution; the template's own raise
            raise InvalidRequest(f"the base's chat template cannot render this conversation: {error}",
                                 param="messages") from None
        return list(prompt["prompt_token_ids"])

    @functools.cached_property
    def template_variables(self) -> frozenset[str]:
        """The variables the base's chat template reads: what `chat_template_kwargs` may set."""
        template = self.tokenizer.chat_template
        if not isinstance(template, str):
            return frozenset()
        return frozenset(jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template)))
