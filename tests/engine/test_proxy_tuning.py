"""The vLLM composite path against the transformers reference: greedy tokens equal, float32."""

from __future__ import annotations

import asyncio

import pytest
from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from steering.errors import InvalidRequest, InvalidSteering
from steering.scoring import next_token_logprobs

TEXTS = [
    "the model answers the question",
    "every cat reads a long story before noon.",
    "our team",
]


def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(text) for text in TEXTS]


def long_prompt(tokenizer, repeats: int) -> list[int]:
    """Longer than the 32-token prefill budget of `llama_engine`: it is prefilled in chunks."""
    return tokenizer.encode(" ".join(["the moon paints green tea in silence."] * repeats))


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.5, -1.0])
def test_alpha_matches_reference(llama_engine, llama_reference, tokenizer, alpha):
    batch = prompts(tokenizer)
    alphas = [{"chat": alpha}] * len(batch)
    got = llama_engine.greedy(batch, alphas)
    assert got == llama_reference.generate(batch, alphas, max_tokens=24)
    if alpha != 0.0:
        assert got != llama_engine.greedy(batch, [{}] * len(batch)), "steering changed nothing"


def test_two_pairs_with_different_alphas(llama_engine, llama_reference, tokenizer):
    batch = prompts(tokenizer)
    alphas = [{"chat": 1.5, "code": -0.5}] * len(batch)
    got = llama_engine.greedy(batch, alphas)
    assert got == llama_reference.generate(batch, alphas, max_tokens=24)
    assert got != llama_engine.greedy(batch, [{"chat": 1.5}] * len(batch)), "the second pair did nothing"


def test_mixed_batch_each_request_its_own_alpha(llama_engine, llama_reference, tokenizer):
    batch = prompts(tokenizer) * 2
    alphas = [{}, {"chat": 1.0}, {"code": 2.5}, {"chat": -1.0, "code": 1.0}, {"chat": 0.0}, {"chat": 2.5}]
    got = llama_engine.greedy(batch, alphas)
    assert got == llama_reference.generate(batch, alphas, max_tokens=24)
    # The same prompt under different alphas in one batch must not share a steering row.
    assert got[0] != got[3]


def test_qwen2_base_with_llama_experts(qwen2_engine, qwen2_reference, tokenizer):
    batch = prompts(tokenizer)
    alphas = [{}, {"chat": 1.0}, {"chat": 2.5}]
    got = qwen2_engine.greedy(batch, alphas)
    assert got == qwen2_reference.generate(batch, alphas, max_tokens=24)
    assert got[2] != qwen2_engine.greedy(batch[2:], [{}])[0]


def test_chunked_prefill(llama_engine, llama_reference, tokenizer):
    batch = [long_prompt(tokenizer, 6), long_prompt(tokenizer, 9)]
    assert all(len(p) > 32 for p in batch)
    alphas = [{"chat": 2.5}, {"code": -1.0}]
    assert llama_engine.greedy(batch, alphas) == llama_reference.generate(batch, alphas, max_tokens=24)


def test_prefix_cache_hit_serves_other_alphas(llama_engine, llama_reference, tokenizer):
    """Prompt KV is alpha-independent, so a cached prefix must steer correctly under new alphas."""
    prompt = long_prompt(tokenizer, 12)
    params = SamplingParams(max_tokens=16, temperature=0.0)
    for alpha in ({}, {"chat": 2.5}, {"chat": -1.0, "code": 1.0}):
        (output,) = llama_engine.outputs([prompt], [alpha], params)
        assert list(output.outputs[0].token_ids) == llama_reference.generate([prompt], [alpha], max_tokens=16)[0]
    assert output.num_cached_tokens > 0, "the repeated prompt did not hit the prefix cache"


def test_preemption_keeps_steering(tight_engine, llama_reference, tokenizer):
    from vllm.v1.metrics.reader import Counter, get_metrics_snapshot

    def preemptions() -> float:
        return sum(m.value for m in get_metrics_snapshot() if isinstance(m, Counter) and m.name == "vllm:num_preemptions")

    before = preemptions()
    batch = [long_prompt(tokenizer, 2)[: 20 + 3 * i] for i in range(8)]
    alphas = [{"chat": (i % 4) - 1.0, "code": 0.5 * (i % 3)} for i in range(8)]
    got = tight_engine.greedy(batch, alphas, max_tokens=48)
    assert preemptions() > before, "the tight KV cache forced no preemption"
    assert got == llama_reference.generate(batch, alphas, max_tokens=48)


def test_seeded_sampling_is_reproducible(llama_engine, tokenizer):
    batch = prompts(tokenizer)
    alphas = [{"chat": 1.0}] * len(batch)

    def sample(seed: int, alpha=alphas):
        params = SamplingParams(max_tokens=24, temperature=1.0, seed=seed)
        return [list(o.outputs[0].token_ids) for o in llama_engine.outputs(batch, alpha, params)]

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    assert sample(7, [{}] * len(batch)) != first, "sampling ignored the alpha"


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_are_of_the_steered_distribution_at_temperature_one(
    llama_engine, llama_reference, tokenizer, temperature
):
    prompt = prompts(tokenizer)[0]
    alpha = {"chat": 2.5, "code": 1.0}
    params = SamplingParams(max_tokens=1, temperature=temperature, seed=3, logprobs=5)
    (output,) = llama_engine.outputs([prompt], [alpha], params)
    logprobs = output.outputs[0].logprobs[0]
    want = llama_reference.next_token_logprobs([prompt], [alpha])[0]
    assert len(logprobs) >= 5
    for token_id, logprob in logprobs.items():
        assert logprob.logprob == pytest.approx(want[token_id].item(), abs=1e-4)


@pytest.mark.parametrize("cached", [False, True], ids=["all-at-once", "first-alone"])
def test_logprobs_of_chosen_next_tokens(llama_engine, llama_reference, tokenizer, cached):
    """Under one KV block (32 tokens here) nothing of the prompt can be cached, so the requests
    run together; over it, the first runs alone and the rest read the prompt from the cache."""
    engine = llama_engine.engine
    assert (engine.caches_prompt(32), engine.caches_prompt(33)) == (False, True)
    prompt = long_prompt(tokenizer, 5) if cached else prompts(tokenizer)[2]
    assert engine.caches_prompt(len(prompt)) is cached
    alpha = {"chat": -1.0}
    chosen = [5, 17, tokenizer.eos_token_id, 40, 5]  # the end of text too, and one twice
    got, first = llama_engine.run(next_token_logprobs(engine, prompt, chosen, llama_engine.steering(alpha).alpha_row))
    want = llama_reference.next_token_logprobs([prompt], [alpha])[0]
    assert list(got) == [5, 17, tokenizer.eos_token_id, 40], "each token once, in the order asked"
    assert list(got.values()) == pytest.approx([want[t].item() for t in got], abs=1e-4)
    assert first.outputs[0].token_ids == [5] and first.prompt_logprobs is None


def test_chosen_token_ids_in_sampling_params_are_refused(llama_engine, tokenizer):
    params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=[5, 17])
    with pytest.raises(InvalidRequest) as refused:
        llama_engine.run(llama_engine.engine.complete(prompts(tokenizer)[0], params, alpha_row=(0.0, 0.0)))
    assert refused.value.param == "logprob_token_ids" and "engine step" in str(refused.value)


def test_top_logprobs_survive_a_step_shared_with_chosen_token_logprobs(llama_engine, llama_reference, tokenizer):
    """vLLM 0.32's sampler, asked for `logprob_token_ids`, answers every request of the step with
    them; chosen tokens' logprobs come from forced samples instead, and top logprobs beside them hold."""
    prompt = prompts(tokenizer)[0]
    alpha = {"chat": 2.5}
    steering = llama_engine.steering(alpha)
    top = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5)
    chosen = [5, 17, 40]

    async def interleaved():
        return await asyncio.gather(*(
            next_token_logprobs(llama_engine.engine, prompt, chosen, steering.alpha_row) if i % 2
            else llama_engine.engine.complete(prompt, top, alpha_row=steering.alpha_row) for i in range(16)))

    outputs = llama_engine.run(interleaved())
    reference = llama_reference.next_token_logprobs([prompt], [alpha])[0]
    want = reference.topk(5)
    for output in outputs[::2]:  # the top-logprobs requests
        got = output.outputs[0].logprobs[0]
        assert {token: got[token].logprob for token in want.indices.tolist() if token in got} == pytest.approx(
            dict(zip(want.indices.tolist(), want.values.tolist())), abs=1e-4), "a top-5 token is missing or wrong"
    for found, _ in outputs[1::2]:
        assert list(found.values()) == pytest.approx([reference[t].item() for t in chosen], abs=1e-4)


def test_prompt_logprobs_are_steered_per_request_across_chunks(llama_engine, llama_reference, tokenizer):
    """vLLM's runner computes prompt logprobs from one request's slice of the step's rows; each is
    steered by its own request's alphas, chunk after chunk, beside a request that only decodes."""
    asks = [  # (prompt, alpha, prompt_logprobs): the decoding one first, so it takes batch index 0
        (prompts(tokenizer)[1], {"code": 2.5}, None),
        (long_prompt(tokenizer, 7), {"chat": 2.5, "code": -1.0}, 2),
        (prompts(tokenizer)[0] + long_prompt(tokenizer, 5), {"chat": -1.0}, 0),
    ]
    assert len(asks[1][0]) > 32 and len(asks[2][0]) > 32, "prefilled in several chunks"
    for prompt, _, _ in asks:
        llama_engine.engine.check_request(prompt, SamplingParams(max_tokens=2, prompt_logprobs=2))

    async def together():
        return await asyncio.gather(*(llama_engine.engine.complete(
            prompt, SamplingParams(max_tokens=16 if k is None else 2, temperature=0.0, prompt_logprobs=k),
            alpha_row=llama_engine.steering(alpha).alpha_row) for prompt, alpha, k in asks))

    outputs = llama_engine.run(together())
    assert outputs[0].prompt_logprobs is None
    for output, (prompt, alpha, k) in zip(outputs[1:], asks[1:]):
        got = output.prompt_logprobs
        assert got[0] is None and len(got) == len(prompt)
        want = llama_reference.prompt_logprobs(prompt, alpha)
        assert [step[token].logprob for step, token in zip(got[1:], prompt[1:])] == pytest.approx(want, abs=1e-4)
        assert all(len(step) in (k, k + 1) for step in got[1:]), "the top k, and the prompt's own token"
        unsteered = llama_reference.prompt_logprobs(prompt, {})
        assert max(abs(a - b) for a, b in zip(want, unsteered)) > 0.1, "the alphas matter here"


def test_streamed_deltas_add_up(llama_engine, llama_reference, tokenizer):
    prompt = prompts(tokenizer)[1]
    alpha = {"chat": 2.5}
    params = SamplingParams(max_tokens=12, temperature=0.0, output_kind=RequestOutputKind.DELTA)

    async def stream():
        return [list(o.outputs[0].token_ids) async for o in llama_engine.engine.generate(
            prompt, params, alpha_row=llama_engine.steering(alpha).alpha_row)]

    chunks = llama_engine.run(stream())
    assert len(chunks) > 1
    assert sum(chunks, []) == llama_reference.generate([prompt], [alpha], max_tokens=12)[0]


def test_unknown_pair_is_refused(llama_engine, tokenizer):
    with pytest.raises(InvalidSteering, match="unknown expert pair"):
        llama_engine.greedy(prompts(tokenizer)[:1], [{"poetry": 1.0}])


def test_prompt_beyond_context_is_refused(llama_engine):
    with pytest.raises(InvalidRequest, match="context"):
        llama_engine.greedy([[5] * 300], [{}])
    with pytest.raises(InvalidRequest, match="max_tokens"):
        llama_engine.greedy([[5] * 200], [{}], max_tokens=100)


def test_a_request_the_engine_cannot_take_leaves_nothing_unfinished(llama_engine, tokenizer):
    """vLLM registers a request before its engine core takes it; a seed past 64 bits fails in
    between, and used to stay unfinished forever (the server refuses such seeds at the door too)."""
    params = SamplingParams(max_tokens=4, temperature=1.0, seed=2**64)
    for _ in range(2):
        with pytest.raises(Exception):  # noqa: B017 - whatever vLLM raises; the point is what is left
            llama_engine.outputs(prompts(tokenizer)[:1], [{"chat": 1.0}], params)
    assert llama_engine.engine.num_unfinished_requests == 0
    assert len(llama_engine.greedy(prompts(tokenizer)[:1], [{"chat": 1.0}], max_tokens=4)[0]) == 4, "it still serves"
