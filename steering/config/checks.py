"""What `load_deployment` checks beyond the schema, before any engine starts: every checkpoint
opens and runs in vLLM (architecture, tokenizer, quantization, sharding), a LoRA adapter fits its
untuned model (and is merged, `adapters`), and vLLM's executor can place its workers; and which
policies the engine's model runner can serve. Each refusal is a `ConfigError` naming the field.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from steering.config.adapters import tuned_checkpoint
from steering.config.schema import Deployment, read_deployment
from steering.errors import ConfigError
from steering.quantization import (
    CpuKernels,
    checkpoint_int8_weights,
    codes_refusal,
    cpu_refusal,
    first_code_beyond,
    int8_code_limit,
    quantization,
)
from steering.reasoning import reasoning_parser_class
from steering.rules.decisions import label_first_tokens


def load_deployment(path: str | Path, *, calibrating: bool = False) -> Deployment:
    """Read, validate and check a deployment YAML file; fail with the offending field named."""
    deployment = read_deployment(path, calibrating=calibrating)
    check_executor(deployment)
    check_checkpoints(deployment)
    return deployment


def check_executor(deployment: Deployment) -> None:
    """vLLM's Ray executor places workers by device; vLLM's CPU build has no device Ray can place
    (its `ray_device_key` is empty) and fails only after starting Ray. Refuse that here."""
    if (deployment.engine.model_extra or {}).get("distributed_executor_backend") != "ray":
        return
    from vllm.platforms import current_platform

    field = "engine.distributed_executor_backend"
    if not current_platform.ray_device_key:
        raise ConfigError(field, f"vLLM's {current_platform.device_name} build does not support the Ray executor "
                                 f"(its platform names no device for Ray to place workers on); leave it unset: "
                                 "tensor_parallel_size runs within one machine on vLLM's own processes")
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(field, "needs the ray package on every node (vLLM's GPU image has it): pip install ray")


def check_checkpoints(deployment: Deployment) -> None:
    """Every checkpoint loads and runs in vLLM (and shards, under tensor parallelism), its
    quantization runs right on this CPU, experts share the base's tokenizer, labels are separable.
    A tuned adapter is checked as the checkpoint it is merged into."""
    tensor_parallel = deployment.engine.tensor_parallel_size
    base_config, base_tokenizer = _open_checkpoint("base", deployment.base)
    _check_shards("base", base_config, tensor_parallel)
    _check_quantization("base", deployment.base, base_config)
    reasoning_parser_class(deployment, base_tokenizer)
    base_vocab = base_tokenizer.get_vocab()
    for name, pair in deployment.experts.items():
        for role, path in (("tuned", tuned_checkpoint(name, pair)), ("untuned", pair.untuned)):
            field = f"experts.{name}.{role}"
            config, tokenizer = _open_checkpoint(field, path)
            _check_shards(field, config, tensor_parallel)
            _compare_vocab(field, tokenizer.get_vocab(), base_vocab)
            _check_quantization(field, path, config)
    for name, policy in deployment.policies.items():
        if policy.decision:
            try:
                label_first_tokens(lambda text: base_tokenizer.encode(text, add_special_tokens=False),
                                   policy.decision.labels)
            except ValueError as error:
                raise ConfigError(f"policies.{name}.decision.labels", str(error)) from None


def _open_checkpoint(field: str, path: str):
    """Check that `path` holds a vLLM-supported model; return its config and tokenizer."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer
    from vllm import ModelRegistry

    if not Path(path).exists() and not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        raise ConfigError(field, f"path {path!r} does not exist")
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ConfigError(field, f"cannot load a model and tokenizer from {path!r}: {error}") from None
    architectures = getattr(config, "architectures", None) or []
    # vLLM serves an architecture natively, or through its Transformers modeling backend when
    # transformers has the class (whether that class suits the backend, vLLM checks at start).
    if not any(arch in ModelRegistry.get_supported_archs() or hasattr(transformers, arch) for arch in architectures):
        raise ConfigError(field, f"architecture {architectures} of {path!r} is served by vLLM neither natively nor "
                                 "through its Transformers backend")
    return config, tokenizer


def _check_shards(field: str, config, tensor_parallel: int) -> None:
    """vLLM splits attention heads across tensor-parallel ranks, and KV heads too (or replicates them)."""
    if tensor_parallel == 1:
        return
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % tensor_parallel:
        raise ConfigError(field, f"num_attention_heads {heads} is not divisible by engine.tensor_parallel_size "
                                 f"{tensor_parallel}: vLLM gives each rank an equal share of the heads")
    if kv_heads % tensor_parallel and tensor_parallel % kv_heads:
        raise ConfigError(field, f"num_key_value_heads {kv_heads} neither divides nor is divisible by "
                                 f"engine.tensor_parallel_size {tensor_parallel}: vLLM can neither split nor "
                                 "replicate them evenly")


def _compare_vocab(field: str, vocab: dict[str, int], base_vocab: dict[str, int]) -> None:
    """Every base token must mean the same id to the expert; extra expert tokens are sliced away."""
    differing = sorted(
        ((token, index) for token, index in base_vocab.items() if vocab.get(token) != index),
        key=lambda item: item[1],
    )
    if differing:
        token, index = differing[0]
        raise ConfigError(
            field,
            f"tokenizer differs from the base's ({len(differing)} of the base's {len(base_vocab)} "
            f"tokens differ, first {token!r} (id {index}) -> {vocab.get(token)}); "
            "proxy-tuning needs a shared vocabulary",
        )


def _check_quantization(field: str, path: str, config) -> None:
    """Each sub-model runs with its own quantization; refuse what vLLM's CPU kernels cannot run
    here, or would compute wrongly (`steering.quantization`). On a GPU, vLLM's own checks apply.
    The int8 codes of a checkpoint that is not local are checked by the composite as it loads."""
    from vllm.platforms import current_platform

    found = quantization(config)
    if found is None or not current_platform.is_cpu():
        return
    kernels = CpuKernels.detect()
    reason = cpu_refusal(found, kernels)
    if reason is not None:
        raise ConfigError(field, reason)
    limit = int8_code_limit(found, kernels)
    beyond = None if limit is None else first_code_beyond(checkpoint_int8_weights(path), limit)
    if beyond is not None:
        raise ConfigError(field, codes_refusal(*beyond, limit, kernels))


def check_policies_on_runner(deployment: Deployment, *, logprobs_at_temperature_one: bool) -> None:
    """Abstention and decisions read steered logprobs at temperature 1: refused where the runner
    gives none (Model Runner V2 steers inside the sampler, after temperature)."""
    if logprobs_at_temperature_one:
        return
    for name, policy in deployment.policies.items():
        if policy.abstain or policy.decision:
            raise ConfigError(
                f"policies.{name}",
                "abstention and decisions need steered logprobs at temperature 1, which only vLLM's "
                "V1 model runner gives here: unset VLLM_USE_V2_MODEL_RUNNER",
            )
