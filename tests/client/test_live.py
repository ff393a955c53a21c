"""The SDK against the real server on the fixture family: answers, streams, steering blocks, errors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from steering_client import (
    AsyncSteeringClient,
    AuthenticationError,
    BadRequestError,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    Decision,
    NotFoundError,
    SteeringClient,
)

from tests.live_server import API_KEY, LABELS, MAX_MODEL_LEN

MESSAGES = [{"role": "user", "content": "the model answers the question"}]
PROMPT = "every cat reads a long story"
GREEDY = {"temperature": 0.0, "max_tokens": 16}
ENDLESS = {"max_tokens": MAX_MODEL_LEN - 20, "ignore_eos": True, "temperature": 0.0}


@pytest.fixture
def client(server):
    with SteeringClient(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as client:
        yield client


@pytest.fixture
async def aclient(server):
    async with AsyncSteeringClient(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as client:
        yield client


def text_of(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_policies_are_listed_with_their_pairs_and_bounds(client, llama_family):
    policies = {policy.id: policy for policy in client.policies.list()}
    assert [m.id for m in client.models.list()] == list(policies) == [
        "base", "chat", "mix", "triage", "triage-calibrated", "qa", "qa-first", "qa-base", "qa-agree", "qa-familiar",
        "qa-profile", "check"]
    mix = policies["mix"]
    assert (mix.base, mix.pairs, mix.alpha, mix.max_alpha) == ("base", ["chat", "code"], {"chat": 1.5, "code": -0.5}, 3.0)
    assert mix.experts["code"].tuned == Path(llama_family["experts"]["code"]["tuned"]).name
    assert policies["chat"].description == "the chat pair"
    assert (policies["base"].pairs, policies["base"].max_alpha) == ([], None)


def test_a_policy_is_retrieved_as_it_is_listed(client):
    listed = {policy.id: policy for policy in client.models.list()}
    assert client.models.retrieve("mix") == listed["mix"]
    with pytest.raises(NotFoundError) as missing:
        client.policies.retrieve("nope")
    assert (missing.value.status_code, missing.value.code) == (404, "model_not_found")


def test_a_raw_response_parses_to_the_plain_answer(client):
    plain = client.completions.create(model="chat", prompt=PROMPT, **GREEDY)
    raw = client.completions.with_raw_response.create(model="chat", prompt=PROMPT, **GREEDY)
    assert (raw.status_code, raw.headers["content-type"]) == (200, "application/json")
    assert raw.parse().choices == plain.choices


def test_chat_answers_as_the_openai_package_does(client, server):
    response = client.chat.completions.create(model="chat", messages=MESSAGES, **GREEDY)
    plain = server.openai().chat.completions.create(model="chat", messages=MESSAGES, **GREEDY)
    assert isinstance(response, ChatCompletion)
    assert response.choices[0].message.content == plain.choices[0].message.content
    assert response.usage.prompt_tokens == plain.usage.prompt_tokens
    assert response.steering.model_dump(exclude_unset=True) == plain.steering
    assert (response.steering.policy, response.steering.alpha) == ("chat", {"chat": 1.0})
    assert response.steering.decision is None


def test_completions_take_text_and_token_ids(client, tokenizer):
    text = client.completions.create(model="mix", prompt=PROMPT, **GREEDY)
    ids = client.completions.create(model="mix", prompt=tokenizer.encode(PROMPT), **GREEDY)
    batch = client.completions.create(model="mix", prompt=[PROMPT, "our team builds"], **GREEDY)
    assert isinstance(text, Completion)
    assert text.choices[0].text == ids.choices[0].text == batch.choices[0].text
    assert [c.index for c in batch.choices] == [0, 1]
    assert text.steering.alpha == {"chat": 1.5, "code": -0.5}


def test_an_alpha_override_changes_the_answer_and_is_echoed(client):
    default = client.chat.completions.create(model="chat", messages=MESSAGES, **GREEDY)
    steered = client.chat.completions.create(model="chat", messages=MESSAGES, steering={"alpha": {"chat": 2.5}},
                                             **GREEDY)
    assert steered.steering.alpha == {"chat": 2.5}
    assert steered.choices[0].message.content != default.choices[0].message.content


def test_a_chat_stream_is_the_plain_answer_in_pieces(client):
    plain = client.chat.completions.create(model="chat", messages=MESSAGES, **GREEDY)
    with client.chat.completions.create(model="chat", messages=MESSAGES, stream=True,
                                        stream_options={"include_usage": True}, **GREEDY) as stream:
        assert stream.steering is None, "the steering block comes at the end"
        chunks = list(stream)
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text_of(chunks) == plain.choices[0].message.content
    assert stream.steering == plain.steering
    assert stream.usage == plain.usage
    assert stream.response.is_closed


def test_a_completion_stream_keeps_the_steering_block(client):
    plain = client.completions.create(model="mix", prompt=PROMPT, **GREEDY)
    stream = client.completions.create(model="mix", prompt=PROMPT, stream=True, **GREEDY)
    assert "".join(choice.text for chunk in stream for choice in chunk.choices) == plain.choices[0].text
    assert stream.steering == plain.steering
    assert stream.usage is None, "usage only when stream_options.include_usage"


def test_an_answer_ended_by_a_stop_string_says_which_as_vllm_does(client):
    whole = client.completions.create(model="mix", prompt=PROMPT, **GREEDY).choices[0]
    assert len(whole.text) >= 5 and whole.stop_reason is None, whole  # ended by its length, by no stop
    stop = whole.text[3:5]  # two characters the greedy answer gives; it ends before their first sight
    cut = whole.text.index(stop)
    stopped = client.completions.create(model="mix", prompt=PROMPT, stop=[stop], **GREEDY).choices[0]
    assert (stopped.text, stopped.finish_reason, stopped.stop_reason) == (whole.text[:cut], "stop", stop)

    answer = client.chat.completions.create(model="chat", messages=MESSAGES, **GREEDY).choices[0].message.content
    stop = answer[3:5]
    with client.chat.completions.create(model="chat", messages=MESSAGES, stop=[stop], stream=True, **GREEDY) as stream:
        chunks = list(stream)
    (last,) = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert (text_of(chunks), last.finish_reason, last.stop_reason) == (answer[:answer.index(stop)], "stop", stop)


def wait_for_no_unfinished_requests(server) -> None:
    deadline = time.monotonic() + 5
    while server.metric("steer_engine_unfinished_requests") and time.monotonic() < deadline:
        time.sleep(0.1)


def test_closing_a_stream_early_closes_the_connection_and_aborts(client, server):
    aborted = server.metric("steer_aborted_requests_total", policy="chat")
    with client.completions.create(model="chat", prompt=PROMPT, stream=True, **ENDLESS) as stream:
        for _, _chunk in zip(range(3), stream):
            pass
        assert server.metric("steer_engine_unfinished_requests") == 1
    assert stream.response.is_closed
    wait_for_no_unfinished_requests(server)
    assert server.metric("steer_engine_unfinished_requests") == 0
    assert server.metric("steer_aborted_requests_total", policy="chat") == aborted + 1
    assert client.completions.create(model="chat", prompt=PROMPT, max_tokens=2).choices, "the client still works"


def test_a_decision_reports_expected_costs_and_the_action(client):
    costs = [[0, 5, 2], [3, 0, 4], [1, 1, 0]]
    response = client.chat.completions.create(model="triage", messages=MESSAGES, steering={"costs": costs})
    decision = response.steering.decision
    assert isinstance(decision, Decision)
    assert decision.labels == list(decision.probabilities) == LABELS
    assert decision.costs == costs and decision.abstain_cost == 0.9
    assert set(decision.expected_costs) == {*LABELS, "abstain"}
    assert decision.action == min(decision.expected_costs, key=decision.expected_costs.get)
    assert sum(decision.calibrated.values()) == pytest.approx(1.0)
    assert response.steering.confidence == pytest.approx(max(decision.calibrated.values()))
    assert response.steering.abstained == (decision.action == "abstain")
    assert response.choices[0].message.content == ("I don't know." if decision.action == "abstain" else decision.action)


def test_an_abstention_replaces_the_answer_and_says_why(client):
    answered = client.chat.completions.create(model="qa", messages=MESSAGES, **GREEDY)
    withheld = client.chat.completions.create(model="qa", messages=MESSAGES, steering={"abstain_threshold": 1.0},
                                              **GREEDY)
    assert answered.steering.abstained is False
    assert withheld.steering.abstained is True
    assert withheld.choices[0].message.content == "I don't know."
    abstention = withheld.steering.abstention
    assert (abstention.score, abstention.threshold) == ("mean_prob", 1.0)
    assert abstention.confidence == answered.steering.abstention.confidence == withheld.steering.confidence
    stream = client.chat.completions.create(model="qa", messages=MESSAGES, steering={"abstain_threshold": 1.0},
                                            stream=True, **GREEDY)
    assert text_of(stream) == "I don't know."
    assert stream.steering == withheld.steering


def test_each_refusal_is_its_error_class(client, server):
    with pytest.raises(NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert (missing.value.status_code, missing.value.param, missing.value.code) == (404, "model", "model_not_found")
    assert missing.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(BadRequestError) as beyond:
        client.chat.completions.create(model="chat", messages=MESSAGES, steering={"alpha": {"chat": 4.5}}, stream=True)
    assert (beyond.value.status_code, beyond.value.param) == (400, "steering.alpha.chat")
    assert "max_alpha" in beyond.value.message
    assert beyond.value.request.url == f"{server.url}/v1/chat/completions"
    with pytest.raises(BadRequestError) as unknown:
        client.completions.create(model="chat", prompt=PROMPT, extra_body={"tools": []})
    assert unknown.value.param == "tools"
    with SteeringClient(base_url=f"{server.url}/v1", api_key="wrong") as wrong:
        with pytest.raises(AuthenticationError) as denied:
            wrong.models.list()
    assert (denied.value.status_code, denied.value.type) == (401, "authentication_error")


@pytest.mark.anyio
async def test_async_answers_equal_the_sync_ones(aclient, client):
    plain = client.chat.completions.create(model="chat", messages=MESSAGES, **GREEDY)
    response = await aclient.chat.completions.create(model="chat", messages=MESSAGES, **GREEDY)
    assert response.choices == plain.choices
    assert response.steering == plain.steering
    negative = {"alpha": {"chat": -1.0}}
    completion = await aclient.completions.create(model="chat", prompt=PROMPT, steering=negative, **GREEDY)
    assert completion.choices == client.completions.create(
        model="chat", prompt=PROMPT, steering=negative, **GREEDY).choices
    assert [policy.id for policy in await aclient.policies.list()][:2] == ["base", "chat"]


@pytest.mark.anyio
async def test_an_async_stream_is_the_plain_answer_in_pieces(aclient, client):
    plain = client.chat.completions.create(model="triage", messages=MESSAGES)
    async with await aclient.chat.completions.create(model="triage", messages=MESSAGES, stream=True) as stream:
        chunks = [chunk async for chunk in stream]
    assert text_of(chunks) == plain.choices[0].message.content
    assert stream.steering.decision == plain.steering.decision
    assert stream.response.is_closed


@pytest.mark.anyio
async def test_closing_an_async_stream_early_aborts(aclient, server):
    aborted = server.metric("steer_aborted_requests_total", policy="mix")
    stream = await aclient.completions.create(model="mix", prompt=PROMPT, stream=True, **ENDLESS)
    async for _chunk in stream:
        break
    await stream.aclose()
    assert stream.response.is_closed
    wait_for_no_unfinished_requests(server)
    assert server.metric("steer_aborted_requests_total", policy="mix") == aborted + 1


@pytest.mark.anyio
async def test_async_refusals_are_typed(aclient, server):
    with pytest.raises(NotFoundError):
        await aclient.completions.create(model="nope", prompt=PROMPT)
    with pytest.raises(BadRequestError) as beyond:
        await aclient.chat.completions.create(model="mix", messages=MESSAGES, steering={"alpha": {"code": 3.5}})
    assert beyond.value.param == "steering.alpha.code"
    async with AsyncSteeringClient(base_url=f"{server.url}/v1", api_key="wrong") as wrong:
        with pytest.raises(AuthenticationError):
            await wrong.chat.completions.create(model="chat", messages=MESSAGES)
