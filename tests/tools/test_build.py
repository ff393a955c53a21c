"""The demo family build in stages: an interrupted build resumes, a stale one is redone (no engine)."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field

import pytest

from steering_tools import demo_family
from steering_tools.demo_family import Recipe, build, demo_shape, is_built
from steering_tools.training import train

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
