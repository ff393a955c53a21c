"""A reasoning base on the real `steer serve` (real vLLM engine, vLLM's qwen3 parser), through the
`openai` package: the thinking, whole and streamed, as vLLM's own parser reads the same text, on a
plain and a steered policy, the steered text the transformers reference's; what an abstention
scores; where a decision is taken. (The protocol's breadth, over the fake engine: test_reasoning.py.)

The fixture's random models never end a thinking on their own, so a grammar makes them: vLLM's
`structured_outputs_config.enable_in_reasoning` holds the thinking to it too, and the fixture
tokenizer spells the end marker one way only, its token."""

from __future__ import annotations

import math

import pytest
import regex
import yaml
from steering_tools.fixtures import THINKING_FAMILY, build_family, train_thinking_tokenizer
from steering_tools.reference import ReferenceSteerer
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChatRequest
from vllm.parser.parser_manager import ParserManager
from vllm.tokenizers import get_tokenizer

from tests.live_server import start_server, stop_server

MESSAGES = [{"role": "user", "content": "the model answers the question"}]
THOUGHT_THEN_ANSWER = r"[a-z ]{1,24}</think>[a-z ]{1,24}"
ALPHA = {"base": {}, "chat": {"chat": 2.0}}
LABELS = ["yes", "no"]


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict:
    return build_family(THINKING_FAMILY, tmp_path_factory.mktemp("thinking-family"),
                        tokenizer=train_thinking_tokenizer())


@pytest.fixture(scope="module")
def tokenizer(family):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(family["base"])


@pytest.fixture(scope="module")
def reference(family) -> ReferenceSteerer:
    return ReferenceSteerer(family["base"], {name: (p["tuned"], p["untuned"]) for name, p in family["experts"].items()})


@pytest.fixture(scope="module")
def server(family, tmp_path_factory):
    root = tmp_path_factory.mktemp("thinking-server")
    config = {
        "base": family["base"], "experts": family["experts"],
        "policies": {
            "base": {},
            "chat": {"alpha": ALPHA["chat"]},
            "qa": {"alpha": ALPHA["chat"], "abstain": {"score": "mean_prob", "threshold": 0.0}},
            "triage": {"alpha": ALPHA["chat"], "decision": {"labels": LABELS, "cost_fp": 1.0, "cost_fn": 1.0}},
        },
        "engine": {"dtype": "float32", "max_model_len": 256, "enforce_eager": True,
                   "kv_cache_memory_bytes": 64 * 2**20, "structured_outputs_config": {"enable_in_reasoning": True}},
        "reasoning_parser": "qwen3",
    }
    (root / "deploy.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    running = start_server(root / "deploy.yaml", root / "server.log")
    yield running
    stop_server(running)


def thought_greedy(reference, tokenizer, prompt, alpha) -> tuple[list[int], list[float]]:
    """Greedy over the reference's steered logits, each step restricted to the tokens that keep the
    text a prefix of THOUGHT_THEN_ANSWER, and to EOS once it matches: what the grammar allows. And
    each token's log-probability over those tokens (vLLM masks the logits before it reads them)."""
    pieces = {t: tokenizer.decode([t]) for t in range(len(tokenizer)) if t not in tokenizer.all_special_ids}
    outputs, logprobs, text = [[]], [], ""
    for logits in reference.steered_logits([prompt], [alpha], outputs, 64):
        allowed = [t for t, piece in pieces.items() if regex.fullmatch(THOUGHT_THEN_ANSWER, text + piece, partial=True)]
        allowed += [tokenizer.eos_token_id] if regex.fullmatch(THOUGHT_THEN_ANSWER, text) else []
        masked = logits[0, allowed].log_softmax(dim=-1)  # [len(allowed)]
        best = int(masked.argmax())
        outputs[0].append(allowed[best])
        logprobs.append(masked[best].item())
        if outputs[0][-1] == tokenizer.eos_token_id:
            break
        text += pieces[outputs[0][-1]]
    return outputs[0], logprobs


def vllm_reads(family, text: str, token_ids: list[int], **template) -> tuple[str | None, str | None]:
    """(thinking, content) as vLLM's chat serving reads a whole answer with its qwen3 parser."""
    tokenizer = get_tokenizer(family["base"])
    parser = ParserManager.get_parser(reasoning_parser_name="qwen3", tokenizer=tokenizer)(
        tokenizer, None, chat_template_kwargs={"add_generation_prompt": True, **template})
    request = VllmChatRequest.model_validate({"model": "chat", "messages": MESSAGES})
    reasoning, content, _ = parser.parse(text, request, enable_auto_tools=False, model_output_token_ids=token_ids)
    return reasoning, content


def prompt_ids(tokenizer, **template) -> list[int]:
    return tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False,
                                         **template)


@pytest.mark.parametrize("policy", ["base", "chat"])
def test_the_thinking_is_read_as_vllm_reads_it_whole_and_streamed(server, family, tokenizer, reference, policy):
    ids, _ = thought_greedy(reference, tokenizer, prompt_ids(tokenizer), ALPHA[policy])
    text = tokenizer.decode(ids, skip_special_tokens=True)
    thought, content = vllm_reads(family, text, ids)
    assert thought and content and thought + "</think>" + content == text
    fields = {"model": policy, "messages": MESSAGES, "temperature": 0.0, "max_tokens": 64,
              "extra_body": {"structured_outputs": {"regex": THOUGHT_THEN_ANSWER}}}
    client = server.openai()
    message = client.chat.completions.create(**fields).choices[0].message
    assert (message.reasoning, message.content) == (thought, content)
    chunks = list(client.chat.completions.create(**fields, stream=True))
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == thought
    assert "".join(d.content or "" for d in deltas) == content
    assert chunks[-1].steering["policy"] == policy


def test_an_answer_sent_back_with_its_thinking_is_taken_as_vllm_takes_it(server):
    """The openai package sends an answer's message back as it came, `reasoning` and all."""
    client = server.openai()
    first = client.chat.completions.create(model="chat", messages=MESSAGES, temperature=0.0, max_tokens=64,
                                           extra_body={"structured_outputs": {"regex": THOUGHT_THEN_ANSWER}})
    turns = [*MESSAGES, first.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "why"}]
    assert "reasoning" in turns[1]
    again = client.chat.completions.create(model="chat", messages=turns, temperature=0.0, max_tokens=8)
    assert again.choices[0].finish_reason in ("stop", "length")


def test_thinking_turned_off_answers_in_content_alone(server, family, tokenizer, reference):
    off = {"enable_thinking": False}
    (ids,) = reference.generate([prompt_ids(tokenizer, **off)], [ALPHA["chat"]], max_tokens=16)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert vllm_reads(family, text, ids, **off) == (None, text)
    message = server.openai().chat.completions.create(
        model="chat", messages=MESSAGES, temperature=0.0, max_tokens=16,
        extra_body={"chat_template_kwargs": off}).choices[0].message
    assert (getattr(message, "reasoning", None), message.content) == (None, text)


def test_an_abstention_scores_the_final_answer_after_the_thinking(server, tokenizer, reference):
    prompt = prompt_ids(tokenizer)
    ids, logprobs = thought_greedy(reference, tokenizer, prompt, ALPHA["chat"])
    want = logprobs[ids.index(tokenizer.convert_tokens_to_ids("</think>")) + 1:]  # the final answer's, EOS included
    response = server.openai().chat.completions.create(
        model="qa", messages=MESSAGES, temperature=0.0, max_tokens=64,
        extra_body={"structured_outputs": {"regex": THOUGHT_THEN_ANSWER}, "steering": {"evidence": "score"}})
    assert response.steering["evidence"]["token_logprobs"] == pytest.approx(want, abs=1e-4)
    scored = server.openai().chat.completions.create(
        model="qa", messages=MESSAGES, temperature=0.0, max_tokens=64,
        extra_body={"structured_outputs": {"regex": THOUGHT_THEN_ANSWER}})
    assert scored.steering["abstention"]["raw"] == pytest.approx(sum(map(math.exp, want)) / len(want), abs=1e-4)


def test_a_decision_is_taken_where_the_prompt_ended_the_thinking(server):
    client = server.http()
    thinking = client.post("/v1/chat/completions", json={"model": "triage", "messages": MESSAGES})
    assert thinking.status_code == 400 and thinking.json()["error"]["param"] == "messages"
    decided = client.post("/v1/chat/completions", json={"model": "triage", "messages": MESSAGES,
                                                        "chat_template_kwargs": {"enable_thinking": False}})
    assert decided.status_code == 200 and decided.json()["choices"][0]["message"]["content"] in LABELS
