"""Pairs that share a checkpoint (fine-tunes of one small model share its untuned version), full
checkpoints and LoRA adapters alike."""

from __future__ import annotations

import pytest
from steering_tools.fixtures import save_lora_adapter, save_model
from steering_tools.reference import ReferenceSteerer

from steering.config.adapters import CACHE_VARIABLE
from tests.engine.conftest import LiveEngine
from tests.engine.test_adapters import peft_merged
from tests.engine.test_proxy_tuning import prompts


@pytest.fixture(scope="module")
def shared(llama_family, tokenizer, tmp_path_factory) -> dict:
    """`chat` and `chat2`: two fine-tunes of the Llama family's chat-untuned, which both name."""
    untuned = llama_family["experts"]["chat"]["untuned"]
    tuned2 = tmp_path_factory.mktemp("shared") / "chat2-tuned"
    save_model(None, tokenizer, tuned2, seed=77, start=untuned, noise=0.1)
    return {"chat": llama_family["experts"]["chat"], "chat2": {"tuned": str(tuned2), "untuned": untuned}}


@pytest.fixture(scope="module")
def adapters(llama_family, tmp_path_factory) -> dict:
    """`lora` and `lora2`: two LoRA adapters over the same chat-untuned."""
    untuned, root = llama_family["experts"]["chat"]["untuned"], tmp_path_factory.mktemp("adapters")
    return {name: {"tuned": str(save_lora_adapter(untuned, root / name, seed=seed)), "untuned": untuned}
            for name, seed in (("lora", 31), ("lora2", 32))}


@pytest.fixture(scope="module")
def shared_engine(llama_family, shared, adapters, tmp_path_factory):
    config = {"base": llama_family["base"], "experts": {**shared, **adapters},
              "policies": {"any": {"max_alpha": 100.0}},
              "engine": {"dtype": "float32", "max_model_len": 256, "enforce_eager": True}}
    with pytest.MonkeyPatch.context() as patch:  # adapters are merged as the engine starts: not into ~/.cache
        patch.setenv(CACHE_VARIABLE, str(tmp_path_factory.mktemp("adapter-cache")))
        engine = LiveEngine(config)
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


def test_lora_adapters_over_the_shared_untuned_steer_as_their_peft_merges_do(shared_engine, llama_family, shared,
                                                                              adapters, tokenizer, tmp_path):
    merged = {name: (str(peft_merged(p["tuned"], p["untuned"], tmp_path / name)), p["untuned"])
              for name, p in adapters.items()}
    reference = ReferenceSteerer(llama_family["base"], {**merged, "chat": (shared["chat"]["tuned"],
                                                                           shared["chat"]["untuned"])})
    batch = prompts(tokenizer)
    alphas = [{"lora": 1.0}, {"lora2": 2.0, "chat": -0.5}, {"lora": -1.0, "lora2": 1.5}]
    assert shared_engine.greedy(batch, alphas, max_tokens=16) == reference.generate(batch, alphas, max_tokens=16)
    assert shared_engine.greedy(batch, [{"lora": 1.0}] * 3, max_tokens=16) != shared_engine.greedy(
        batch, [{}] * 3, max_tokens=16), "the adapter steers"
