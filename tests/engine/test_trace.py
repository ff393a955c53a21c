"""`steering.trace` on the live engine: every number equals the transformers reference (float32),
whole or streamed, and tracing changes nothing of the answer."""

from __future__ import annotations

import pytest
from vllm.sampling_params import RequestOutputKind

from steering.admission import PolicyRequest
from steering.errors import InvalidRequest
from steering.kinds import Outcome, joined
from steering.policy import Overrides
from steering.trace import traced

PROMPTS = ["every cat reads a long story before noon.", "our team"]
TOLERANCE = 1e-4


def run_traced(live, prompt: str, alpha: dict, *, stream: bool = False, max_tokens: int = 12, policy: str = "any"):
    """The plan's whole pieces (their trace joined), and how many pieces were traced."""
    sampling = {"temperature": 0.0, "output_kind": RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY}
    plan = live.admission.admit(PolicyRequest(policy, [prompt], overrides=Overrides(alpha=alpha), sampling=sampling,
                                              max_tokens=max_tokens, trace=True))

    async def collect():
        return [item async for item in traced(live.engine, plan, plan.rule.run(live.engine, plan))
                if not isinstance(item, Outcome)]

    pieces = live.run(collect())
    return plan, joined(pieces), len(pieces)


def assert_equals_reference(trace, reference_trace, pairs):
    assert [e.token_id for e in trace] == [r["token_id"] for r in reference_trace]
    for entry, expected in zip(trace, reference_trace):
        assert entry.logprob == pytest.approx(expected["logprob"], abs=TOLERANCE)
        assert entry.base_logprob == pytest.approx(expected["base_logprob"], abs=TOLERANCE)
        assert set(entry.contributions) == set(pairs)
        for pair in pairs:
            assert entry.contributions[pair] == pytest.approx(expected["contributions"][pair], abs=TOLERANCE)
        if expected["flip"] is None:
            assert entry.flip is None
        else:
            assert entry.flip.token_id == expected["flip"]["token_id"]
            assert entry.flip.base_logprob == pytest.approx(expected["flip"]["base_logprob"], abs=TOLERANCE)


@pytest.mark.parametrize(("family", "alpha"), [
    ("llama", {"chat": 1.5, "code": -0.75}),  # Llama base; a Llama pair and a Qwen2 pair with a padded vocabulary
    ("qwen2", {"chat": 2.0}),  # Qwen2 base; a Llama pair with other head counts
])
def test_trace_equals_the_reference(request, tokenizer, family, alpha):
    live, reference = request.getfixturevalue(f"{family}_engine"), request.getfixturevalue(f"{family}_reference")
    prompt = PROMPTS[0]
    plan, (whole,), _ = run_traced(live, prompt, alpha)
    assert list(whole.token_ids) == live.greedy([prompt], [alpha], max_tokens=12)[0], "tracing changed the answer"
    assert_equals_reference(whole.trace, reference.trace(plan.prompts[0], whole.token_ids, alpha), alpha)
    assert [e.token for e in whole.trace] == [tokenizer.decode([e.token_id]) for e in whole.trace]
    assert any(e.flip is not None for e in whole.trace), "steering flipped no token: the test shows nothing"
    for e in whole.trace:
        if e.flip is not None:
            assert e.flip.base_logprob > e.base_logprob and e.flip.token == tokenizer.decode([e.flip.token_id])


def test_a_streamed_trace_comes_piece_by_piece_and_equals_the_whole(llama_engine, llama_reference):
    alpha = {"chat": 2.5}
    plan, (whole,), num_pieces = run_traced(llama_engine, PROMPTS[1], alpha, stream=True, max_tokens=16)
    assert num_pieces > 1, "the stream came in one piece: nothing was traced piece by piece"
    assert len(whole.trace) == len(whole.token_ids)
    assert_equals_reference(whole.trace, llama_reference.trace(plan.prompts[0], whole.token_ids, alpha), alpha)


def test_a_pair_at_alpha_zero_contributes_nothing_and_is_not_read(llama_engine, llama_reference):
    alpha = {"chat": 0.0, "code": 1.0}
    plan, (whole,), _ = run_traced(llama_engine, PROMPTS[1], alpha)
    assert all(set(e.contributions) == {"code"} for e in whole.trace)
    assert_equals_reference(whole.trace, llama_reference.trace(plan.prompts[0], whole.token_ids, alpha), {"code"})


def test_a_trace_needs_a_position_after_the_answer(llama_engine):
    prompt = PROMPTS[1]
    room = llama_engine.engine.max_model_len - len(llama_engine.engine.prompts.encode(prompt))
    with pytest.raises(InvalidRequest) as refused:
        run_traced(llama_engine, prompt, {"chat": 1.0}, max_tokens=room)
    assert refused.value.param == "max_tokens" and "no room to trace" in str(refused.value)
