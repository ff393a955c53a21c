"""A base that thinks before it answers (the deployment's `reasoning_parser`), in process over the
fake engine: the thinking as vLLM's own parser reads it, whole and streamed; what abstentions and
decisions score. The fake thinks THOUGHT letters, then ends its thinking,
where the prompt opens one (tests/server/fake_engine.py); the real engine and tokenizer serve one
in test_reasoning_live.py."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from steering_server.app import create_app
from steering_server.settings import ServerSettings
from steering_tools.calibrate import said
from steering_tools.fixtures import train_tokenizer
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChatRequest
from vllm.parser.parser_manager import ParserManager

from steering.admission import Admission, PolicyRequest
from steering.config import parse_deployment
from steering.engine import engine_args
from steering.errors import ConfigError
from steering.kinds import answer as run_to_end
from steering.parsing import admit_parsing, parser_class
from steering.prompts import Conversation
from tests.server.fake_engine import (
    ANSWER_LEN,
    BOS,
    END_THINK,
    THOUGHT,
    CharTokenizer,
    FakeEngine,
    answer,
    answer_ids,
    decode,
    label_prob,
    piece,
    token_prob,
)
from tests.server.test_protocol import API_KEY, EXPERTS, INVALID, MAX_MODEL_LEN, MESSAGES, assert_error, sse_events

POLICIES = {
    "chat": {"alpha": {"chat": 1.0}},
    "qa": {"alpha": {"chat": 1.0}, "abstain": {"score": "mean_prob", "threshold": 0.2,
                                               "threshold_bounds": [0.0, 1.0], "message": "Pass."}},
    "qa-first": {"alpha": {"chat": 1.0}, "abstain": {"score": "first_prob", "threshold": 0.0}},
    "qa-base": {"alpha": {"chat": 1.0}, "abstain": {"score": "base_prob", "threshold": 0.0}},
    "triage": {"decision": {"labels": ["yes", "no"], "cost_fp": 1.0, "cost_fn": 1.0}},
}
THINKING = {"enable_thinking": True}  # the fake's template opens the thinking
ROW = (1.0, 0.0)  # the alpha row of every policy here but triage
CHAT_PROMPT = [BOS, *map(ord, "user: hi\nassistant: "), *CharTokenizer().encode("<think>", add_special_tokens=False)]


def deployment(parser: str = "qwen3", **fields):
    return parse_deployment({"base": "fake/base", "experts": EXPERTS, "policies": POLICIES,
                             "reasoning_parser": parser, **fields})


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(deployment(), max_model_len=MAX_MODEL_LEN)


@pytest.fixture
def client(engine) -> TestClient:
    app = create_app(ServerSettings(config=Path("unused"), api_key=API_KEY), engine=engine)
    return TestClient(app, headers={"Authorization": f"Bearer {API_KEY}"})


def chat(client: TestClient, model: str, template: dict | None = THINKING, **fields):
    body = {"model": model, "messages": MESSAGES, **fields}
    if template is not None:
        body["chat_template_kwargs"] = template
    return client.post("/v1/chat/completions", json=body)


def vllm_reads(text: str, token_ids: list[int], parser: str = "qwen3", **template) -> tuple[str | None, str | None]:
    """(thinking, content) of a whole answer as vLLM's chat serving reads it with its own parser."""
    tokenizer = CharTokenizer()
    read = ParserManager.get_parser(reasoning_parser_name=parser, tokenizer=tokenizer)(
        tokenizer, None, chat_template_kwargs=template)
    request = VllmChatRequest.model_validate({"model": "chat", "messages": MESSAGES})
    reasoning, content, _ = read.parse(text, request, enable_auto_tools=True, model_output_token_ids=token_ids)
    return reasoning, content


def streamed(response) -> tuple[list[dict], str, str]:
    """The stream's choice chunks, and the thinking and content they add up to."""
    chunks = [json.loads(event) for event in sse_events(response)[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    return chunks, "".join(d.get("reasoning") or "" for d in deltas), "".join(d["content"] or "" for d in deltas)


def test_the_thinking_is_read_by_vllms_parser_whole_and_streamed(client):
    ids = answer_ids(CHAT_PROMPT, ROW)
    text = decode(ids)
    thought, content = vllm_reads(text, ids, **THINKING)
    assert (thought, content) == (text[:THOUGHT], text[THOUGHT + len("</think>"):])
    (choice,) = chat(client, "chat").json()["choices"]
    assert choice["message"] == {"role": "assistant", "reasoning": thought, "content": content}
    chunks, thinking, told = streamed(chat(client, "chat", stream=True))
    assert (thinking, told) == (thought, content)
    # A chunk per token after the role's but the end marker's, which vLLM's stream holds back too.
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]][1:]
    assert [(d.get("reasoning"), d["content"]) for d in deltas] == [(c, None) for c in thought] + [
        (None, c) for c in content]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("parser", ["qwen3", "deepseek_r1"])
def test_each_parser_reads_as_vllm_reads(parser):
    """The same answers through the server's parsing and vLLM's own (two of vLLM's parsers)."""
    tokenizer = CharTokenizer()
    parsing = admit_parsing("chat", Conversation(MESSAGES, template_kwargs=THINKING),
                            parser_class(deployment(parser), tokenizer), tokenizer, None)
    for ids in (answer_ids(CHAT_PROMPT, ROW), [ord(c) for c in "abc"], [END_THINK, ord("a")]):
        message, finish = parsing.message(parsing.parser(CHAT_PROMPT), decode(ids), ids, "stop")
        thought, content = vllm_reads(decode(ids), ids, parser, **THINKING)
        assert (message.reasoning, message.content, finish) == (thought, content or None, "stop")


def test_a_template_that_turns_thinking_off_answers_in_content_alone(client):
    (choice,) = chat(client, "chat", template={"enable_thinking": False}).json()["choices"]
    prompt = [*CHAT_PROMPT, *CharTokenizer().encode("</think>", add_special_tokens=False)]
    assert choice["message"] == {"role": "assistant", "content": answer(prompt, ROW)}  # no reasoning key
    _, thinking, told = streamed(chat(client, "chat", template={"enable_thinking": False}, stream=True))
    assert (thinking, told) == ("", answer(prompt, ROW))


def test_completions_do_not_parse_as_vllms_do_not(client):
    text = client.post("/v1/completions", json={"model": "chat", "prompt": "hi<think>"}).json()["choices"][0]["text"]
    assert "</think>" in text


def test_the_engine_is_told_where_a_grammar_starts_as_vllm_tells_it(client, engine):
    chat(client, "chat")
    kwargs = {"enable_thinking": True, "add_generation_prompt": True, "continue_final_message": False}
    assert engine.llm.hints == {"reasoning_ended": False, "reasoning_parser_kwargs": {"chat_template_kwargs": kwargs}}
    chat(client, "chat", template={"enable_thinking": False})
    assert engine.llm.hints["reasoning_ended"] is True


def test_a_stream_traces_every_token_the_thinking_and_its_end_too(client):
    chunks, _, _ = streamed(chat(client, "chat", stream=True, steering={"trace": True}))
    traced = [e for c in chunks if c["choices"] for e in c["choices"][0].get("trace") or ()]
    assert [e["token_id"] for e in traced] == answer_ids(CHAT_PROMPT, ROW)


def test_a_stream_with_logprobs_sends_the_end_markers_in_an_empty_delta_as_vllm_does(client):
    chunks, _, _ = streamed(chat(client, "chat", stream=True, logprobs=True))
    choices = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    tokens = [e["token"] for c in choices for e in c["logprobs"]["content"]]
    assert tokens == list(map(piece, answer_ids(CHAT_PROMPT, ROW)))
    assert choices[THOUGHT]["delta"] == {"role": None, "content": None}


def final_answer_probs() -> list[float]:
    """The fake's probabilities of the final answer's tokens: those after END_THINK."""
    return [token_prob(k) for k in range(THOUGHT + 1, ANSWER_LEN)]


def test_an_abstention_scores_the_final_answer_not_the_thinking(client):
    final_mean = sum(final_answer_probs()) / len(final_answer_probs())  # 0.185; every token's: 0.3675
    body = chat(client, "qa").json()  # threshold 0.2
    assert body["steering"]["abstention"]["raw"] == pytest.approx(final_mean) and body["steering"]["abstained"]
    answered = chat(client, "qa", steering={"abstain_threshold": 0.1}).json()
    assert answered["choices"][0]["message"]["reasoning"] == answer(CHAT_PROMPT, ROW)[:THOUGHT]
    evidence = chat(client, "qa", steering={"evidence": "score"}).json()["steering"]["evidence"]  # what a fit reads
    assert evidence["token_logprobs"] == pytest.approx([math.log(p) for p in final_answer_probs()])
    first = chat(client, "qa-first").json()["steering"]["abstention"]
    assert first["raw"] == pytest.approx(final_answer_probs()[0])
    # Thinking off: the whole answer is the final answer.
    off = chat(client, "qa", template={"enable_thinking": False}).json()["steering"]["abstention"]
    assert off["raw"] == pytest.approx(sum(map(token_prob, range(ANSWER_LEN))) / ANSWER_LEN)


def test_the_base_alone_reads_the_thinking_as_context_of_the_first_step(client):
    body = chat(client, "qa-base").json()
    # The fake gives a forced token probability label_prob(token, all-zero row): the final answer's first token.
    first_token = answer_ids(CHAT_PROMPT, ROW)[THOUGHT + 1]
    assert body["steering"]["abstention"]["raw"] == pytest.approx(label_prob(first_token, (0.0, 0.0)))


def test_an_abstention_withholds_the_thinking_too(client):
    withheld = chat(client, "qa", steering={"abstain_threshold": 0.9}).json()
    assert withheld["choices"][0]["message"] == {"role": "assistant", "content": "Pass."}
    chunks, thinking, told = streamed(chat(client, "qa", stream=True, steering={"abstain_threshold": 0.9}))
    assert (thinking, told) == ("", "Pass.") and chunks[-1]["steering"]["abstained"] is True
    _, thinking, told = streamed(chat(client, "qa", stream=True, steering={"abstain_threshold": 0.0}))
    assert thinking + "</think>" + told == decode(answer_ids(CHAT_PROMPT, ROW))


def test_an_answer_that_never_ends_its_thinking_has_no_final_answer_to_score(client):
    cut = chat(client, "qa", max_tokens=THOUGHT, steering={"abstain_threshold": 0.0}).json()
    assert cut["steering"]["abstention"]["raw"] == 0.0


def test_a_decision_needs_a_prompt_that_has_ended_the_thinking(client):
    assert_error(chat(client, "triage"), 400, type=INVALID, param="messages", code="invalid_request",
                 says="its prompt must end the thinking")
    decided = chat(client, "triage", template={"enable_thinking": False}).json()
    action = decided["steering"]["decision"]["action"]
    assert decided["choices"][0]["message"] == {"role": "assistant", "content": action}  # the label, not parsed
    refused = client.post("/v1/completions", json={"model": "triage", "prompt": "hi<think>"})
    assert_error(refused, 400, type=INVALID, param="prompt", code="invalid_request", says="must end the thinking")
    assert client.post("/v1/completions", json={"model": "triage", "prompt": "hi<think></think>"}).status_code == 200


def test_the_engine_gets_the_parser_as_vllm_serve_gives_it():
    """So that a grammar holds the final answer. (The config's refusals: tests/engine/test_config.py.)"""
    assert engine_args(deployment()).reasoning_parser == "qwen3"
    options = engine_args(deployment(engine={"structured_outputs_config": {"enable_in_reasoning": True}}))
    assert (options.structured_outputs_config.enable_in_reasoning, options.reasoning_parser) == (True, "qwen3")


def test_a_tokenizer_without_the_markers_is_refused_naming_the_field():
    """deepseek_r1 reads its markers as tokens (qwen3 reads them as text too)."""
    with pytest.raises(ConfigError, match="^reasoning_parser: vLLM's deepseek_r1 parser cannot read this base's"):
        parser_class(deployment("deepseek_r1"), train_tokenizer())


def test_tool_calls_are_read_after_the_thinking_only():
    """vLLM's tool parser reads what follows the thinking: a call written inside it is thinking
    (under deepseek_r1; qwen3's parser takes a call's opening tag for the thinking's end)."""
    tokenizer = train_tokenizer()
    tokenizer.add_tokens(["<think>", "</think>"])
    weather = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    parsing = admit_parsing("chat", Conversation(MESSAGES, tools=[weather]),
                            parser_class(deployment("deepseek_r1", tool_call_parser="hermes"), tokenizer),
                            tokenizer, None)
    call = '<tool_call>\n{"name": "weather", "arguments": {"city": "paris"}}\n</tool_call>'
    for text, thought, calls in ((f"the moon</think>{call}", "the moon", 1), (f"{call}</think>the moon", call, 0)):
        message, finish = parsing.message(parsing.parser([]), text, tokenizer.encode(text), "stop")
        assert (message.reasoning, len(message.tool_calls or ()), finish) == (
            thought, calls, "tool_calls" if calls else "stop")


def test_a_calibration_judges_a_chat_answer_by_its_final_answer(engine):
    """`steer calibrate` in process reads what the server shows: the content, the thinking apart."""
    admission = Admission(engine)
    conversation = Conversation(MESSAGES, template_kwargs=THINKING)
    plan = admission.admit(PolicyRequest("qa", conversation, max_tokens=ANSWER_LEN, collect="score"))
    (piece,), outcome = asyncio.run(run_to_end(engine, plan))
    text = decode(answer_ids(CHAT_PROMPT, ROW))
    assert piece.text == text and said(plan, piece) == text.split("</think>")[1]
    assert outcome.evidence.token_logprobs == pytest.approx([math.log(p) for p in final_answer_probs()])


def test_a_conversation_may_carry_an_earlier_thinking_as_vllm_takes_it(client):
    """An assistant turn sent back as the answer carried it (`reasoning`, or its older name)."""
    for name in ("reasoning", "reasoning_content"):
        turns = [*MESSAGES, {"role": "assistant", "content": "ab", name: "hm"}, {"role": "user", "content": "and?"}]
        assert chat(client, "chat", messages=turns).status_code == 200
    misplaced = [{"role": "user", "content": "hi", "reasoning": "hm"}]
    assert_error(chat(client, "chat", messages=misplaced), 400, type=INVALID, param="messages[0]",
                 code="invalid_value", says="reasoning belongs to assistant messages")
