"""Tensor parallelism: thread binding set by the engine on CPU, what cannot shard refused at load,
and TP=2 steered tokens equal to the reference."""

from __future__ import annotations

import pytest
import yaml

from steering import threads
from steering.config import load_deployment, parse_deployment, read_deployment
from steering.errors import ConfigError
from steering.threads import BIND_VARIABLE, cpu_worker_binding, split_cores
from tests.engine.conftest import LiveEngine
from tests.engine.test_proxy_tuning import prompts


def test_cores_are_split_into_one_contiguous_set_per_worker():
    assert split_cores([0, 1], 2) == "0|1"
    assert split_cores(range(16), 2) == "0-7|8-15"
    assert split_cores([0, 1, 2, 5, 6, 7, 8], 3) == "0-1|2,5|6-8"  # leftovers join the last set
    with pytest.raises(ConfigError, match="2 CPU workers need at least 2 cores; this process may use 1"):
        split_cores([3], 2)


def test_binding_is_set_only_while_spawning_where_vllm_cannot_bind_and_nobody_did(monkeypatch):
    monkeypatch.delenv(BIND_VARIABLE, raising=False)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    environ = threads.os.environ
    for workers, nodes in ((1, 1), (2, 2)):  # one worker; or vLLM's own auto binding works
        with cpu_worker_binding(workers, nodes):
            assert BIND_VARIABLE not in environ
    with cpu_worker_binding(2, 1):
        assert environ[BIND_VARIABLE] == "0-1|2-3"
    assert BIND_VARIABLE not in environ, "the next engine of this process decides anew"
    monkeypatch.setenv(BIND_VARIABLE, "0|3")  # the operator's choice stands
    with cpu_worker_binding(2, 1):
        assert environ[BIND_VARIABLE] == "0|3"
    assert environ[BIND_VARIABLE] == "0|3"


def test_what_cannot_shard_is_refused_at_load_naming_the_sub_model(llama_family, tmp_path):
    # The Llama family's `code` pair is a Qwen2 with 3 attention heads; `chat` has 2 heads and 1 KV
    # head, which vLLM replicates across 2 ranks.
    config = {"base": llama_family["base"], "experts": llama_family["experts"], "policies": {"base": {}},
              "engine": {"tensor_parallel_size": 2}}
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as caught:
        load_deployment(path)
    assert caught.value.field == "experts.code.tuned"
    assert "num_attention_heads 3 is not divisible by engine.tensor_parallel_size 2" in caught.value.reason
    config["experts"] = {"chat": llama_family["experts"]["chat"]}
    path.write_text(yaml.safe_dump(config))
    assert load_deployment(path).engine.tensor_parallel_size == 2


def test_pipeline_parallel_is_refused_with_the_reason(llama_family):
    with pytest.raises(ConfigError) as caught:
        parse_deployment({"base": llama_family["base"], "policies": {"base": {}},
                          "engine": {"pipeline_parallel_size": 2}})
    assert caught.value.field == "engine.pipeline_parallel_size"
    assert "cannot be cut into pipeline stages" in caught.value.reason


def test_the_ray_executor_is_refused_at_load_where_vllm_cannot_place_workers_with_ray(llama_family, tmp_path):
    # vLLM's CPU build names no device for Ray (`ray_device_key` is empty): left alone, its Ray
    # executor would start a Ray cluster and then fail inside the engine. The schema accepts the
    # option (a GPU node can run it); loading on this platform refuses it before any checkpoint opens.
    from vllm.platforms import current_platform

    assert not current_platform.ray_device_key, "this test runs where vLLM's platform cannot use Ray"
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump({"base": llama_family["base"], "policies": {"base": {}},
                                    "engine": {"distributed_executor_backend": "ray", "tensor_parallel_size": 2}}))
    assert read_deployment(path).engine.model_extra["distributed_executor_backend"] == "ray"
    with pytest.raises(ConfigError) as caught:
        load_deployment(path)
    assert caught.value.field == "engine.distributed_executor_backend"
    assert f"vLLM's {current_platform.device_name} build does not support the Ray executor" in caught.value.reason


@pytest.fixture(scope="module")
def tp_engine(llama_family):
    engine = LiveEngine({
        "base": llama_family["base"], "experts": {"chat": llama_family["experts"]["chat"]},
        "policies": {"any": {"max_alpha": 100.0}},
        "engine": {"dtype": "float32", "max_model_len": 256, "enforce_eager": True, "tensor_parallel_size": 2},
    })
    yield engine
    engine.close()


def test_tensor_parallel_2_equals_the_reference(tp_engine, llama_reference, tokenizer):
    batch = prompts(tokenizer)[:3]
    # The reference holds the `code` pair too; an alpha of 0 adds exactly nothing.
    for alpha in ({"chat": 1.0}, {"chat": -1.5}, {}):
        assert tp_engine.greedy(batch, [alpha] * 3, max_tokens=16) == \
            llama_reference.generate(batch, [alpha] * 3, max_tokens=16)
