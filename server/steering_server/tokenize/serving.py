"""`/tokenize` and `/detokenize`, as `vllm serve` has them: one base tokenizer, which every policy
shares, and the chat rendering generation uses, so a prompt counts here as it counts in `usage`."""

from __future__ import annotations

from steering.admission import Admission
from steering_server.tokenize.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)


def tokenize(admission: Admission, body: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
    if body.model is not None:
        admission.policies[body.model]  # an unknown policy is refused here as on /v1
    prompts, engine = admission.engine.prompts, admission.engine
    if isinstance(body, TokenizeChatRequest):
        ids = prompts.render_chat([m.model_dump(exclude_none=True) for m in body.messages],
                                  add_generation_prompt=body.add_generation_prompt,
                                  continue_final_message=body.continue_final_message,
                                  template_kwargs=body.chat_template_kwargs)
    else:
        ids = prompts.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    strings = prompts.token_strings(ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=strings)


def detokenize(admission: Admission, body: DetokenizeRequest) -> DetokenizeResponse:
    if body.model is not None:
        admission.policies[body.model]
    return DetokenizeResponse(prompt=admission.engine.prompts.decode(body.tokens))
