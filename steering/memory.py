"""How much KV cache an engine gets on CPU, in bytes, decided before any engine process starts.

vLLM's CPU worker reads `gpu_memory_utilization` as a share of its NUMA node's memory and
gives the KV cache that share *minus its own resident memory*. Nodes of one machine kind differ
(8 GiB on one, 18 GiB on the next, and growing while a machine runs), so a share that fits on
one machine is negative on another. Here the KV cache is sized in bytes from the models:

    per-token KV bytes of every sub-model x max_model_len x DEFAULT_SEQUENCES,

at most `CAP_SHARE` of what the node has free once the weights and the worker's runtime are
loaded, and at least one full-length sequence (else the config is refused, naming the field).
On GPU nothing changes: vLLM's fraction of device memory keeps its meaning and its default.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from steering.errors import ConfigError

logger = logging.getLogger("steer.memory")

GiB = 1 << 30
MiB = 1 << 20
# Resident memory of a CPU worker before weights and KV: torch, vLLM, compiled graphs
# (measured 0.75-0.9 GiB with tiny models; rounded up).
WORKER_RUNTIME_BYTES = 1 * GiB
DEFAULT_SEQUENCES = 16  # full-length sequences the default KV cache holds at once
CAP_SHARE = 0.5  # of the node's free memory after weights and runtime: room for everything else
MIN_DEFAULT_BYTES = 64 * MiB  # tiny models still get a few MiB of blocks to batch with


@dataclass(frozen=True)
class NodeMemory:
    """A NUMA node's memory as vLLM's CPU worker sees it (cgroup limits applied)."""

    node: int
    total: int
    available: int

    def describe(self) -> str:
        return f"NUMA node {self.node} has {self.available / GiB:.2f} GiB free of {self.total / GiB:.2f} GiB"


@dataclass(frozen=True)
class ModelMemory:
    """What the composite model needs in memory: weights, and KV bytes per token (per worker)."""

    weight_bytes: int
    kv_bytes_per_token: int
    max_model_len: int
    block_size: int
    num_workers: int = 1

    @property
    def one_sequence_bytes(self) -> int:
        """KV bytes for one sequence of max_model_len tokens, whole blocks: the least vLLM accepts."""
        blocks = math.ceil(self.max_model_len / self.block_size)
        return blocks * self.block_size * self.kv_bytes_per_token

    @property
    def worker_footprint(self) -> int:
        """Resident memory of one worker before its KV cache: runtime plus its share of the weights."""
        return WORKER_RUNTIME_BYTES + self.weight_bytes // self.num_workers


@dataclass(frozen=True)
class KVCachePlan:
    """The KV cache size chosen (bytes per worker) and why, for the log."""

    kv_cache_bytes: int
    reason: str


def default_kv_cache(model: ModelMemory, node: NodeMemory) -> KVCachePlan:
    """A KV cache that holds DEFAULT_SEQUENCES full sequences, capped by what the node has free."""
    wanted = max(model.one_sequence_bytes * DEFAULT_SEQUENCES, MIN_DEFAULT_BYTES)
    room = node.available - model.num_workers * model.worker_footprint
    cap = int(CAP_SHARE * room / model.num_workers)
    if cap < model.one_sequence_bytes:
        raise ConfigError(
            "engine.max_model_len",
            f"one sequence of {model.max_model_len} tokens needs {_gib(model.one_sequence_bytes)} of KV cache, "
            f"but {node.describe()} and the workers take {_gib(model.num_workers * model.worker_footprint)} "
            f"(weights {_gib(model.weight_bytes)}, runtime {_gib(WORKER_RUNTIME_BYTES)} each); "
            "lower engine.max_model_len or free memory on the node",
        )
    size = min(wanted, cap)
    why = (f"{DEFAULT_SEQUENCES} sequences x {model.max_model_len} tokens x "
           f"{model.kv_bytes_per_token / 1024:.1f} KiB/token (all sub-models)")
    if size < wanted:
        why = f"capped at {CAP_SHARE:.0%} of what is free after weights and runtime ({node.describe()}); wanted {why}"
    return KVCachePlan(size, why)


def check_kv_cache_bytes(field: str, size: int, model: ModelMemory, node: NodeMemory) -> KVCachePlan:
    """An explicit size: at least one full sequence, and room for it beside the weights."""
    if size < model.one_sequence_bytes:
        raise ConfigError(
            field,
            f"{_gib(size)} of KV cache cannot hold one sequence of {model.max_model_len} tokens "
            f"({_gib(model.one_sequence_bytes)}); raise it or lower engine.max_model_len",
        )
    room = node.available - model.num_workers * model.worker_footprint
    if model.num_workers * size > room:
        raise ConfigError(
            field,
            f"{_gib(size)} per worker does not fit: {node.describe()}, and the workers take "
            f"{_gib(model.num_workers * model.worker_footprint)} before their KV cache; "
            f"set at most {_gib(max(room, 0) // model.num_workers)}, or leave it unset to size it from the models",
        )
    return KVCachePlan(size, f"set by {field}")


def check_fraction(fraction: float, model: ModelMemory, node: NodeMemory) -> None:
    """vLLM's CPU meaning of the fraction: `fraction x node total - worker resident memory` for KV."""
    requested = fraction * node.total
    left = requested - model.worker_footprint
    suggestion = default_kv_cache(model, node).kv_cache_bytes if node.available > model.worker_footprint else 0
    fix = (f"on CPU size the KV cache in bytes instead: remove engine.gpu_memory_utilization (the service then "
           f"sizes it from the models) or set engine.kv_cache_gib: {max(suggestion / GiB, 0.01):.2f}")
    if requested > node.available:
        raise ConfigError(
            "engine.gpu_memory_utilization",
            f"{fraction} of the node is {_gib(requested)}, more than is free ({node.describe()}); {fix}",
        )
    if left < model.one_sequence_bytes:
        raise ConfigError(
            "engine.gpu_memory_utilization",
            f"{fraction} of the node's {_gib(node.total)} is {_gib(requested)}, and a worker's own memory "
            f"(~{_gib(model.worker_footprint)}: runtime and weights) is taken from it, leaving "
            f"{_gib(left)} for a KV cache that needs at least {_gib(model.one_sequence_bytes)}; {fix}",
        )


def kv_bytes_per_token(text_configs: Sequence, dtype_bytes: int, tensor_parallel_size: int = 1) -> int:
    """K and V of every attention layer of every sub-model, per token, on one worker."""
    total = 0
    for config in text_configs:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        total += 2 * config.num_hidden_layers * math.ceil(kv_heads / tensor_parallel_size) * head_dim * dtype_bytes
    return total


def checkpoint_bytes(path: str, dtype) -> int:
    """Bytes of a local checkpoint's weights once loaded (safetensors headers only; 0 if none are
    local): floating tensors in the engine's `dtype`, quantized codes (integers, float8) at their
    own width, so a quantized checkpoint counts what it really takes."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as weights:
            for name in weights.keys():
                stored = weights.get_slice(name)
                width = dtype.itemsize if stored.get_dtype() in _CAST_TO_MODEL_DTYPE else _width(stored.get_dtype())
                total += math.prod(stored.get_shape()) * width
    return total


_CAST_TO_MODEL_DTYPE = frozenset({"F64", "F32", "F16", "BF16"})  # vLLM loads these in the engine's dtype


def _width(stored: str) -> int:
    """Bytes per element of a safetensors dtype name (`I8`, `I32`, `F8_E4M3`, `BOOL`, ...)."""
    bits = "".join(c for c in stored.split("_")[0] if c.isdigit())
    return max(int(bits) // 8, 1) if bits else 1


def model_memory(vllm_config, expert_paths: Sequence[str]) -> ModelMemory:
    """Weights and per-token KV bytes of the base (vLLM's primary model) and every expert checkpoint,
    each at its own precision: a quantized base counts its quantized bytes."""
    from transformers import AutoConfig
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype

    model_config, parallel = vllm_config.model_config, vllm_config.parallel_config
    kv_dtype = kv_cache_dtype_str_to_dtype(vllm_config.cache_config.cache_dtype, model_config)
    texts = [model_config.hf_text_config] + [AutoConfig.from_pretrained(p).get_text_config() for p in expert_paths]
    return ModelMemory(
        weight_bytes=sum(checkpoint_bytes(path, model_config.dtype) for path in (model_config.model, *expert_paths)),
        kv_bytes_per_token=kv_bytes_per_token(texts, kv_dtype.itemsize, parallel.tensor_parallel_size),
        max_model_len=model_config.max_model_len,
        block_size=vllm_config.cache_config.block_size,
        num_workers=parallel.world_size,
    )


def node_memory() -> NodeMemory:
    """The memory of the NUMA node vLLM's CPU worker binds to (its first allowed core's)."""
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

    node = get_allowed_cpu_list()[0].numa_node
    info = get_memory_node_info(node)
    return NodeMemory(node, info.total_memory, info.available_memory)


def _gib(size: float) -> str:
    return f"{size / GiB:.2f} GiB"
