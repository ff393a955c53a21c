"""KV cache sizing on CPU: in bytes, from the models, checked against the node before any engine starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from steering_tools.fixtures import write_deployment

from steering.config import parse_deployment
from steering.engine import engine_config
from steering.errors import ConfigError
from steering.memory import (
    DEFAULT_SEQUENCES,
    MIN_DEFAULT_BYTES,
    WORKER_RUNTIME_BYTES,
    GiB,
    MiB,
    ModelMemory,
    NodeMemory,
    check_fraction,
    checkpoint_bytes,
    default_kv_cache,
    model_memory,
)
from tests.engine.conftest import _config as engine_test_config
from tests.live_server import write_config

# The node of a fresh machine of this kind (the log): 7.96 GiB, 6.2 GiB of it free.
SMALL_NODE = NodeMemory(node=0, total=int(7.96 * GiB), available=int(6.2 * GiB))
STEER = str(Path(sys.executable).parent / "steer")


def deployment(family: dict, **engine):
    return parse_deployment({"base": family["base"], "experts": family["experts"], "policies": {"base": {}},
                             "engine": {"dtype": "float32", "max_model_len": 512, **engine}})


def test_per_token_kv_bytes_count_every_sub_model(llama_family):
    # K and V x layers x KV heads x head_dim x 4 bytes (float32), for each of the five models:
    base = 2 * 2 * 2 * 32 * 4  # Llama 128 wide, 4 heads of 32, 2 KV heads, 2 layers
    chat = 2 * 2 * 1 * 32 * 4  # Llama 64 wide, 2 heads of 32, 1 KV head
    code = 2 * 2 * 1 * 32 * 4  # Qwen2 96 wide, 3 heads of 32, 1 KV head
    steered = deployment(llama_family)
    config = engine_config(steered, node=SMALL_NODE)
    experts = [path for pair in llama_family["experts"].values() for path in (pair["tuned"], pair["untuned"])]
    model = model_memory(config, experts)
    assert model.kv_bytes_per_token == base + 2 * chat + 2 * code == 3072
    assert model.one_sequence_bytes == 512 * 3072  # 512 tokens: 4 whole blocks of 128
    # Weights: the five float32 checkpoints, read from their safetensors headers.
    assert model.weight_bytes == sum(checkpoint_bytes(path, torch.float32) for path in [llama_family["base"], *experts])
    wanted = DEFAULT_SEQUENCES * 512 * 3072  # 24 MiB: below the floor for tiny models
    assert config.cache_config.kv_cache_memory_bytes == max(wanted, MIN_DEFAULT_BYTES) == MIN_DEFAULT_BYTES


def test_the_default_fits_an_8_gib_node_after_a_1_gib_worker():
    # A model whose wish (16 sequences x 4096 tokens x 128 KiB) is 8 GiB: capped to what is free.
    big = ModelMemory(weight_bytes=2 * GiB, kv_bytes_per_token=128 * 1024, max_model_len=4096, block_size=128)
    plan = default_kv_cache(big, SMALL_NODE)
    assert plan.kv_cache_bytes == int(0.5 * (6.2 * GiB - WORKER_RUNTIME_BYTES - 2 * GiB))
    assert plan.kv_cache_bytes + WORKER_RUNTIME_BYTES + big.weight_bytes <= SMALL_NODE.available
    assert plan.kv_cache_bytes >= big.one_sequence_bytes
    assert "capped" in plan.reason
    # Two tensor-parallel workers on one node share it: each holds half the weights and gets half the room.
    halves = ModelMemory(2 * GiB, 64 * 1024, 4096, 128, num_workers=2)
    assert default_kv_cache(halves, SMALL_NODE).kv_cache_bytes == int(0.5 * (6.2 * GiB - 2 * (1 * GiB + 1 * GiB)) / 2)


def test_a_sequence_that_cannot_fit_names_max_model_len():
    huge = ModelMemory(weight_bytes=4 * GiB, kv_bytes_per_token=1 * MiB, max_model_len=32768, block_size=128)
    with pytest.raises(ConfigError) as caught:
        default_kv_cache(huge, SMALL_NODE)
    assert caught.value.field == "engine.max_model_len"
    assert "32.00 GiB" in caught.value.reason and "NUMA node 0 has 6.20 GiB free" in caught.value.reason


def test_every_config_the_project_writes_gets_bytes_on_cpu(llama_family, tmp_path):
    written = [
        yaml.safe_load(write_deployment(llama_family, tmp_path / "fixtures.yaml").read_text()),  # steer fixtures
        yaml.safe_load(write_config(llama_family, tmp_path / "server.yaml").read_text()),  # the test server
        engine_test_config(llama_family),  # the engine tests' engines
    ]
    for config in written:
        assert "gpu_memory_utilization" not in config["engine"]
        sized = engine_config(parse_deployment(config, root=tmp_path), node=SMALL_NODE)
        assert 0 < sized.cache_config.kv_cache_memory_bytes <= SMALL_NODE.available - WORKER_RUNTIME_BYTES


def test_a_fraction_below_the_workers_footprint_is_refused():
    model = ModelMemory(weight_bytes=100 * MiB, kv_bytes_per_token=4096, max_model_len=256, block_size=128)
    with pytest.raises(ConfigError) as caught:
        check_fraction(0.1, model, SMALL_NODE)  # 0.8 GiB of the node, less than the worker's ~1.1 GiB
    error = caught.value
    assert error.field == "engine.gpu_memory_utilization"
    assert "0.1 of the node's 7.96 GiB is 0.80 GiB" in error.reason
    assert "engine.kv_cache_gib: " in error.reason
    check_fraction(0.5, model, SMALL_NODE)  # 3.98 GiB: room left for KV


@pytest.mark.parametrize(("engine", "field", "reason"), [
    ({"kv_cache_gib": 10_000}, "engine.kv_cache_gib", "does not fit"),
    ({"kv_cache_memory_bytes": 4096}, "engine.kv_cache_memory_bytes", "cannot hold one sequence of 512 tokens"),
    ({"gpu_memory_utilization": 0.05}, "engine.gpu_memory_utilization", "leaving"),
    ({"max_model_len": 100_000}, "engine.max_model_len", "vLLM refused it"),
])
def test_engine_options_that_cannot_work_name_the_field(llama_family, engine, field, reason):
    with pytest.raises(ConfigError) as caught:
        engine_config(deployment(llama_family, **engine), node=SMALL_NODE)
    assert caught.value.field == field
    assert reason in caught.value.reason


def test_two_kv_cache_sizes_are_refused(llama_family):
    with pytest.raises(ConfigError) as caught:
        deployment(llama_family, kv_cache_gib=1, gpu_memory_utilization=0.5)
    assert caught.value.field == "engine.gpu_memory_utilization"
    assert "give one of" in caught.value.reason


def test_the_cli_refuses_a_fraction_before_any_engine_process_starts(llama_family, tmp_path):
    # 0.001 of any node this machine kind has is far below a worker's own footprint.
    path = write_deployment(llama_family, tmp_path / "deploy.yaml", engine={"gpu_memory_utilization": 0.001})
    result = subprocess.run([STEER, "complete", "--config", str(path), "--policy", "base", "hi"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "steer: engine.gpu_memory_utilization: 0.001 of the node's" in result.stderr
    assert "EngineCore" not in result.stderr and "Traceback" not in result.stderr


def test_serve_without_a_config_says_what_to_run():
    result = subprocess.run([STEER, "serve"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--config is required" in result.stderr and "steer demo run" in result.stderr
