"""Any decoder architecture vLLM serves, as base or expert: steered tokens equal the reference's.

Eight engines cover sixteen model types, each an expert somewhere and eight of them a base too
(three engines with five or six expert pairs, five with two): vLLM-native ones and two (helium,
persimmon) that vLLM serves only through its Transformers modeling backend, which reads head
counts from the sub-model's own model config; both are a base and an expert. Between them: tied embeddings (gemma, gemma2,
cohere, starcoder2), final-logit and attention soft-capping (gemma2), logit scaling (granite
divides by `logits_scaling`, cohere multiplies by `logit_scale`), partial rotary embeddings
(persimmon, stablelm, phi, gpt_neox), multi-head-only configs (persimmon, gpt_neox), head_dim 64
beside 32 (olmo2), and padded expert vocabularies. The transformers oracle computes capping and
scaling inside each HF model's forward; it loads soft-capped models with eager attention, as
transformers' default sdpa drops attention soft-capping.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from steering_tools.fixtures import (
    ARCHITECTURES,
    FamilySpec,
    Shape,
    build_family,
    save_model,
)
from steering_tools.reference import ReferenceSteerer
from vllm import SamplingParams
from vllm.config import ModelConfig

from steering.config import load_deployment
from tests.engine.conftest import LiveEngine, _config

# Engine name -> a base and expert pairs named for their architecture.
MATRIX = {
    # A Transformers-backend base with partial rotary embeddings and multi-head attention only.
    "persimmon": FamilySpec(
        base=Shape("persimmon", hidden=128, heads=4, kv_heads=4),
        experts={
            "llama": Shape("llama", hidden=64, heads=2, kv_heads=1, vocab_pad=16),
            "gemma2": Shape("gemma2", hidden=96, heads=3, kv_heads=1),
            "stablelm": Shape("stablelm", hidden=64, heads=2, kv_heads=2),
            "gpt_neox": Shape("gpt_neox", hidden=64, heads=2, kv_heads=2),
            "phi3": Shape("phi3", hidden=96, heads=3, kv_heads=3),
        },
        seed=11,
    ),
    # Soft-capped, tied base logits; a Transformers-backend expert; head_dim 64 beside 32.
    "gemma2": FamilySpec(
        base=Shape("gemma2", hidden=128, heads=4, kv_heads=2),
        experts={
            "helium": Shape("helium", hidden=64, heads=2, kv_heads=1),
            "granite": Shape("granite", hidden=96, heads=3, kv_heads=1),
            "phi": Shape("phi", hidden=64, heads=2, kv_heads=2),
            "olmo2": Shape("olmo2", hidden=128, heads=2, kv_heads=1),
            "qwen3": Shape("qwen3", hidden=64, heads=2, kv_heads=1, vocab_pad=8),
            "cohere": Shape("cohere", hidden=64, heads=2, kv_heads=1),
        },
        seed=12,
    ),
    # Scaled, tied base logits.
    "cohere": FamilySpec(
        base=Shape("cohere", hidden=128, heads=4, kv_heads=2),
        experts={
            "qwen2": Shape("qwen2", hidden=64, heads=2, kv_heads=2),
            "mistral": Shape("mistral", hidden=96, heads=3, kv_heads=1),
            "gemma": Shape("gemma", hidden=64, heads=2, kv_heads=1),
            "starcoder2": Shape("starcoder2", hidden=64, heads=2, kv_heads=1),
            "persimmon": Shape("persimmon", hidden=64, heads=2, kv_heads=2, vocab_pad=8),
        },
        seed=13,
    ),
    # Five smaller engines make eight bases in all, each base's experts of other families.
    # Logits divided by `logits_scaling`; a Transformers-backend expert.
    "granite": FamilySpec(
        base=Shape("granite", hidden=128, heads=4, kv_heads=1),
        experts={"helium": Shape("helium", hidden=64, heads=2, kv_heads=2), "llama": Shape("llama", hidden=64, heads=2, kv_heads=1)},
        seed=14,
    ),
    # Multi-head attention only, partial rotary embeddings; a padded expert vocabulary.
    "gpt_neox": FamilySpec(
        base=Shape("gpt_neox", hidden=128, heads=4, kv_heads=4),
        experts={"granite": Shape("granite", hidden=64, heads=2, kv_heads=1),
                 "qwen3": Shape("qwen3", hidden=64, heads=2, kv_heads=2, vocab_pad=24)},
        seed=15,
    ),
    # q/k norms in the base; tied, scaled expert logits.
    "qwen3": FamilySpec(
        base=Shape("qwen3", hidden=128, heads=4, kv_heads=2),
        experts={"cohere": Shape("cohere", hidden=64, heads=2, kv_heads=1), "phi": Shape("phi", hidden=64, heads=2, kv_heads=2)},
        seed=16,
    ),
    # A Transformers-backend base beside a soft-capped expert.
    "helium": FamilySpec(
        base=Shape("helium", hidden=128, heads=4, kv_heads=2),
        experts={"gemma2": Shape("gemma2", hidden=64, heads=2, kv_heads=1),
                 "persimmon": Shape("persimmon", hidden=64, heads=2, kv_heads=2)},
        seed=17,
    ),
    "llama": FamilySpec(
        base=Shape("llama", hidden=128, heads=4, kv_heads=2),
        experts={"stablelm": Shape("stablelm", hidden=64, heads=2, kv_heads=1),
                 "gpt_neox": Shape("gpt_neox", hidden=64, heads=2, kv_heads=2, vocab_pad=8)},
        seed=18,
    ),
}
PAIRS = [(engine, pair) for engine, spec in MATRIX.items() for pair in spec.experts]
TRANSFORMERS_BACKEND = {"helium", "persimmon"}
TEXTS = ["the model answers the question", "every cat reads a long story before noon."]
ALPHAS = (0.0, 1.0, -1.5)
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def family(request, tmp_path_factory, tokenizer) -> dict:
    """The checkpoints of one MATRIX entry (parametrized indirectly by engine name)."""
    return build_family(MATRIX[request.param], tmp_path_factory.mktemp(request.param), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def engine(family):
    """One engine at a time: pytest closes it before the next family's starts."""
    engine = LiveEngine(_config(family, enforce_eager=True, max_model_len=128, block_size=32))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def reference(family) -> ReferenceSteerer:
    return ReferenceSteerer(family["base"], {name: (p["tuned"], p["untuned"]) for name, p in family["experts"].items()})


@pytest.fixture(scope="module")
def batch(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(text) for text in TEXTS]


def check_steering(engine, reference, prompts, alphas) -> torch.Tensor:
    """Greedy tokens equal and first-step steered logprobs agree; returns the reference's [B, V]."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=5)
    outputs = engine.outputs(prompts, alphas, params)
    assert [list(o.outputs[0].token_ids) for o in outputs] == reference.generate(prompts, alphas, max_tokens=MAX_TOKENS)
    want = reference.next_token_logprobs(prompts, alphas)  # [B, V]
    for row, output in enumerate(outputs):
        got = output.outputs[0].logprobs[0]
        assert {t: lp.logprob for t, lp in got.items()} == pytest.approx({t: want[row, t].item() for t in got}, abs=1e-4)
    return want


# scope="module" keeps one engine for all pairs of a family: the pair parameter only groups tests.
@pytest.mark.parametrize(("family", "pair"), PAIRS, indirect=["family"], scope="module",
                         ids=[f"{engine}-base/{pair}" for engine, pair in PAIRS])
def test_pair_matches_reference(engine, reference, batch, family, pair):
    alphas = [{pair: alpha} for alpha in ALPHAS for _ in batch]
    want = check_steering(engine, reference, batch * len(ALPHAS), alphas)
    unsteered, steered = want[: len(batch)], want[len(batch) :]
    assert (steered - unsteered.repeat(len(ALPHAS) - 1, 1)).abs().max() > 1e-2, f"the {pair} pair steers nothing"


@pytest.mark.parametrize("family", list(MATRIX), indirect=True, ids=[f"{engine}-base" for engine in MATRIX])
def test_all_pairs_at_once(engine, reference, batch, family):
    pairs = list(family["experts"])
    alphas = [{name: (1.0, -1.5, 0.5)[i % 3] for i, name in enumerate(pairs)}, {pairs[0]: -1.5, pairs[-1]: 1.0}]
    check_steering(engine, reference, batch, alphas)


def test_matrix_covers_every_architecture():
    shapes = [shape for spec in MATRIX.values() for shape in (spec.base, *spec.experts.values())]
    assert {shape.arch for shape in shapes} == set(ARCHITECTURES)
    bases = {spec.base.arch for spec in MATRIX.values()}
    experts = {shape.arch for spec in MATRIX.values() for shape in spec.experts.values()}
    assert len(bases) >= 8 and bases <= experts and TRANSFORMERS_BACKEND <= bases, "each base is an expert too"
    assert all(spec.base.arch not in {shape.arch for shape in spec.experts.values()} for spec in MATRIX.values())


@pytest.mark.parametrize("arch", [*sorted(TRANSFORMERS_BACKEND), "llama"])
def test_transformers_backend_is_covered(tmp_path, tokenizer, arch):
    """The matrix's claim: vLLM has no implementation of its own for helium and persimmon."""
    save_model(Shape(arch, hidden=64, heads=2, kv_heads=2), tokenizer, tmp_path, seed=0)
    config = ModelConfig(model=str(tmp_path), dtype="float32")
    assert config.using_transformers_backend() == (arch in TRANSFORMERS_BACKEND)


@pytest.mark.parametrize("family", list(MATRIX), indirect=True, ids=[f"{engine}-base" for engine in MATRIX])
def test_the_load_time_checks_accept_every_architecture(family, tmp_path):
    """What a user loads goes through the checkpoint checks too: Transformers-backend ones included."""
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(_config(family)))
    assert set(load_deployment(path).experts) == set(family["experts"])
