"""The engine facade: one vLLM `AsyncLLM` running the composite model, steered per request.

It takes vLLM's client and the base's tokenizer, so a test's fake vLLM goes through the same
constructor. What runs on top of it (admission, the policy kinds, scoring) lives in its own
modules; this one only talks to vLLM.
"""

from __future__ import annotations

import gc
import logging
import os
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

from transformers import AutoTokenizer
from vllm import SamplingParams
from vllm.config import StructuredOutputsConfig, VllmConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.outputs import RequestOutput
from vllm.platforms import current_platform
from vllm.renderers.inputs.preprocess import parse_model_prompt
from vllm.utils.cpu_resource_utils import get_visible_memory_node
from vllm.v1.engine.async_llm import AsyncLLM

from steering.config import Deployment, checkpoint_name, tuned_checkpoint
from steering.config.checks import check_policies_on_runner
from steering.errors import ConfigError, EngineStartError, InvalidRequest, SteeringError, vllm_refusal
from steering.memory import (
    GiB,
    NodeMemory,
    check_fraction,
    check_kv_cache_bytes,
    default_kv_cache,
    model_memory,
    node_memory,
)
from steering.prompts import Prompts
from steering.spec import CompositeSpec, ExpertPairSpec
from steering.steer import ALPHA_KEY, VIEW_KEY
from steering.threads import cpu_worker_binding

logger = logging.getLogger("steer.engine")
V1_PROCESSOR = "steering.processors:AlphaLogitsProcessor"
V2_PROCESSOR = "steering.processors:AlphaLogitsProcessorV2"
# vLLM's V1 model runner unless the operator chose: the V2 processor class has not yet run where a
# GPU was lent, and CPUs run V1 anyway (Model Runner V2 needs Triton). vLLM reads it from the
# environment when it builds its config, so every way of starting an engine sets it here.
RUNNER_VARIABLE = "VLLM_USE_V2_MODEL_RUNNER"


def composite_spec(deployment: Deployment) -> CompositeSpec:
    """The expert pairs, as the composite model reads them from vLLM's HF config; a tuned LoRA
    adapter as the checkpoint it is merged into (`steering.config.adapters`)."""
    return CompositeSpec(tuple(ExpertPairSpec(name, tuned_checkpoint(name, p), p.untuned)
                               for name, p in deployment.experts.items()))


def engine_args(deployment: Deployment) -> AsyncEngineArgs:
    """vLLM engine arguments: the base checkpoint as the primary model, the composite on top."""
    # vLLM labels its metrics with the served model name, by default the base's path.
    options = {"disable_log_stats": True, "served_model_name": checkpoint_name(deployment.base),
               **deployment.engine.engine_kwargs()}
    if isinstance(options.get("structured_outputs_config"), Mapping):  # built from YAML as vLLM's CLI builds it
        options["structured_outputs_config"] = StructuredOutputsConfig(**options["structured_outputs_config"])
    if deployment.reasoning_parser is not None:  # as `vllm serve --reasoning-parser`: grammars hold the final answer
        options["reasoning_parser"] = deployment.reasoning_parser
    return AsyncEngineArgs(
        model=deployment.base, hf_overrides=composite_spec(deployment).hf_overrides(), **options
    )


def engine_config(deployment: Deployment, *, node: NodeMemory | None = None) -> VllmConfig:
    """vLLM's config of the composite engine, checked before any engine process starts.

    On CPU the KV cache is sized in bytes (`steering.memory`); `node` stands in for the NUMA
    node's memory in tests. Raises `ConfigError` naming the engine field at fault.
    """
    os.environ.setdefault(RUNNER_VARIABLE, "0")
    try:
        vllm_config = engine_args(deployment).create_engine_config()
    except (ValueError, TypeError) as error:  # vLLM's config checks; pydantic's errors are ValueErrors
        raise _engine_option_error(deployment, error) from None
    if current_platform.is_cpu():
        _size_cpu_kv_cache(vllm_config, deployment, node or node_memory())
    model_config = vllm_config.model_config
    if vllm_config.use_v2_model_runner:
        check_policies_on_runner(deployment, logprobs_at_temperature_one=False)
        # Steering happens inside the sampler: only processed logprobs see it.
        model_config.logits_processors, model_config.logprobs_mode = [V2_PROCESSOR], "processed_logprobs"
    else:
        # Steering happens in compute_logits: raw logprobs are steered, at temperature 1.
        model_config.logits_processors, model_config.logprobs_mode = [V1_PROCESSOR], "raw_logprobs"
    return vllm_config


def _size_cpu_kv_cache(vllm_config: VllmConfig, deployment: Deployment, node: NodeMemory) -> None:
    """Give the CPU worker an explicit KV cache size in bytes, or refuse a size that cannot fit."""
    options = deployment.engine
    # Each distinct checkpoint once: pairs that share one share its sub-model.
    experts = list(dict.fromkeys(path for _, path in composite_spec(deployment).expert_checkpoints))
    model = model_memory(vllm_config, experts)
    if options.kv_cache_size is not None:
        plan = check_kv_cache_bytes(*options.kv_cache_size, model, node)
    elif vllm_config.cache_config.kv_cache_memory_bytes is not None:  # vLLM applied VLLM_CPU_KVCACHE_SPACE
        plan = check_kv_cache_bytes("VLLM_CPU_KVCACHE_SPACE", vllm_config.cache_config.kv_cache_memory_bytes,
                                    model, node)
    elif options.gpu_memory_utilization is not None:
        check_fraction(options.gpu_memory_utilization, model, node)
        logger.info("KV cache: vLLM sizes it from engine.gpu_memory_utilization %s (%s)",
                    options.gpu_memory_utilization, node.describe())
        return
    else:
        plan = default_kv_cache(model, node)
    vllm_config.cache_config.kv_cache_memory_bytes = plan.kv_cache_bytes
    logger.info("KV cache: %.3f GiB per worker: %s", plan.kv_cache_bytes / GiB, plan.reason)


def _engine_option_error(deployment: Deployment, error: Exception) -> ConfigError:
    """vLLM refused the engine options: name the option its message mentions, if any."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    for name in deployment.engine.model_dump(exclude_none=True):
        if name in str(error):
            return ConfigError(f"engine.{name}", f"vLLM refused it: {message}")
    return ConfigError("engine", f"vLLM refused the engine options: {message}")


class SteeringEngine:
    """Generation with a per-request alpha row, on one composite vLLM engine."""

    def __init__(self, llm: AsyncLLM, tokenizer, deployment: Deployment):
        self.llm = llm
        # What it runs: the base, the experts, the engine options (a reload changes policies only).
        self.deployment = deployment
        self.prompts = Prompts(tokenizer, llm.renderer)
        self.vllm_config: VllmConfig = llm.vllm_config
        self.max_model_len: int = llm.model_config.max_model_len
        # True on the V1 runner: logprobs are of the steered distribution at temperature 1.
        self.logprobs_at_temperature_one = llm.model_config.logprobs_mode == "raw_logprobs"
        # The prefix cache keeps whole KV blocks of this many tokens; None where it is off.
        cache = llm.vllm_config.cache_config
        self.prefix_cache_block: int | None = cache.block_size if cache.enable_prefix_caching else None
        # The tokens that end an answer, as vLLM stops on them: the tokenizer's EOS and the generation config's.
        ends = llm.model_config.try_get_generation_config().get("eos_token_id")
        ends = set() if ends is None else {ends} if isinstance(ends, int) else set(ends)
        eos = tokenizer.eos_token_id
        self.end_token_ids: tuple[int, ...] = tuple(sorted(ends | ({eos} if eos is not None else set())))

    @classmethod
    def start(cls, deployment: Deployment, vllm_config: VllmConfig | None = None) -> SteeringEngine:
        """Build the composite engine (spawns vLLM's engine processes; takes tens of seconds)."""
        vllm_config = vllm_config or engine_config(deployment)
        binding = nullcontext()
        if current_platform.is_cpu():
            binding = cpu_worker_binding(vllm_config.parallel_config.world_size, len(get_visible_memory_node()))
        try:
            with binding:
                llm = AsyncLLM.from_vllm_config(vllm_config)
        except SteeringError:
            raise
        except Exception as error:
            raise EngineStartError(
                "engine",
                f"the vLLM engine failed to start ({type(error).__name__}: {error}); its own error is in the log "
                "above. Check the engine options and the checkpoints, or run with `steer -v` for vLLM's full log",
            ) from error
        return cls(llm, AutoTokenizer.from_pretrained(deployment.base), deployment)

    async def generate(
        self, prompt: Sequence[int], params: SamplingParams, *, alpha_row: Sequence[float],
        request_id: str | None = None, view: int | None = None, reasoning: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream outputs of one request, steered by `alpha_row` (one alpha per pair, in pair order);
        with a trace's `view`, its prompt logprobs are of that one sub-model alone. `reasoning` is
        what vLLM's chat serving tells the engine of a reasoning base's request (`reasoning_ended`,
        `reasoning_parser_kwargs`): where its grammar starts."""
        if params.logprob_token_ids is not None and self.logprobs_at_temperature_one:
            # vLLM 0.32's V1 sampler prefers token-id logprobs batch-wide: every request in a step
            # with one that asks would get them, its own top logprobs lost (see `steering.scoring`).
            raise InvalidRequest("logprob_token_ids would erase the top logprobs of every request sharing its "
                                 "engine step (vLLM 0.32's V1 sampler); ask with next_token_logprobs",
                                 param="logprob_token_ids")
        params = params.clone()
        params.extra_args = {**(params.extra_args or {}), ALPHA_KEY: list(alpha_row)}
        if view is not None:
            params.extra_args[VIEW_KEY] = view
        parsed = parse_model_prompt(self.llm.model_config, {"prompt_token_ids": list(prompt)})
        (engine_input,) = self.llm.renderer.render_cmpl([parsed])
        request_id = request_id or uuid.uuid4().hex
        stream = self.llm.generate(engine_input, params, request_id, **(reasoning or {}))
        try:
            async for output in stream:
                yield output
        except VLLMClientError as error:
            raise vllm_refusal(error) from None
        except Exception:
            # vLLM registers a request with its output processor before handing it to the engine
            # core, and aborts it only if the hand-over succeeded: a failure in between (a value
            # the core's encoder cannot carry) would leave it unfinished forever. Abort it here.
            await self.llm.abort(request_id)
            raise
        finally:
            # Closing vLLM's generator is what aborts the request when our caller goes away.
            await stream.aclose()

    async def complete(
        self, prompt: Sequence[int], params: SamplingParams, *, alpha_row: Sequence[float],
        request_id: str | None = None, view: int | None = None,
    ) -> RequestOutput:
        """The finished output of one request."""
        final = None
        async for final in self.generate(prompt, params, alpha_row=alpha_row, request_id=request_id, view=view):
            pass
        return final

    def caches_prompt(self, prompt_tokens: int) -> bool:
        """Whether a request on a prompt this long leaves some of it in the prefix cache for the
        next one: vLLM keeps whole KV blocks only, and recomputes a prompt's last token. On CPU
        the default block is 128 tokens, so a shorter prompt is never cached there."""
        return self.prefix_cache_block is not None and prompt_tokens > self.prefix_cache_block

    def check_request(self, prompt: Sequence[int], params: SamplingParams | None, *, limit_field: str = "max_tokens",
                      claim_tokens: int = 0, prompt_field: str = "prompt", constraint: str | None = None) -> None:
        """The engine's limits, checked at admission so that a refusal is an HTTP error rather than
        a failure mid-stream: a prompt that leaves no room in the context (for a claim check, the
        claim and a step after it) or holds a token id outside the vocabulary, a token limit beyond
        it, what vLLM refuses of the parameters. Refusals name the request's fields: `prompt_field`
        (`messages` on chat), `limit_field`, `constraint` (the field a grammar came from)."""
        max_model_len, claim = self.max_model_len, claim_tokens
        if not prompt:
            raise InvalidRequest("the prompt is empty" if prompt_field == "prompt" else
                                 "the chat template renders these messages as nothing", param=prompt_field)
        try:
            self.llm.renderer.validate_token_ids(prompt, parameter=prompt_field)
        except VLLMClientError as error:
            raise vllm_refusal(error, param=prompt_field) from None
        if claim and len(prompt) + claim >= max_model_len:
            raise InvalidRequest(f"the prompt's {len(prompt)} tokens and the claim's {claim} leave no room for the "
                                 f"answer's end in the context of {max_model_len}", param="steering.claim")
        room = max_model_len - len(prompt)
        if room <= 0:
            raise InvalidRequest(f"the prompt has {len(prompt)} tokens; this model's context is {max_model_len}",
                                 param=prompt_field)
        if params is None:
            return
        if params.prompt_logprobs is not None and not self.logprobs_at_temperature_one:
            raise InvalidRequest("prompt logprobs are steered on vLLM's V1 model runner only; this engine runs "
                                 "Model Runner V2", param="prompt_logprobs")
        if params.max_tokens > room:
            raise InvalidRequest(f"{limit_field} {params.max_tokens} plus the prompt's {len(prompt)} tokens exceed "
                                 f"the context of {max_model_len}", param=limit_field)
        config = self.vllm_config
        try:  # vLLM's own checks against this engine (logprob limits, token ids, grammars)
            params.clone().verify(config.model_config, config.speculative_config, config.structured_outputs_config,
                                  self.llm.tokenizer)
        except VLLMClientError as error:  # a grammar vLLM cannot compile names none: the constraint's field
            raise vllm_refusal(error, param=constraint) from None

    @property
    def num_unfinished_requests(self) -> int:
        return self.llm.get_num_unfinished_requests()

    @property
    def errored(self) -> bool:
        """vLLM's engine core has died (or the engine was shut down): no request can be answered."""
        return self.llm.errored

    def shutdown(self) -> None:
        self.llm.shutdown()
        # AsyncLLM sits in reference cycles; collect it now, not during interpreter teardown,
        # where its __del__ would call shutdown again with module globals already gone.
        del self.llm
        gc.collect()
