"""The OpenAI-compatible API, driven with the official `openai` package and raw httpx."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from tests.live_server import API_KEY, MAX_MODEL_LEN

MESSAGES = [{"role": "user", "content": "the model answers the question"}]
PROMPT = "every cat reads a long story"
GREEDY = {"temperature": 0.0, "max_tokens": 16}


def chat_ids(tokenizer, messages=MESSAGES) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def expected_text(reference, tokenizer, prompt_ids, alpha, max_tokens=16) -> str:
    (ids,) = reference.generate([prompt_ids], [alpha], max_tokens=max_tokens)
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_health_is_503_while_loading_then_200(server):
    assert server.health_seen[0] == 503
    assert server.health_seen[-1] == 200
    assert httpx.get(f"{server.url}/health").json() == {"status": "ready"}


def test_models_lists_every_policy(server, llama_family):
    assert [m.id for m in server.openai().models.list()] == ["base", "chat", "mix", "triage", "triage-calibrated",
                                                             "qa", "qa-first", "qa-base", "qa-agree",
                                                             "qa-familiar", "qa-profile", "check"]
    with server.http() as http:
        listing = http.get("/v1/models")
    cards = {card["id"]: card for card in listing.json()["data"]}
    # Checkpoints by folder name: the filesystem layout is not shown.
    assert cards["mix"]["base"] == Path(llama_family["base"]).name == "base"
    assert cards["mix"]["alpha"] == {"chat": 1.5, "code": -0.5}
    assert cards["mix"]["experts"]["code"] == {role: Path(path).name for role, path in llama_family["experts"]["code"].items()}
    assert str(Path(llama_family["base"]).parent) not in listing.text
    assert (cards["chat"]["max_alpha"], cards["base"]["max_alpha"]) == (4.0, None)
    assert cards["base"]["experts"] == {}


@pytest.mark.parametrize(("policy", "alpha"), [("base", {}), ("chat", {"chat": 1.0}), ("mix", {"chat": 1.5, "code": -0.5})])
def test_chat_equals_the_reference(server, llama_reference, tokenizer, policy, alpha):
    response = server.openai().chat.completions.create(model=policy, messages=MESSAGES, **GREEDY)
    assert response.model == policy
    assert response.choices[0].message.content == expected_text(llama_reference, tokenizer, chat_ids(tokenizer), alpha)
    assert response.choices[0].finish_reason in {"length", "stop"}
    assert response.usage.prompt_tokens == len(chat_ids(tokenizer))
    assert response.usage.completion_tokens == 16 or response.choices[0].finish_reason == "stop"
    assert response.steering == {"policy": policy, "alpha": alpha, "abstained": None, "confidence": None,
                                 "decision": None, "abstention": None}


@pytest.mark.parametrize(("policy", "alpha"), [("base", {}), ("chat", {"chat": 1.0})])
def test_completions_equal_the_reference(server, llama_reference, tokenizer, policy, alpha):
    client = server.openai()
    text = client.completions.create(model=policy, prompt=PROMPT, **GREEDY)
    ids = client.completions.create(model=policy, prompt=tokenizer.encode(PROMPT), **GREEDY)
    want = expected_text(llama_reference, tokenizer, tokenizer.encode(PROMPT), alpha)
    assert text.choices[0].text == ids.choices[0].text == want
    assert text.steering["alpha"] == alpha


def test_chats_are_rendered_as_vllm_serve_renders_them(server, tokenizer):
    """vLLM's chat renderer: text parts joined by newlines; a template variable the base's
    template does not read is refused (vLLM would drop it), naming it."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "the model"}, {"type": "text", "text": "answers"}]}]
    response = server.openai().chat.completions.create(model="chat", messages=parts, max_tokens=1)
    joined = [{"role": "user", "content": "the model\nanswers"}]
    assert response.usage.prompt_tokens == len(chat_ids(tokenizer, joined))
    with pytest.raises(openai.BadRequestError) as refused:
        server.openai().chat.completions.create(model="chat", messages=MESSAGES, max_tokens=1,
                                                extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert refused.value.body["param"] == "chat_template_kwargs.enable_thinking"
    assert "does not read 'enable_thinking'" in refused.value.body["message"]


def test_a_final_assistant_message_is_continued_as_vllm_continues_it(server, llama_reference, tokenizer):
    """`continue_final_message` (a prefill) and `add_generation_prompt: false`, rendered as
    transformers renders them, and the steered continuation equal to the reference on that prompt."""
    prefill = [*MESSAGES, {"role": "assistant", "content": "the answer is"}]
    for messages, ending in ((prefill, {"continue_final_message": True, "add_generation_prompt": False}),
                             (MESSAGES, {"add_generation_prompt": False})):
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **ending)
        response = server.openai().chat.completions.create(model="chat", messages=messages, extra_body=ending,
                                                           **GREEDY)
        assert response.usage.prompt_tokens == len(ids)
        assert response.choices[0].message.content == expected_text(llama_reference, tokenizer, ids, {"chat": 1.0})
        with server.http() as http:
            assert http.post("/tokenize", json={"messages": messages, **ending}).json()["tokens"] == ids
    assert ids != chat_ids(tokenizer) and prefill[-1]["content"] in tokenizer.decode(
        tokenizer.apply_chat_template(prefill, continue_final_message=True, add_generation_prompt=False))
    for ending, says in (({"continue_final_message": True}, "needs add_generation_prompt: false"),
                         ({"continue_final_message": True, "add_generation_prompt": False}, "must be the assistant's")):
        with pytest.raises(openai.BadRequestError) as refused:
            server.openai().chat.completions.create(model="chat", messages=MESSAGES, extra_body=ending, max_tokens=1)
        assert refused.value.body["param"] == "continue_final_message" and says in refused.value.body["message"]


def test_tokenize_and_detokenize_use_the_base_tokenizer(server, tokenizer):
    with server.http() as http:
        chat = http.post("/tokenize", json={"model": "mix", "messages": MESSAGES, "return_token_strs": True}).json()
        text = http.post("/tokenize", json={"prompt": PROMPT}).json()
        back = http.post("/detokenize", json={"tokens": text["tokens"]}).json()
        outside = http.post("/detokenize", json={"tokens": [len(tokenizer)]})
    assert chat["tokens"] == chat_ids(tokenizer) and chat["count"] == len(chat_ids(tokenizer))
    assert chat["token_strs"] == tokenizer.convert_ids_to_tokens(chat_ids(tokenizer))
    assert (text["tokens"], text["max_model_len"]) == (tokenizer.encode(PROMPT), MAX_MODEL_LEN)
    assert back == {"prompt": tokenizer.decode(tokenizer.encode(PROMPT))}
    assert (outside.status_code, outside.json()["error"]["param"]) == (400, "tokens[0]")


def test_steering_changes_the_answer(server):
    client = server.openai()
    base = client.chat.completions.create(model="base", messages=MESSAGES, **GREEDY)
    chat = client.chat.completions.create(model="chat", messages=MESSAGES, **GREEDY)
    assert base.choices[0].message.content != chat.choices[0].message.content


def test_alpha_override_equals_the_reference_at_that_alpha(server, llama_reference, tokenizer):
    client = server.openai()
    default = client.chat.completions.create(model="chat", messages=MESSAGES, **GREEDY)
    override = client.chat.completions.create(
        model="chat", messages=MESSAGES, extra_body={"steering": {"alpha": {"chat": 2.5, "code": 1.0}}}, **GREEDY
    )
    alpha = {"chat": 2.5, "code": 1.0}
    assert override.steering["alpha"] == alpha
    assert override.choices[0].message.content != default.choices[0].message.content
    assert override.choices[0].message.content == expected_text(llama_reference, tokenizer, chat_ids(tokenizer), alpha)


def test_a_streamed_trace_through_the_openai_package_equals_the_reference(server, llama_reference, tokenizer):
    """Each chunk carries its own tokens' trace; joined, they are the reference's numbers; and the
    answer is the one given without a trace."""
    ask = {"model": "mix", "messages": MESSAGES, **GREEDY}
    client = server.openai()
    chunks = list(client.chat.completions.create(**ask, stream=True, extra_body={"steering": {"trace": True}}))
    traced = [c.choices[0] for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(traced) > 1
    trace = [entry for choice in traced for entry in choice.model_extra["trace"]]
    untraced = client.chat.completions.create(**ask).choices[0].message.content
    assert "".join(choice.delta.content for choice in traced) == untraced
    want = llama_reference.trace(chat_ids(tokenizer), [e["token_id"] for e in trace], {"chat": 1.5, "code": -0.5})  # mix
    assert [e["token_id"] for e in trace] == [w["token_id"] for w in want]
    for entry, expected in zip(trace, want):
        assert entry["logprob"] == pytest.approx(expected["logprob"], abs=1e-4)
        assert entry["base_logprob"] == pytest.approx(expected["base_logprob"], abs=1e-4)
        assert entry["contributions"] == pytest.approx(expected["contributions"], abs=1e-4)
        assert (entry["flip"] or {}).get("token_id") == (expected["flip"] or {}).get("token_id")


def test_repetition_penalty_acts_on_the_steered_logits(server, llama_reference, tokenizer):
    """vLLM's rule by hand over the reference's steered logits: a token already in the prompt or
    the answer has a positive logit divided by the penalty, a negative one multiplied."""
    # A prompt whose greedy answer the penalty changes (checked below) on the fixture family.
    prompt, alpha, penalty = tokenizer.encode("the model answers the question"), {"chat": 1.5, "code": -0.5}, 1.8
    outputs: list[list[int]] = [[]]
    for logits in llama_reference.steered_logits([prompt], [alpha], outputs, 16):
        seen = torch.tensor(sorted(set(prompt) | set(outputs[0])))
        row = logits[0]
        row[seen] = torch.where(row[seen] > 0, row[seen] / penalty, row[seen] * penalty)
        outputs[0].append(int(row.argmax()))
        if outputs[0][-1] in llama_reference.eos_token_ids:
            break
    response = server.openai().completions.create(model="mix", prompt=prompt, extra_body={"repetition_penalty": penalty},
                                                  **GREEDY)
    plain = server.openai().completions.create(model="mix", prompt=prompt, **GREEDY)
    assert response.choices[0].text == tokenizer.decode(outputs[0], skip_special_tokens=True) != plain.choices[0].text


def constrained_greedy(reference, tokenizer, prompt, alpha, choices) -> str:
    """Greedy over the reference's steered logits, each step restricted to the tokens that keep
    the text a prefix of one of `choices`, and to EOS once it is one: what a choice grammar allows."""
    pieces = {t: tokenizer.decode([t]) for t in range(len(tokenizer)) if t not in tokenizer.all_special_ids}
    outputs, text = [[]], ""
    for logits in reference.steered_logits([prompt], [alpha], outputs, 32):
        allowed = [t for t, piece in pieces.items() if piece and any(c.startswith(text + piece) for c in choices)]
        allowed += [tokenizer.eos_token_id] if text in choices else []
        token = max(allowed, key=lambda t: logits[0, t].item())
        if token == tokenizer.eos_token_id:
            return text
        outputs[0].append(token)
        text += pieces[token]
    return text


@pytest.mark.parametrize("alpha", [None, {"chat": -2.0, "code": 2.0}])
def test_a_choice_grammar_constrains_the_steered_distribution(server, llama_reference, tokenizer, alpha):
    choices = ["every", "cat", "story", "reads"]
    prompt = tokenizer.encode(PROMPT)
    steering = {"steering": {"alpha": alpha}} if alpha else {}
    response = server.openai().completions.create(
        model="mix", prompt=prompt, **GREEDY, extra_body={"structured_outputs": {"choice": choices}, **steering})
    want = constrained_greedy(llama_reference, tokenizer, prompt, alpha or {"chat": 1.5, "code": -0.5}, choices)
    assert (response.choices[0].text, response.choices[0].finish_reason) == (want, "stop")


def test_a_json_schema_shapes_a_steered_answer(server):
    """The fixture tokenizer spells JSON: a steered greedy answer is an object of the schema."""
    schema = {"type": "object", "additionalProperties": False, "required": ["answer", "count"],
              "properties": {"answer": {"enum": ["yes", "no"]}, "count": {"type": "integer", "minimum": 0, "maximum": 9}}}
    for alpha in (0.0, 3.0):
        response = server.openai().chat.completions.create(
            model="chat", messages=MESSAGES, temperature=0.0, max_tokens=48,
            extra_body={"structured_outputs": {"json": schema, "disable_any_whitespace": True},
                        "steering": {"alpha": {"chat": alpha}}})
        (choice,) = response.choices
        assert choice.finish_reason == "stop", choice.message.content
        answer = json.loads(choice.message.content)
        assert set(answer) == {"answer", "count"} and answer["answer"] in ("yes", "no") and 0 <= answer["count"] <= 9
        assert response.steering["alpha"] == {"chat": alpha}


# The default tool_strict_level, parameter, holds arguments to the schema, strict or not.
WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "the weather in a city", "strict": True,
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"enum": ["paris", "rome"]}}}}}
NOTE = {"type": "function", "function": {"name": "note", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["n"],
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}}}}


def test_a_named_tool_choice_constrains_the_steered_answer_to_a_call(server):
    """vLLM's parser turns the named function into a JSON schema on the steered distribution and
    reads the call back (finish_reason stop, as OpenAI's for a named function)."""
    for name, allowed in (("weather", [{"city": "paris"}, {"city": "rome"}]), ("note", [{"n": n} for n in range(10)])):
        response = server.openai().chat.completions.create(
            model="chat", messages=MESSAGES, temperature=0.0, max_tokens=128, tools=[WEATHER, NOTE],
            tool_choice={"type": "function", "function": {"name": name}})
        (choice,) = response.choices
        assert choice.finish_reason == "stop", choice.message
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == name and call.id
        assert json.loads(call.function.arguments) in allowed


def test_a_tool_name_the_base_cannot_spell_is_the_request_s_error(server):
    """The fixture tokenizer has no capital letters: the call format's grammar leaves no token (a
    400 naming tools, as for structured_outputs; LangChain names tools after their classes)."""
    capital = {"type": "function", "function": {**NOTE["function"], "name": "Note"}}
    with pytest.raises(openai.BadRequestError) as refused:
        server.openai().chat.completions.create(model="chat", messages=MESSAGES, max_tokens=32, tools=[capital],
                                                tool_choice={"type": "function", "function": {"name": "Note"}})
    assert refused.value.body["param"] == "tools" and "cannot spell" in refused.value.body["message"]


def test_required_tools_stream_the_calls_they_answer_whole(server):
    client = server.openai()
    ask = {"model": "mix", "messages": MESSAGES, "temperature": 0.0, "max_tokens": 128, "tools": [WEATHER, NOTE],
           "tool_choice": "required", "parallel_tool_calls": False}
    whole = client.chat.completions.create(**ask).choices[0]
    assert whole.finish_reason == "tool_calls", whole
    (call,) = whole.message.tool_calls
    arguments = json.loads(call.function.arguments)
    if call.function.name == "note":  # not marked strict: held to its schema by the deployment's level
        assert set(arguments) == {"n"} and 0 <= arguments["n"] <= 9
    else:
        assert call.function.name == "weather" and arguments in ({"city": "paris"}, {"city": "rome"})
    chunks = [c for c in client.chat.completions.create(**ask, stream=True) if c.choices]
    streamed = [d for c in chunks for d in c.choices[0].delta.tool_calls or ()]
    assert {d.function.name for d in streamed if d.function and d.function.name} == {call.function.name}
    # Streamed arguments are the model's text; whole ones, the parser's JSON of it (both vLLM's).
    assert json.loads("".join(d.function.arguments or "" for d in streamed if d.function)) == json.loads(
        call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_conversation_with_tool_results_is_answered_under_auto(server, tokenizer):
    """An earlier call and its result go back to the model; under auto, an answer without a call
    comes back as content, unchanged by the parser."""
    turns = [*MESSAGES,
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "call-1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "rome"}'}}]},
             {"role": "tool", "tool_call_id": "call-1", "content": "the moon"}]
    client = server.openai()
    plain = client.chat.completions.create(model="chat", messages=turns, temperature=0.0, max_tokens=12)
    auto = client.chat.completions.create(model="chat", messages=turns, temperature=0.0, max_tokens=12,
                                          tools=[WEATHER], tool_choice="auto")
    # The fixture template does not show tools; the answer has no call, so it passes unchanged.
    assert "<tool_call>" not in plain.choices[0].message.content
    assert (auto.choices[0].message.content, auto.choices[0].message.tool_calls, auto.choices[0].finish_reason) == (
        plain.choices[0].message.content, None, plain.choices[0].finish_reason)


def test_tools_are_refused_where_they_cannot_work(server):
    client = server.openai()
    for policy, extra, param in (("triage", {"tools": [WEATHER]}, "tools"),
                                 ("chat", {"tool_choice": "required"}, "tool_choice"),
                                 ("chat", {"tools": [WEATHER], "tool_choice": {"type": "function",
                                                                               "function": {"name": "nope"}}},
                                  "tool_choice.function.name"),
                                 ("chat", {"tools": [WEATHER], "response_format": {"type": "json_object"}},
                                  "response_format")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=policy, messages=MESSAGES, max_tokens=4, **extra)
        assert refused.value.body["param"] == param, refused.value.body


def test_a_format_the_tokenizer_cannot_spell_is_refused_not_answered_empty(server, tokenizer):
    """A grammar the tokenizer cannot spell ('#' is no token of the fixture's) leaves the engine no
    token: vLLM ends the answer with finish_reason "error". That is the request's constraint to
    change (a 400 naming it, not a 200 with an empty answer, nor a 500 clients retry)."""
    assert "#" not in tokenizer.decode(list(range(len(tokenizer))))
    body = {"model": "chat", "prompt": PROMPT, "max_tokens": 4, "structured_outputs": {"regex": "#"}}
    with server.http() as http:
        whole = http.post("/v1/completions", json=body)
        streamed = http.post("/v1/completions", json={**body, "stream": True})
    assert whole.status_code == 400 and whole.json()["error"]["param"] == "structured_outputs", whole.text
    assert "cannot spell" in whole.json()["error"]["message"]
    events = [line.removeprefix("data: ") for line in streamed.text.split("\n\n") if line]
    assert json.loads(events[-2])["error"]["param"] == "structured_outputs" and events[-1] == "[DONE]", events


def test_a_grammar_vllm_cannot_compile_is_refused_before_the_stream(server):
    with server.http() as http:
        for extra in ({"structured_outputs": {"grammar": "root ::= ("}},
                      {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": 5}}}}):
            response = http.post("/v1/completions", json={"model": "mix", "prompt": PROMPT, "stream": True, **extra})
            error = response.json()["error"]
            assert (response.status_code, error["code"], error["param"]) == (400, "invalid_request", *extra), extra
        # Token ids outside the vocabulary: refused at admission by vLLM's own check, named.
        response = http.post("/v1/completions", json={"model": "mix", "prompt": [1, 10**6], "max_tokens": 2})
        assert (response.status_code, response.json()["error"]["param"]) == (400, "prompt"), response.text


def test_a_batch_of_prompts_answers_each_as_alone(server, tokenizer):
    client = server.openai()
    prompts = [PROMPT, "our team builds"]
    batch = client.completions.create(model="chat", prompt=prompts, temperature=0.0, max_tokens=8)
    singles = [client.completions.create(model="chat", prompt=p, temperature=0.0, max_tokens=8) for p in prompts]
    assert [c.text for c in batch.choices] == [s.choices[0].text for s in singles]
    assert batch.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)
    assert batch.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)


def test_n_choices_are_indexed_per_prompt(server):
    batch = server.openai().completions.create(
        model="chat", prompt=[PROMPT, "our team builds"], n=2, temperature=1.0, seed=1, max_tokens=8
    )
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text != batch.choices[1].text


def test_seeded_sampling_is_reproducible_through_the_api(server):
    client = server.openai()
    run = lambda seed: client.chat.completions.create(  # noqa: E731
        model="chat", messages=MESSAGES, temperature=1.0, max_tokens=16, seed=seed, n=2
    )
    first = [c.message.content for c in run(3).choices]
    assert [c.message.content for c in run(3).choices] == first
    assert first[0] != first[1]


def test_chat_logprobs_are_steered(server, llama_reference, tokenizer):
    alpha = {"chat": 1.5, "code": -0.5}
    response = server.openai().chat.completions.create(
        model="mix", messages=MESSAGES, temperature=0.0, max_tokens=1, logprobs=True, top_logprobs=3
    )
    (token,) = response.choices[0].logprobs.content
    want = llama_reference.next_token_logprobs([chat_ids(tokenizer)], [alpha])[0]
    best = want.topk(3)
    assert token.logprob == pytest.approx(best.values[0].item(), abs=1e-4)
    assert [t.logprob for t in token.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
    assert [t.token for t in token.top_logprobs][0] == token.token


def test_completion_logprobs(server):
    response = server.openai().completions.create(model="chat", prompt=PROMPT, max_tokens=4, temperature=0.0, logprobs=2)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert "".join(logprobs.tokens) == response.choices[0].text
    assert all(len(top) <= 2 and max(top.values()) == lp for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs))
    assert logprobs.text_offset[1] == len(logprobs.tokens[0])


def test_echo_scores_a_continuation_under_the_steered_policy(server, llama_reference, tokenizer):
    """lm-eval's loglikelihood request, as its `local-completions` model sends it: the context and
    continuation as token ids, echo, logprobs 1, one token. The continuation's logprobs are the
    steered policy's, as the reference scores them."""
    context, continuation = tokenizer.encode("every cat reads"), tokenizer.encode(" a long story", add_special_tokens=False)
    prompt = context + continuation
    alpha = {"chat": 1.5, "code": -0.5}
    response = server.openai().completions.create(model="mix", prompt=[prompt], max_tokens=1, temperature=0.0,
                                                  logprobs=1, echo=True, seed=1234)
    (choice,) = response.choices
    assert choice.text.startswith(tokenizer.decode(prompt))
    logprobs = choice.logprobs
    assert len(logprobs.token_logprobs) == len(prompt) + 1 and logprobs.token_logprobs[0] is None
    want = llama_reference.prompt_logprobs(prompt, alpha)
    assert logprobs.token_logprobs[1:-1] == pytest.approx(want, abs=1e-4)
    next_token = llama_reference.next_token_logprobs([prompt], [alpha])[0]
    assert logprobs.token_logprobs[-1] == pytest.approx(next_token.max().item(), abs=1e-4), "greedy, steered"
    # What lm-eval sums: the continuation's logprobs; they are not the base's.
    score = sum(logprobs.token_logprobs[len(context):-1])
    assert score == pytest.approx(sum(want[len(context) - 1:]), abs=1e-3)
    assert abs(score - sum(llama_reference.prompt_logprobs(prompt, {})[len(context) - 1:])) > 0.05

    # max_tokens 0 leaves the generated token out; prompt_logprobs by name comes in vLLM's shape.
    scored = server.openai().completions.create(model="mix", prompt=prompt, max_tokens=0, logprobs=0, echo=True,
                                                extra_body={"prompt_logprobs": 0}).choices[0]
    assert len(scored.logprobs.tokens) == len(prompt) and scored.logprobs.token_logprobs[1:] == pytest.approx(want,
                                                                                                            abs=1e-4)
    assert scored.prompt_logprobs[0] is None
    assert [step[str(token)]["logprob"] for step, token in zip(scored.prompt_logprobs[1:], prompt[1:])] == pytest.approx(
        want, abs=1e-4)


def test_chat_prompt_logprobs_are_steered(server, llama_reference, tokenizer):
    response = server.openai().chat.completions.create(model="chat", messages=MESSAGES, max_tokens=1,
                                                       extra_body={"prompt_logprobs": 1})
    prompt = chat_ids(tokenizer)
    got = response.model_extra["prompt_logprobs"]
    assert got[0] is None and len(got) == len(prompt)
    want = llama_reference.prompt_logprobs(prompt, {"chat": 1.0})
    assert [step[str(token)]["logprob"] for step, token in zip(got[1:], prompt[1:])] == pytest.approx(want, abs=1e-4)


def test_chat_stream(server):
    client = server.openai()
    full = client.chat.completions.create(model="chat", messages=MESSAGES, **GREEDY)
    chunks = list(client.chat.completions.create(
        model="chat", messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **GREEDY
    ))
    assert len(chunks) > 3
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.model_dump() == full.usage.model_dump()
    assert last.steering == full.steering
    # Also on the chunk that finishes the answer (for clients that drop the last), and on no other.
    assert chunks[-2].choices[0].finish_reason is not None and chunks[-2].steering == full.steering
    assert all(getattr(c, "steering", None) is None for c in chunks[:-2])


def test_completion_stream_over_raw_http(server):
    body = {"model": "mix", "prompt": PROMPT, "stream": True, **GREEDY}
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert events[-1]["steering"]["alpha"] == {"chat": 1.5, "code": -0.5}
    assert events[-1]["usage"] is None, "usage only when stream_options.include_usage"
    text = "".join(choice["text"] for event in events for choice in event["choices"])
    with server.http() as http:
        full = http.post("/v1/completions", json={**body, "stream": False}).json()
    assert text == full["choices"][0]["text"]


def test_concurrent_requests_each_equal_their_single_result(server):
    policies = ["base", "chat", "mix", "chat"]
    overrides = [None, {"chat": -1.0}, {"chat": 2.5, "code": 1.0}, None]
    cases = [
        (policies[i % 4], overrides[(i // 4) % 4] if policies[i % 4] != "base" else None, f"{PROMPT} {i % 5}")
        for i in range(16)
    ]

    def request(policy, alpha, prompt):
        extra = {"steering": {"alpha": alpha}} if alpha else {}
        return dict(model=policy, prompt=prompt, extra_body=extra, temperature=0.0, max_tokens=12)

    client = server.openai()
    singles = [client.completions.create(**request(*case)).choices[0].text for case in cases]

    async def together():
        async with server.async_openai() as aclient:
            return await asyncio.gather(*(aclient.completions.create(**request(*case)) for case in cases))

    started = time.perf_counter()
    results = asyncio.run(together())
    assert [r.choices[0].text for r in results] == singles
    assert len(set(singles)) > 4
    assert time.perf_counter() - started > 0


def test_disconnect_mid_stream_aborts_the_engine_request(server):
    aborted = server.metric("steer_aborted_requests_total")
    body = {"model": "chat", "prompt": PROMPT, "stream": True, "max_tokens": MAX_MODEL_LEN - 20,
            "ignore_eos": True, "temperature": 0.0}
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
        assert server.metric("steer_engine_unfinished_requests") == 1
    deadline = time.monotonic() + 5
    while server.metric("steer_engine_unfinished_requests") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric("steer_engine_unfinished_requests") == 0
    assert server.metric("steer_aborted_requests_total") == aborted + 1


def test_metrics_count_per_policy(server):
    before = server.metric("steer_requests_total", policy="mix", endpoint="chat", status="200")
    tokens = server.metric("steer_generation_tokens_total", policy="mix")
    server.openai().chat.completions.create(model="mix", messages=MESSAGES, temperature=0.0, max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert server.metric("steer_requests_total", policy="mix", endpoint="chat", status="200") == before + 1
    assert server.metric("steer_generation_tokens_total", policy="mix") == tokens + 5
    assert server.metric("steer_request_latency_seconds_count", policy="mix", endpoint="chat") >= 1
    refused = server.metric("steer_errors_total", policy="<unknown>", type="model_not_found")
    with server.http() as http:
        assert http.post("/v1/completions", json={"model": "nope", "prompt": "hi"}).status_code == 404
    assert server.metric("steer_errors_total", policy="<unknown>", type="model_not_found") == refused + 1


def test_openapi_documents_the_steering_extension(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert "steering" in schemas["ChatCompletionRequest"]["properties"]
    assert "alpha" in schemas["SteeringRequest"]["properties"]
    assert "steering" in schemas["ChatCompletion"]["properties"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(spec["paths"])


# Fail closed: every refusal is a 4xx in the OpenAI error envelope.


def envelope(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


CHAT = {"model": "chat", "messages": MESSAGES, "max_tokens": 4}


@pytest.mark.parametrize(
    ("body", "status", "param", "text"),
    [
        ({**CHAT, "model": "nope"}, 404, "model", "does not exist"),
        ({**CHAT, "steering": {"alpha": {"poetry": 1.0}}}, 400, "steering.alpha.poetry", "unknown expert pair"),
        ({**CHAT, "steering": {"alpha": {"chat": 4.5}}}, 400, "steering.alpha.chat", "max_alpha"),
        ({**CHAT, "model": "base", "steering": {"alpha": {"chat": 1.0}}}, 400, "steering.alpha.chat", "does not allow"),
        ({**CHAT, "steering": {"alpha": {"chat": 1.0}, "temperature": 3}}, 400, "steering.temperature", "Extra inputs"),
        ({**CHAT, "steering": {"alhpa": {"chat": 1.0}}}, 400, "steering.alhpa", "Extra inputs"),
        ({**CHAT, "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens", "exceed the context"),
        ({**CHAT, "temperature": 9}, 400, "temperature", "less than or equal to 2"),
        ({**CHAT, "tools": []}, 400, "tools", "at least 1"),
        ({**CHAT, "best_of": 2}, 400, "best_of", "Extra inputs"),
        ({**CHAT, "messages": []}, 400, "messages", "at least 1"),
        ({**CHAT, "n": 2, "temperature": 0}, 400, "n", "greedy"),
    ],
)
def test_refusals(server, body, status, param, text):
    with server.http() as http:
        error = envelope(http.post("/v1/chat/completions", json=body), status)
    assert error["param"] == param
    assert text in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused(server, value):
    raw = '{"model": "chat", "prompt": "hi", "max_tokens": 2, "steering": {"alpha": {"chat": %s}}}' % value
    with server.http() as http:
        response = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    error = envelope(response, 400)
    assert error["param"] == "steering.alpha.chat"
    assert "finite" in error["message"]
    assert not math.isfinite(float(value))


def test_an_override_refused_is_never_answered_unsteered(server):
    with server.http() as http:
        response = http.post("/v1/completions", json={"model": "chat", "prompt": PROMPT, "stream": True,
                                                      "steering": {"alpha": {"chat": 99}}})
    envelope(response, 400)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_api_key_is_required(server, headers):
    response = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers=headers)
    error = envelope(response, 401)
    assert error["type"] == "authentication_error"
    assert httpx.get(f"{server.url}/v1/models", headers=headers).status_code == 401


def test_the_openai_sdk_sees_typed_errors(server):
    import openai

    with pytest.raises(openai.NotFoundError):
        server.openai().chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as caught:
        server.openai().chat.completions.create(model="chat", messages=MESSAGES, extra_body={"steering": {"alpha": {"chat": 5}}})
    assert caught.value.body["param"] == "steering.alpha.chat"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
