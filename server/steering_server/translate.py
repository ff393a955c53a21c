"""OpenAI requests to engine inputs, and engine outputs back to OpenAI shapes."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from vllm import SamplingParams
from vllm.entrypoints.generate.base.protocol import (
    structured_outputs_from_response_format,
)
from vllm.exceptions import VLLMClientError, VLLMValidationError
from vllm.logprobs import Logprob
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

from steering.errors import InvalidRequest
from steering_server.protocol import (
    ChatCompletionRequest,
    ChatLogprobs,
    CompletionLogprobs,
    CompletionRequest,
    PromptLogprob,
    PromptLogprobs,
    TokenLogprob,
    TopLogprob,
)

GenerationRequest = ChatCompletionRequest | CompletionRequest


def sampling_params(request: GenerationRequest, *, prompt_len: int, max_model_len: int) -> SamplingParams:
    """vLLM sampling parameters; an absent token limit means 'up to the end of the context'."""
    if request.n > 1 and request.temperature == 0:
        raise InvalidRequest("n must be 1 with greedy sampling (temperature 0): the choices would be identical",
                             param="n")
    if request.stream_options is not None and not request.stream:
        raise InvalidRequest("stream_options is only allowed with stream: true", param="stream_options")
    if isinstance(request, ChatCompletionRequest) and request.top_logprobs is not None and not request.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    echo = isinstance(request, CompletionRequest) and request.echo
    if request.token_limit == 0 and not echo:
        raise InvalidRequest("max_tokens 0 needs echo: true (it scores the prompt without generating)",
                             param="max_tokens")
    prompt_logprobs = request.prompt_logprobs
    if prompt_logprobs is not None and request.stream:
        raise InvalidRequest("prompt_logprobs are not available with stream: true", param="prompt_logprobs")
    if echo and prompt_logprobs is None:
        prompt_logprobs = request.logprobs  # the echoed prompt's logprobs, as vLLM does
    # At least 1, so that a prompt that fills the context is refused for its length, by name. With
    # echo, max_tokens 0 generates one token that the answer leaves out, as in vLLM.
    max_tokens = request.token_limit if request.token_limit is not None else max(1, max_model_len - prompt_len)
    max_tokens = max(max_tokens, 1)
    try:
        logit_bias = {int(token): bias for token, bias in (request.logit_bias or {}).items()}
    except ValueError:
        raise InvalidRequest("logit_bias keys must be token ids", param="logit_bias") from None
    try:
        return SamplingParams(
            n=request.n,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k if request.top_k is not None else 0,
            max_tokens=max_tokens,
            min_tokens=request.min_tokens,
            stop=request.stop,
            seed=request.seed,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            logit_bias=logit_bias or None,
            ignore_eos=request.ignore_eos,
            repetition_penalty=request.repetition_penalty,
            min_p=request.min_p,
            include_stop_str_in_output=request.include_stop_str_in_output,
            structured_outputs=structured_outputs(request),
            logprobs=request.num_logprobs,
            prompt_logprobs=prompt_logprobs,
            output_kind=RequestOutputKind.DELTA if request.stream else RequestOutputKind.FINAL_ONLY,
        )
    except (ValueError, VLLMClientError) as error:
        raise InvalidRequest(str(error), param=getattr(error, "parameter", None)) from None


def structured_outputs(request: GenerationRequest) -> StructuredOutputsParams | None:
    """vLLM's own parameters and conversion (`response_format` wins over `structured_outputs`);
    its refusal of no constraint, or of several, names the field."""
    given = request.structured_outputs
    try:
        params = StructuredOutputsParams(**given.model_dump(by_alias=True, exclude_unset=True)) if given else None
        return structured_outputs_from_response_format(params, request.response_format)
    except VLLMValidationError as error:
        raise InvalidRequest(str(error).split(": {")[0], param="structured_outputs") from None


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(token_ids: Sequence[int], logprobs: Sequence[dict[int, Logprob]], top: int) -> ChatLogprobs:
    """OpenAI chat logprobs: one entry per generated token, with its `top` alternatives."""
    content = []
    for token_id, candidates in zip(token_ids, logprobs):
        chosen = candidates[token_id]
        ranked = sorted(candidates.items(), key=lambda item: item[1].rank or 0)[:top] if top else []
        content.append(
            TokenLogprob(
                token=chosen.decoded_token or "",
                logprob=chosen.logprob,
                bytes=_token_bytes(chosen.decoded_token or ""),
                top_logprobs=[
                    TopLogprob(token=lp.decoded_token or "", logprob=lp.logprob, bytes=_token_bytes(lp.decoded_token or ""))
                    for _, lp in ranked
                ],
            )
        )
    return ChatLogprobs(content=content)


def completion_logprobs(
    token_ids: Sequence[int],
    logprobs: Sequence[dict[int, Logprob] | None],
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
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top_logprobs, text_offset=offsets)


def prompt_logprobs_body(prompt_logprobs: Sequence[dict[int, Logprob] | None]) -> PromptLogprobs:
    """vLLM's `prompt_logprobs` shape, with -inf clamped as vLLM clamps it (JSON has no -inf)."""
    return [
        None if step is None else {
            str(token): PromptLogprob(logprob=max(lp.logprob, -9999.0), rank=lp.rank, decoded_token=lp.decoded_token)
            for token, lp in step.items()
        }
        for step in prompt_logprobs
    ]
