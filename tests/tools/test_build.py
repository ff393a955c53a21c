"""The demo family build in stages: an interrupted build resumes, a stale one is redone (no engine)."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field

import pytest
import torch
from steering_tools import demo_family
from steering_tools.demo_family import Recipe, build, demo_shape, is_built
from steering_tools.training import train, weighted_loss
from transformers import LlamaConfig, LlamaForCausalLM

SMALL = Recipe(
    entities=12, strangers=2, vocab_size=512, base=demo_shape(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64),
    small=demo_shape(hidden=16, layers=1, heads=1, kv_heads=1, intermediate=32),
    base_epochs=2, small_epochs=1, tune_epochs=1, direct_epochs=1,
)
MODELS = ("base", "chat-untuned", "chat-tuned", "direct")


class Interrupted(Exception):
    pass


@dataclass
class Trainings:
    """The description of every training run, in order; a run described in `fail` raises instead."""

    runs: list[str] = field(default_factory=list)
    fail: set[str] = field(default_factory=set)


@pytest.fixture(autouse=True)
def calibration_without_engine(monkeypatch):
    """The calibration stage writes its files without starting vLLM (test_bench.py runs the real one)."""

    async def calibrate_policies(out, into):
        into.mkdir(parents=True)
        for name in ("qa", "verify"):
            (into / f"{name}.json").write_text("{}")

    monkeypatch.setattr(demo_family, "calibrate_policies", calibrate_policies)


@pytest.fixture
def trainings(monkeypatch) -> Trainings:
    seen = Trainings()

    def spy(model, batches, **kwargs):
        seen.runs.append(kwargs["description"])
        if kwargs["description"] in seen.fail:
            raise Interrupted(kwargs["description"])
        return train(model, batches, **kwargs)

    monkeypatch.setattr(demo_family, "train", spy)
    return seen


def _weights(folder) -> dict[str, bytes]:
    return {name: (folder / name / "model.safetensors").read_bytes() for name in MODELS}


def test_an_interrupted_build_resumes_after_the_last_finished_stage(tmp_path, trainings, capsys):
    out = tmp_path / "family"
    trainings.fail = {"untuned: narratives"}
    with pytest.raises(Interrupted):
        asyncio.run(build(out, recipe=SMALL))
    assert trainings.runs == ["base: narratives", "untuned: narratives"]
    assert not is_built(out, SMALL) and not (out / "chat-untuned").exists()
    base = out / "base" / "model.safetensors"
    saved = base.stat().st_mtime_ns, base.read_bytes()

    trainings.runs.clear()
    trainings.fail = set()
    assert asyncio.run(build(out, recipe=SMALL)) == out
    assert trainings.runs == ["untuned: narratives", "tuned: questions", "direct: base on questions"]
    assert (base.stat().st_mtime_ns, base.read_bytes()) == saved, "the base was not trained again"
    assert "base: reused" in capsys.readouterr().out
    assert is_built(out, SMALL)

    whole = asyncio.run(build(tmp_path / "whole", recipe=SMALL))
    assert _weights(out) == _weights(whole), "each stage is seeded on its own: resuming changes no weight"


def test_another_recipe_or_force_redoes_every_stage(tmp_path, trainings):
    out = asyncio.run(build(tmp_path / "family", recipe=SMALL))
    first = _weights(out)
    other = dataclasses.replace(SMALL, seed=1)

    trainings.runs.clear()
    asyncio.run(build(out, recipe=other))
    assert len(trainings.runs) == 4 and is_built(out, other) and not is_built(out, SMALL)
    assert _weights(out) != first

    trainings.runs.clear()
    asyncio.run(build(out, recipe=SMALL, force=True))
    assert len(trainings.runs) == 4 and is_built(out, SMALL)
    assert _weights(out) == first


def test_a_stage_of_a_new_version_is_redone_without_the_models(tmp_path, trainings, monkeypatch, capsys):
    out = asyncio.run(build(tmp_path / "family", recipe=SMALL))
    before = _weights(out)
    newer = tuple(dataclasses.replace(stage, version=stage.version + 1) if stage.name == "questions" else stage
                  for stage in demo_family.STAGES)
    monkeypatch.setattr(demo_family, "STAGES", newer)
    trainings.runs.clear()
    capsys.readouterr()
    assert asyncio.run(build(out, recipe=SMALL)) == out
    printed = capsys.readouterr().out
    assert trainings.runs == [] and "questions: written" in printed and "base: reused" in printed
    assert _weights(out) == before and is_built(out, SMALL)


def test_bench_stages_are_added_to_a_finished_build(tmp_path, trainings):
    asyncio.run(build(tmp_path, recipe=SMALL))
    before = _weights(tmp_path)
    trainings.runs.clear()
    asyncio.run(build(tmp_path, recipe=SMALL, bench=True))
    assert trainings.runs == ["tuned, utility-weighted: questions", "direct, utility-weighted: base on questions"]
    assert _weights(tmp_path) == before, "the served models are left as they were"
    assert is_built(tmp_path, SMALL)
    trainings.runs.clear()
    asyncio.run(build(tmp_path, recipe=SMALL, bench=True))
    assert trainings.runs == [], "then reused"


def test_the_utility_weighted_loss_by_hand():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :3] = -100  # the prompt: no loss
    labels[1, 5] = -100  # a shorter answer
    plain = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert weighted_loss(model, ids, mask, labels, torch.ones(2)).item() == pytest.approx(plain.item(), rel=1e-6)
    # Per-token losses by hand: row 0 has 3 answer tokens, row 1 has 2; row 1 weighs 10.
    logprobs = model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
    nll = [[-logprobs[row, t - 1, ids[row, t]].item() for t in range(3, 6 if row == 0 else 5)] for row in (0, 1)]
    want = (sum(nll[0]) + 10 * sum(nll[1])) / (3 + 10 * 2)
    assert weighted_loss(model, ids, mask, labels, torch.tensor([1.0, 10.0])).item() == pytest.approx(want, rel=1e-5)
    assert demo_family.utility_weight("no") == 10.0 and demo_family.utility_weight("yes") == 1.0
    assert demo_family.utility_weight("Dunmere") == 1.0, "open questions keep their weight"
