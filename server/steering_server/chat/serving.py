"""POST /v1/chat/completions: a conversation to its policy, and the pieces back as OpenAI's chat
response or chunks (a reasoning base's thinking and tool calls read by vLLM's parser)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence

from vllm.logprobs import Logprob

from steering.admission import PolicyRequest
from steering.kinds import Piece, Plan
from steering.parsing import ParsedStream
from steering.prompts import Conversation
from steering_server.chat.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    NamedToolChoice,
    TokenLogprob,
    TopLogprob,
)
from steering_server.generation import GenerationServing
from steering_server.protocol import prompt_logprobs_body, trace_body


class ChatServing(GenerationServing):
    endpoint = "chat"

    def policy_request(self, body: ChatCompletionRequest) -> PolicyRequest:
        choice = body.tool_choice
        conversation = Conversation(
            messages=[m.model_dump(exclude_none=True) for m in body.messages],
            template_kwargs=body.chat_template_kwargs,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            tools=[tool.model_dump() for tool in body.tools] if body.tools else None,
            tool_choice=choice.model_dump() if isinstance(choice, NamedToolChoice) else choice,
            parallel_tool_calls=body.parallel_tool_calls,
        )
        return PolicyRequest(body.model, conversation, overrides=body.overrides(), sampling=body.sampling(),
                             max_tokens=body.token_limit, token_limit_field=body.token_limit_field,
                             num_logprobs=body.num_logprobs,
                             scores_prompt="prompt_logprobs" if body.prompt_logprobs is not None else None,
                             constraint=body.constraint, collect=body.collect, trace=body.trace)

    def response(self, body: ChatCompletionRequest, plan: Plan, pieces: list[Piece]) -> ChatCompletion:
        choices = []
        for p in pieces:
            logprobs = self._logprobs(plan, p)
            message, finish_reason = self._message(plan, p)
            choices.append(ChatChoice(index=p.index, message=message, logprobs=logprobs, finish_reason=finish_reason,
                                      stop_reason=p.stop_reason, trace=trace_body(p.trace)))
        prompt_logprobs = next((p.prompt_logprobs for p in pieces if p.prompt_logprobs is not None), None)
        return ChatCompletion(model=plan.name, choices=choices, usage=self.usage(plan), steering=self.steering(plan),
                              prompt_logprobs=prompt_logprobs_body(prompt_logprobs) if prompt_logprobs else None)

    async def chunks(self, body: ChatCompletionRequest, plan: Plan) -> AsyncIterator[ChatCompletionChunk]:
        chunk_id = f"chatcmpl-{plan.request_id}"

        def chunk(choices, **extra) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=chunk_id, created=plan.created, model=plan.name, choices=choices, **extra)

        yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")) for i in range(body.n)],
                    usage=self.chunk_usage(body, plan))
        streams: dict[int, ParsedStream] = {}  # by choice, where vLLM's parser reads the answer
        traced: dict[int, list] = {}  # by choice: the trace of tokens the parser holds back
        async for p in self.pieces(plan):
            if p.trace is not None:
                traced[p.index] = [*traced.get(p.index, []), *p.trace]
            logprobs = self._logprobs(plan, p)
            delta, finish_reason = ChatDelta(content=p.text), p.finish_reason
            if self._parsed(plan):
                if p.index not in streams:
                    streams[p.index] = ParsedStream(plan.parsing, plan.prompts[0])
                read, finish_reason = streams[p.index].read(p.text, p.token_ids, p.finish_reason)
                delta = ChatDelta() if read is None else ChatDelta(reasoning=read.reasoning, content=read.content,
                                                                   tool_calls=read.tool_calls)
            if delta == ChatDelta() and finish_reason is None and logprobs is None:
                continue  # the parser holds it back (a tool call being read, the thinking's end), as vLLM does
            yield chunk([ChatChunkChoice(index=p.index, delta=delta, logprobs=logprobs, finish_reason=finish_reason,
                                         stop_reason=p.stop_reason, trace=trace_body(traced.pop(p.index, None)))],
                        usage=self.chunk_usage(body, plan))
        yield chunk([], usage=self.stream_usage(body, plan), steering=self.steering(plan))

    def _message(self, plan: Plan, p: Piece) -> tuple[AssistantMessage, str | None]:
        if not self._parsed(plan):
            return AssistantMessage(content=p.text), p.finish_reason
        parsing = plan.parsing
        read, finish_reason = parsing.message(parsing.parser(plan.prompts[p.prompt_index]), p.text, p.token_ids,
                                              p.finish_reason)
        message = AssistantMessage(reasoning=read.reasoning, content=read.content, tool_calls=read.tool_calls)
        return message, finish_reason

    @staticmethod
    def _parsed(plan: Plan) -> bool:
        """Whether vLLM's parser reads the pieces: it does the model's answer, not an abstention's
        message (the outcome says it abstained before the message is sent)."""
        return plan.parsing is not None and not plan.outcome.abstained

    @staticmethod
    def _logprobs(plan: Plan, piece: Piece) -> ChatLogprobs | None:
        if plan.num_logprobs is None or piece.logprobs is None:
            return None
        return chat_logprobs(piece.token_ids, piece.logprobs, plan.num_logprobs)


def chat_logprobs(token_ids: Sequence[int], logprobs: Sequence[Mapping[int, Logprob]], top: int) -> ChatLogprobs:
    """OpenAI chat logprobs: one entry per generated token, with its `top` alternatives."""
    content = []
    for token_id, candidates in zip(token_ids, logprobs):
        chosen = candidates[token_id]
        ranked = sorted(candidates.items(), key=lambda item: item[1].rank or 0)[:top] if top else []
        content.append(TokenLogprob(
            token=chosen.decoded_token or "", logprob=chosen.logprob, bytes=_token_bytes(chosen.decoded_token or ""),
            top_logprobs=[TopLogprob(token=lp.decoded_token or "", logprob=lp.logprob,
                                     bytes=_token_bytes(lp.decoded_token or "")) for _, lp in ranked],
        ))
    return ChatLogprobs(content=content)


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))
