"""LoRA adapters as tuned experts: told from checkpoints, merged once as PEFT merges them, cached
by content, refused at load where they do not fit the untuned model (no engine here; the steered
tokens are checked in `test_sharing.py`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from steering_tools.fixtures import Shape, save_lora_adapter, save_model
from transformers import AutoModelForCausalLM

from steering.config import ExpertPair, load_deployment, tuned_checkpoint
from steering.config import adapters as adapters_module
from steering.config.adapters import CACHE_VARIABLE, is_adapter
from steering.engine import composite_spec
from steering.errors import ConfigError


def peft_merged(adapter: str, untuned: str, out: Path) -> Path:
    """The adapter merged by PEFT itself in float32: what the service's merge must equal."""
    model = AutoModelForCausalLM.from_pretrained(untuned, dtype=torch.float32)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(CACHE_VARIABLE, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def untuned(llama_family) -> str:
    return llama_family["experts"]["chat"]["untuned"]


@pytest.fixture(scope="module")
def adapter(untuned, tmp_path_factory) -> str:
    return str(save_lora_adapter(untuned, tmp_path_factory.mktemp("adapter") / "lora", seed=11))


def deploy(family: dict, tmp_path: Path, experts: dict) -> Path:
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump({"base": family["base"], "experts": experts, "policies": {"base": {}},
                                    "engine": {"dtype": "float32", "max_model_len": 256}}))
    return path


def test_an_adapter_folder_is_told_from_a_checkpoint(adapter, untuned):
    assert is_adapter(adapter)
    assert not is_adapter(untuned)
    assert not is_adapter("org/chat-tuned")
    assert tuned_checkpoint("chat", ExpertPair(tuned=untuned, untuned=untuned)) == untuned


def test_an_adapter_is_merged_once_exactly_as_peft_merges_it(adapter, untuned, cache, tmp_path, monkeypatch):
    pair = ExpertPair(tuned=adapter, untuned=untuned)
    merged = tuned_checkpoint("lora", pair)
    assert Path(merged).parent == cache
    want = AutoModelForCausalLM.from_pretrained(peft_merged(adapter, untuned, tmp_path / "peft"), dtype=torch.float32)
    got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert want.state_dict().keys() == got.state_dict().keys()
    assert all(torch.equal(w, got.state_dict()[name]) for name, w in want.state_dict().items())
    before = AutoModelForCausalLM.from_pretrained(untuned, dtype=torch.float32).state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(got.state_dict()[name], before[name]), "the adapter changes the model"

    def merge_again(*args):
        raise AssertionError("merged again")

    monkeypatch.setattr(adapters_module, "_merge", merge_again)
    assert tuned_checkpoint("lora", pair) == merged
    copy = shutil.copytree(adapter, tmp_path / "copy")  # keyed by content, not by path
    assert tuned_checkpoint("other", ExpertPair(tuned=str(copy), untuned=untuned)) == merged


def test_a_changed_adapter_is_merged_anew(adapter, untuned, cache, tmp_path):
    copy = shutil.copytree(adapter, tmp_path / "copy")
    first = tuned_checkpoint("lora", ExpertPair(tuned=str(copy), untuned=untuned))
    save_lora_adapter(untuned, copy, seed=12)  # the same folder, retrained
    assert tuned_checkpoint("lora", ExpertPair(tuned=str(copy), untuned=untuned)) != first


def test_a_merge_that_loses_a_race_keeps_the_winners_folder(adapter, untuned, tmp_path):
    winner = tmp_path / "cache" / "key"
    winner.mkdir(parents=True)
    (winner / "config.json").write_text("{}")
    adapters_module._merge(adapter, untuned, winner)
    assert [p.name for p in winner.iterdir()] == ["config.json"]
    assert [p.name for p in winner.parent.iterdir()] == ["key"], "the staging folder is removed"


def test_a_deployment_serves_adapters_as_merged_checkpoints_over_one_untuned(llama_family, adapter, untuned, cache,
                                                                             tmp_path):
    second = str(save_lora_adapter(untuned, tmp_path / "lora2", seed=13))
    experts = {"lora": {"tuned": adapter, "untuned": untuned}, "lora2": {"tuned": second, "untuned": untuned}}
    deployment = load_deployment(deploy(llama_family, tmp_path, experts))
    assert deployment.experts["lora"].tuned == adapter, "what the config names stays (reloads, /v1/models)"
    spec = composite_spec(deployment)
    tuned = [pair.tuned for pair in spec.pairs]
    assert all(Path(path).parent == cache for path in tuned) and tuned[0] != tuned[1]
    assert {pair.untuned for pair in spec.pairs} == {untuned}, "one untuned sub-model serves both pairs"


def adapter_over(shape: Shape, tokenizer, root: Path) -> str:
    """An adapter trained over a model of `shape` (the Llama family's chat pair is llama, 64 wide, 2 layers)."""
    save_model(shape, tokenizer, root / "over", seed=21)
    return str(save_lora_adapter(root / "over", root / "adapter", seed=22))


@pytest.mark.parametrize(
    ("shape", "reason"),
    [
        (Shape("qwen2", hidden=64, heads=2, kv_heads=1), "was trained over a qwen2 model"),
        (Shape("llama", hidden=64, heads=2, kv_heads=1, layers=3), "adapts module 'model.layers.2."),
        (Shape("llama", hidden=96, heads=3, kv_heads=1), "does not fit the untuned model's"),
    ],
    ids=["other-architecture", "missing-modules", "other-shapes"],
)
def test_an_adapter_that_does_not_fit_its_untuned_model_is_refused_at_load(
    llama_family, untuned, tokenizer, cache, tmp_path, shape, reason
):
    misfit = adapter_over(shape, tokenizer, tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_deployment(deploy(llama_family, tmp_path, {"lora": {"tuned": misfit, "untuned": untuned}}))
    assert caught.value.field == "experts.lora.tuned"
    assert reason in caught.value.reason
    assert not list(cache.glob("?" * 32)), "nothing merged"


def test_an_adapter_of_another_kind_than_lora_is_refused(llama_family, adapter, untuned, cache, tmp_path):
    other = shutil.copytree(adapter, tmp_path / "ia3")
    settings = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**settings, "peft_type": "IA3"}))
    with pytest.raises(ConfigError, match="experts.lora.tuned: is a IA3 adapter; only LoRA adapters are merged"):
        load_deployment(deploy(llama_family, tmp_path, {"lora": {"tuned": str(other), "untuned": untuned}}))


def test_an_adapter_over_a_hub_id_names_the_untuned(llama_family, adapter, cache, tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_deployment(deploy(llama_family, tmp_path, {"lora": {"tuned": adapter, "untuned": "org/chat-untuned"}}))
    assert caught.value.field == "experts.lora.untuned"
    assert "no local checkpoint folder" in caught.value.reason


def test_a_cache_that_cannot_be_written_names_the_variable(adapter, untuned, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(CACHE_VARIABLE, str(tmp_path / "file" / "cache"))
    with pytest.raises(ConfigError, match=f"set {CACHE_VARIABLE} to a writable folder") as caught:
        tuned_checkpoint("lora", ExpertPair(tuned=adapter, untuned=untuned))
    assert caught.value.field == "experts.lora.tuned"
