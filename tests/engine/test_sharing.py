"""Pairs that share a checkpoint (fine-tunes of one small model share its untuned version)."""

from __future__ import annotations

import pytest
from steering_tools.fixtures import save_model
from steering_tools.reference import ReferenceSteerer

from tests.engine.conftest import LiveEngine
from tests.engine.test_proxy_tuning import prompts


@pytest.fixture(scope="module")
def shared(llama_family, tokenizer, tmp_path_factory) -> dict:
    """`chat` and `chat2`: two fine-tunes of the Llama family's chat-untuned, which both name."""
    untuned = llama_family["experts"]["chat"]["untuned"]
    tuned2 = tmp_path_factory.mktemp("shared") / "chat2-tuned"
    save_model(None, tokenizer, tuned2, seed=77, start=untuned, noise=0.1)
    return {"chat": llama_family["experts"]["chat"], "chat2": {"tuned": str(tuned2), "untuned": untuned}}


@pytest.fixture(scope="module")
def shared_engine(llama_family, shared):
    engine = LiveEngine({"base": llama_family["base"], "experts": shared, "policies": {"any": {"max_alpha": 100.0}},
                         "engine": {"dtype": "float32", "max_model_len": 256, "enforce_eager": True}})
    yield engine
    engine.close()


def test_a_shared_untuned_model_steers_both_pairs_as_the_reference_does(shared_engine, llama_family, shared,
                                                                        tokenizer):
    # The reference loads the shared checkpoint once per pair: the arithmetic is the same either way.
    reference = ReferenceSteerer(llama_family["base"], {name: (p["tuned"], p["untuned"]) for name, p in shared.items()})
    batch = prompts(tokenizer)[:3]
    alphas = [{"chat": 1.0}, {"chat2": 1.5}, {"chat": -1.0, "chat2": 2.0}]
    assert shared_engine.greedy(batch, alphas, max_tokens=16) == reference.generate(batch, alphas, max_tokens=16)
    assert shared_engine.greedy(batch, alphas[1:2] * 3, max_tokens=16) != shared_engine.greedy(
        batch, alphas[:1] * 3, max_tokens=16), "the two fine-tunes steer differently"
