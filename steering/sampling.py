"""vLLM's sampling parameters for one admitted prompt: the door's fields, the logprobs the policy
kind reads, what vLLM's parser asks of generation (tool calls), and the token limit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vllm import SamplingParams
from vllm.exceptions import VLLMClientError
from vllm.sampling_params import RequestOutputKind

from steering.errors import vllm_refusal
from steering.parsing import ChatParsing


def sampling_params(fields: Mapping[str, Any], *, max_tokens: int, reads_logprobs: int | None = None,
                    parsing: ChatParsing | None = None) -> SamplingParams:
    """`fields` as vLLM's parameters, or the request's error. `max_tokens` is at least 1, so that
    a prompt that fills the context is refused for its length; `reads_logprobs`, the top logprobs
    per token the kind's score reads (the answer's own at least); answers come whole unless the
    door asks for deltas (`output_kind`)."""
    fields = {"output_kind": RequestOutputKind.FINAL_ONLY, **fields}
    if reads_logprobs is not None:
        fields["logprobs"] = max(fields.get("logprobs") or 0, reads_logprobs)
    if parsing is not None:  # as the parser adjusted the request: a call format's constraint, special tokens kept
        fields["skip_special_tokens"] = parsing.skip_special_tokens
        if parsing.structured_outputs is not None:
            fields["structured_outputs"] = parsing.structured_outputs
    try:
        return SamplingParams(**fields, max_tokens=max(max_tokens, 1))
    except (ValueError, VLLMClientError) as error:
        raise vllm_refusal(error) from None  # named by the message's leading field, where vLLM names none
