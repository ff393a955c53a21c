"""The transformers reference on its own: batching must not change answers; sampling is seeded."""

from __future__ import annotations

import torch


def test_a_batch_answers_each_prompt_as_alone(llama_reference, tokenizer):
    prompts = [tokenizer.encode(text) for text in ("the moon", "every cat reads a long story", "our team builds")]
    alphas = [{}, {"chat": 2.5}, {"chat": -1.0, "code": 1.0}]
    batched = llama_reference.generate(prompts, alphas, max_tokens=12)
    assert batched == [llama_reference.generate([p], [a], max_tokens=12)[0] for p, a in zip(prompts, alphas)]


def test_sampling_is_reproducible_with_a_seed(llama_reference, tokenizer):
    prompts = [tokenizer.encode("the moon")] * 2
    alphas = [{"chat": 1.0}] * 2
    first = llama_reference.generate(prompts, alphas, max_tokens=16, temperature=1.0, seed=7)
    assert llama_reference.generate(prompts, alphas, max_tokens=16, temperature=1.0, seed=7) == first
    assert llama_reference.generate(prompts, alphas, max_tokens=16, temperature=1.0, seed=8) != first
    assert first[0] != first[1], "rows sample independently"


def test_teacher_forced_logprobs_match_the_first_step(llama_reference, tokenizer):
    prompt = tokenizer.encode("a river follows")
    alpha = {"chat": 1.5}
    (tokens,) = llama_reference.generate([prompt], [alpha], max_tokens=4)
    logprobs = llama_reference.completion_logprobs(prompt, tokens, alpha)
    first = llama_reference.next_token_logprobs([prompt], [alpha])[0]
    assert len(logprobs) == len(tokens)
    assert torch.isclose(torch.tensor(logprobs[0]), first[tokens[0]], atol=1e-6)
    assert first[tokens[0]] == first.max(), "greedy picks the most likely token"
