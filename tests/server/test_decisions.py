"""Decision and abstention policies through the API, checked by hand and against the reference."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from steering.rules.abstention import familiarity_profile
from tests.live_server import CALIBRATED_TEMPERATURE, CLAIM_LABELS, LABELS, MAX_MODEL_LEN, PROFILE_WEIGHTS, ZERO_ONE

MESSAGES = [{"role": "user", "content": "every cat reads a long story"}]
ALPHA = {"chat": 1.0}


def chat_ids(tokenizer) -> list[int]:
    return tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)


def label_ids(tokenizer) -> list[int]:
    return [tokenizer.encode(label, add_special_tokens=False)[0] for label in LABELS]


def ask(server, policy: str, steering: dict | None = None, extra: dict | None = None, **fields):
    body = (extra or {}) | ({"steering": steering} if steering else {})
    return server.openai().chat.completions.create(model=policy, messages=MESSAGES, extra_body=body, **fields)


def softmax(z):
    e = np.exp(np.asarray(z) - np.max(z))
    return e / e.sum()


def test_label_probabilities_equal_the_reference(server, llama_reference, tokenizer):
    decision = ask(server, "triage").steering["decision"]
    logprobs = llama_reference.next_token_logprobs([chat_ids(tokenizer)], [ALPHA])[0][label_ids(tokenizer)].numpy()
    assert [decision["probabilities"][label] for label in LABELS] == pytest.approx(softmax(logprobs).tolist(), abs=1e-4)
    assert decision["label_mass"] == pytest.approx(float(np.exp(logprobs).sum()), abs=1e-4)


def test_calibration_temperature_is_applied(server):
    decision = ask(server, "triage-calibrated").steering["decision"]
    raw = np.array([decision["probabilities"][label] for label in LABELS])
    want = softmax(np.log(raw) / CALIBRATED_TEMPERATURE)
    assert [decision["calibrated"][label] for label in LABELS] == pytest.approx(want.tolist(), abs=1e-9)
    assert decision["temperature"] == CALIBRATED_TEMPERATURE


def by_hand(decision: dict, costs, abstain_cost=None) -> tuple[dict, str]:
    p = np.array([decision["calibrated"][label] for label in LABELS])
    rows = [list(row) for row in costs] + ([[abstain_cost] * len(LABELS)] if abstain_cost is not None else [])
    expected = np.array(rows) @ p
    actions = LABELS + (["abstain"] if abstain_cost is not None else [])
    return dict(zip(actions, expected.tolist())), actions[int(np.argmin(expected))]


def test_the_action_is_the_hand_computed_bayes_action(server):
    plain = ask(server, "triage-calibrated")
    decision = plain.steering["decision"]
    p = [decision["calibrated"][label] for label in LABELS]
    top = int(np.argmax(p))
    # Acting on the likeliest label is made ruinous when wrong, so Bayes must pick another one.
    ruinous = [row[:] for row in ZERO_ONE]
    ruinous[top] = [0 if j == top else 100 for j in range(3)]
    # Under 0-1 costs every label's expected cost is at least 1 - max p: half that makes abstaining win.
    cheap = (1 - max(ask(server, "triage").steering["decision"]["calibrated"].values())) / 2
    matrices = [(ZERO_ONE, None), (ruinous, None), (ZERO_ONE, cheap), ([[0, 5, 2], [3, 0, 4], [1, 1, 0]], 50)]
    actions = []
    for costs, abstain_cost in matrices:
        steering = {"costs": costs} | ({"abstain_cost": abstain_cost} if abstain_cost is not None else {})
        response = ask(server, "triage" if abstain_cost is not None else "triage-calibrated", steering)
        reported = response.steering["decision"]
        expected, action = by_hand(reported, costs, abstain_cost)
        assert reported["expected_costs"] == pytest.approx(expected)
        assert reported["action"] == action
        assert response.steering["abstained"] == (action == "abstain")
        want_text = "I don't know." if action == "abstain" else action
        assert response.choices[0].message.content == want_text
        actions.append(action)
    assert actions[0] == LABELS[top], "with 0-1 costs the Bayes action is the argmax"
    assert actions[1] != LABELS[top], "the ruinous matrix must move the decision off the argmax"
    assert actions[2] == "abstain", "cheap abstaining beats every label under 0-1 costs"
    assert plain.steering["confidence"] == pytest.approx(max(p))


CLAIM = " every cat"


def test_a_claim_is_scored_as_the_reference_scores_it(server, llama_reference, tokenizer):
    prompt, claim = chat_ids(tokenizer), tokenizer.encode(CLAIM, add_special_tokens=False)
    # The claim's tokens teacher-forced, then any token that ends an answer.
    ends = sorted(set(llama_reference.eos_token_ids) | {tokenizer.eos_token_id})
    said = sum(llama_reference.completion_logprobs(prompt, claim, ALPHA))
    end = torch.logsumexp(llama_reference.next_token_logprobs([prompt + claim], [ALPHA])[0][ends].double(), 0)
    response = ask(server, "check", {"claim": CLAIM})
    decision = response.steering["decision"]
    assert (decision["claim"], decision["labels"]) == (CLAIM, CLAIM_LABELS)
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(prompt) + len(claim), 1), \
        "the claim is input the engine reads"
    assert decision["claim_logprob"] == pytest.approx(said + float(end), abs=1e-4)
    p = math.exp(decision["claim_logprob"])
    assert [decision["probabilities"][label] for label in CLAIM_LABELS] == pytest.approx([p, 1 - p], rel=1e-9)
    assert decision["label_mass"] == pytest.approx(1.0)
    assert (decision["action"], response.choices[0].message.content) == ("false", "false"), \
        "an unlikely claim is not the answer when a false yes costs 4"


def test_a_claim_check_takes_the_hand_computed_bayes_action(server):
    p = math.exp(ask(server, "check", {"claim": CLAIM}).steering["decision"]["claim_logprob"])
    # Acting "true" costs c_fp (1 - p), "false" costs c_fn p: "true" iff c_fp < c_fn p / (1 - p).
    for scale, want in ((0.5, "true"), (2.0, "false")):
        fp = scale * p / (1 - p)
        response = ask(server, "check", {"claim": CLAIM, "costs": [[0, fp], [1, 0]]})
        decision = response.steering["decision"]
        assert decision["expected_costs"] == pytest.approx({"true": fp * (1 - p), "false": p}, rel=1e-6)
        assert decision["action"] == response.choices[0].message.content == want
        assert response.steering["confidence"] == pytest.approx(max(p, 1 - p))


def test_the_claim_is_what_is_scored(server):
    one = ask(server, "check", {"claim": CLAIM}).steering["decision"]["claim_logprob"]
    other = ask(server, "check", {"claim": " a long story"}).steering["decision"]["claim_logprob"]
    assert one != other
    assert ask(server, "check", {"claim": CLAIM}).steering["decision"]["claim_logprob"] == pytest.approx(one, abs=1e-6)


def test_a_decision_streams_as_one_answer(server):
    plain = ask(server, "triage")
    chunks = list(ask(server, "triage", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert chunks[-1].steering["decision"] == plain.steering["decision"]


def test_abstention_switches_exactly_at_the_threshold(server, llama_reference, tokenizer):
    answer = ask(server, "qa", max_tokens=12, temperature=0.0)
    report = answer.steering["abstention"]
    assert answer.steering["abstained"] is False
    # The score is known from the reference: the mean steered probability of the answer's tokens.
    (tokens,) = llama_reference.generate([chat_ids(tokenizer)], [ALPHA], max_tokens=12)
    reference_score = float(np.mean(np.exp(llama_reference.completion_logprobs(chat_ids(tokenizer), tokens, ALPHA))))
    assert report["raw"] == pytest.approx(reference_score, abs=1e-4)
    assert report["confidence"] == report["raw"], "uncalibrated: confidence is the raw score"
    at = ask(server, "qa", {"abstain_threshold": report["confidence"]}, max_tokens=12, temperature=0.0)
    above = ask(server, "qa", {"abstain_threshold": math.nextafter(report["confidence"], 1.0)}, max_tokens=12,
                temperature=0.0)
    assert at.steering["abstained"] is False
    assert at.choices[0].message.content == answer.choices[0].message.content
    assert above.steering["abstained"] is True
    assert above.choices[0].message.content == "I don't know."
    assert above.steering["abstention"]["threshold"] == math.nextafter(report["confidence"], 1.0)


def test_the_score_is_at_temperature_one_whatever_the_sampling_temperature(server):
    hot = ask(server, "qa-first", max_tokens=1, temperature=1.7, seed=5, logprobs=True)
    first = hot.choices[0].logprobs.content[0]
    assert hot.steering["abstention"]["raw"] == pytest.approx(math.exp(first.logprob), abs=1e-6)
    # The logprob itself is of the steered distribution at temperature 1 (see the engine tests).


def test_ensemble_scores_equal_the_reference(server, llama_reference, tokenizer):
    prompt = chat_ids(tokenizer)
    steered = llama_reference.next_token_logprobs([prompt], [ALPHA])[0].double()
    base = llama_reference.next_token_logprobs([prompt], [{}])[0].double()
    ranked = steered.sort(descending=True)
    assert ranked.values[19] - ranked.values[20] > 1e-3, "the fixture's top 20 is not a near tie"
    top = ranked.indices[:20]
    first = int(ranked.indices[0])  # greedy
    want = {"qa-base": float(base[first].exp()),
            "qa-agree": float(torch.minimum(steered[top].exp(), base[top].exp()).sum()),
            "qa-familiar": float(np.exp(np.mean(llama_reference.prompt_logprobs(prompt, {})))),
            # The fitted score by hand: its weights on the profile of the base alone's prompt logprobs.
            "qa-profile": 1 / (1 + math.exp(-(familiarity_profile(llama_reference.prompt_logprobs(prompt, {}))
                                              @ PROFILE_WEIGHTS[:-1] + PROFILE_WEIGHTS[-1])))}
    plain = ask(server, "chat", max_tokens=6, temperature=0.0).choices[0].message.content
    for policy, score in want.items():
        answer = ask(server, policy, max_tokens=6, temperature=0.0)
        assert answer.steering["abstention"]["raw"] == pytest.approx(score, abs=1e-4), policy
        if policy == "qa-profile":  # its calibration file's Platt map, by hand
            assert answer.steering["abstention"]["confidence"] == pytest.approx(
                1 / (1 + (1 / score - 1) ** 1.5 * math.exp(0.2)), abs=1e-4)
        assert answer.choices[0].message.content == plain, "the extra base request leaves the answer as it was"


def test_ensemble_scores_decide_at_the_first_token(server):
    usage = {"stream": True, "stream_options": {"include_usage": True}, "temperature": 0.0}
    live = list(ask(server, "qa-agree", extra={"ignore_eos": True}, max_tokens=12, **usage))
    assert len([c for c in live if c.choices and c.choices[0].delta.content]) > 1, "streams live after token one"
    stopped = list(ask(server, "qa-base", {"abstain_threshold": 1.0}, extra={"ignore_eos": True}, max_tokens=200,
                       **usage))
    assert stream_text(stopped) == "I don't know."
    assert stopped[-1].steering["abstention"]["score"] == "base_prob"
    assert stopped[-1].usage.completion_tokens < 200, "abstaining after the first token stops the generation"


def test_an_agreement_policy_returns_the_logprobs_asked_for(server):
    # The engine is asked for the top 20 (the score reads them); the client gets its 2.
    answer = ask(server, "qa-agree", max_tokens=4, temperature=0.0, logprobs=True, top_logprobs=2)
    assert all(len(token.top_logprobs) == 2 for token in answer.choices[0].logprobs.content)


def stream_text(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_abstaining_in_a_stream_sends_only_the_message(server):
    chunks = list(ask(server, "qa", {"abstain_threshold": 1.0}, max_tokens=12, temperature=0.0, stream=True,
                      stream_options={"include_usage": True}))
    assert stream_text(chunks) == "I don't know."
    assert chunks[-1].steering["abstained"] is True


def test_mean_prob_holds_the_answer_until_the_end(server):
    full = ask(server, "qa", max_tokens=12, temperature=0.0)
    chunks = list(ask(server, "qa", max_tokens=12, temperature=0.0, stream=True))
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 1, "the answer is released in one piece once its score is known"
    assert stream_text(chunks) == full.choices[0].message.content
    assert chunks[-1].steering["abstention"] == full.steering["abstention"]


def test_first_prob_decides_early_then_streams_or_stops(server):
    usage = {"stream": True, "stream_options": {"include_usage": True}, "temperature": 0.0}
    live = list(ask(server, "qa-first", extra={"ignore_eos": True}, max_tokens=12, **usage))
    assert len([c for c in live if c.choices and c.choices[0].delta.content]) > 1, "streams live after token one"
    assert live[-1].usage.completion_tokens == 12
    stopped = list(ask(server, "qa-first", {"abstain_threshold": 1.0}, extra={"ignore_eos": True}, max_tokens=200,
                       **usage))
    assert stream_text(stopped) == "Pass."
    assert stopped[-1].usage.completion_tokens < 200, "abstaining after the first token stops the generation"


@pytest.mark.parametrize(
    ("policy", "steering", "fields", "param", "text"),
    [
        ("qa", {"abstain_threshold": 1.5}, {}, "steering.abstain_threshold", "outside this policy's bounds"),
        ("chat", {"abstain_threshold": 0.5}, {}, "steering.abstain_threshold", "does not abstain"),
        ("triage", {"costs": [[0, 1], [1, 0]]}, {}, "steering.costs", "3 x 3"),
        ("triage", {"costs": [[0, 1, 1], [1, 0, 1], [1, 1, 101]]}, {}, "steering.costs", "outside this policy's bounds"),
        ("chat", {"costs": ZERO_ONE}, {}, "steering.costs", "makes no decisions"),
        ("triage-calibrated", {"abstain_cost": 0.5}, {}, "steering.abstain_cost", "no abstain action"),
        ("triage", None, {"n": 2, "temperature": 1.0}, "n", "one choice"),
        ("triage", None, {"logprobs": True}, "logprobs", "decision policies"),
        ("check", None, {}, "steering.claim", "give steering.claim"),
        ("check", {"claim": " \t "}, {}, "steering.claim", "the claim is empty"),
        ("check", {"claim": " cat" * MAX_MODEL_LEN}, {}, "steering.claim", "no room for the answer's end"),
        ("triage", {"claim": " yes"}, {}, "steering.claim", "does not check claims"),
        ("qa", {"claim": " yes"}, {}, "steering.claim", "does not check claims"),
    ],
)
def test_rule_overrides_are_refused_out_of_bounds(server, policy, steering, fields, param, text):
    body = {"model": policy, "messages": MESSAGES, **fields} | ({"steering": steering} if steering else {})
    with server.http() as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert text in error["message"]


def test_decisions_and_abstentions_are_counted(server):
    abstained = server.metric("steer_abstentions_total", policy="qa")
    ask(server, "qa", {"abstain_threshold": 1.0}, max_tokens=4)
    assert server.metric("steer_abstentions_total", policy="qa") == abstained + 1
    decided = server.metric("steer_decisions_total", policy="triage")
    response = ask(server, "triage")
    action = response.steering["decision"]["action"]
    assert server.metric("steer_decisions_total", policy="triage", action=action) >= 1
    assert server.metric("steer_decisions_total", policy="triage") == decided + 1
    assert json.dumps(response.steering)  # the block is plain JSON
