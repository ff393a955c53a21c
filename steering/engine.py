"""The engine facade: one vLLM `AsyncLLM` running the composite model, steered per request."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import jinja2
import jinja2.meta
import numpy as np
from transformers import AutoTokenizer
from vllm import SamplingParams
from vllm.config import VllmConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.outputs import RequestOutput
from vllm.parser.abstract_parser import Parser
from vllm.parser.parser_manager import ParserManager
from vllm.platforms import current_platform
from vllm.renderers.params import ChatParams
from vllm.renderers.inputs.preprocess import parse_model_prompt
from vllm.utils.cpu_resource_utils import get_visible_memory_node
from vllm.v1.engine.async_llm import AsyncLLM

from steering.config import Deployment, PolicyChanges, check_reloadable, checkpoint_name
from steering.errors import ConfigError, EngineStartError, InvalidRequest, SteeringError
from steering.memory import (
    GiB,
    NodeMemory,
    check_fraction,
    check_kv_cache_bytes,
    default_kv_cache,
    model_memory,
    node_memory,
)
from steering.policy import Policies, Steering
from steering.rules.abstention import FirstStep
from steering.spec import CompositeSpec, ExpertPairSpec
from steering.steer import ALPHA_KEY
from steering.threads import cpu_worker_binding

logger = logging.getLogger("steer.engine")
V1_PROCESSOR = "steering.processors:AlphaLogitsProcessor"
V2_PROCESSOR = "steering.processors:AlphaLogitsProcessorV2"


def composite_spec(deployment: Deployment) -> CompositeSpec:
    """The expert pairs, as the composite model reads them from vLLM's HF config."""
    return CompositeSpec(tuple(ExpertPairSpec(name, p.tuned, p.untuned) for name, p in deployment.experts.items()))


def engine_args(deployment: Deployment) -> AsyncEngineArgs:
    """vLLM engine arguments: the base checkpoint as the primary model, the composite on top."""
    # vLLM labels its metrics with the served model name, by default the base's path.
    options = {"disable_log_stats": True, "served_model_name": checkpoint_name(deployment.base),
               **deployment.engine.engine_kwargs()}
    return AsyncEngineArgs(
        model=deployment.base, hf_overrides=composite_spec(deployment).hf_overrides(), **options
    )


def engine_config(deployment: Deployment, *, node: NodeMemory | None = None) -> VllmConfig:
    """vLLM's config of the composite engine, checked before any engine process starts.

    On CPU the KV cache is sized in bytes (`steering.memory`); `node` stands in for the NUMA
    node's memory in tests. Raises `ConfigError` naming the engine field at fault.
    """
    try:
        vllm_config = engine_args(deployment).create_engine_config()
    except (ValueError, TypeError) as error:  # vLLM's config checks; pydantic's errors are ValueErrors
        raise _engine_option_error(deployment, error) from None
    if current_platform.is_cpu():
        _size_cpu_kv_cache(vllm_config, deployment, node or node_memory())
    model_config = vllm_config.model_config
    if vllm_config.use_v2_model_runner:
        _refuse_rules_without_temperature_one(deployment)
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
    experts = list(dict.fromkeys(path for pair in deployment.experts.values() for path in (pair.tuned, pair.untuned)))
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


def answer_logprobs(token_ids: Sequence[int], logprobs: Sequence[dict] | None) -> list[float]:
    """The steered log-probability of each generated token (the request must ask for logprobs)."""
    return [step[token].logprob for step, token in zip(logprobs or (), token_ids)]


def _refuse_rules_without_temperature_one(deployment: Deployment) -> None:
    for name, policy in deployment.policies.items():
        if policy.abstain or policy.decision:
            raise ConfigError(
                f"policies.{name}",
                "abstention and decisions need steered logprobs at temperature 1, which only vLLM's "
                "V1 model runner gives here: unset VLLM_USE_V2_MODEL_RUNNER",
            )


class SteeringEngine:
    """Async generation with per-request alphas over one deployment."""

    def __init__(self, deployment: Deployment, llm: AsyncLLM):
        self.llm = llm
        # True on the V1 runner: logprobs are of the steered distribution at temperature 1.
        self.logprobs_at_temperature_one = llm.model_config.logprobs_mode == "raw_logprobs"
        self.tokenizer = AutoTokenizer.from_pretrained(deployment.base)
        self.policies = Policies.build(deployment, self._encode_text)
        self.max_model_len: int = llm.model_config.max_model_len
        # The prefix cache keeps whole KV blocks of this many tokens; None where it is off.
        cache = llm.vllm_config.cache_config
        self.prefix_cache_block: int | None = cache.block_size if cache.enable_prefix_caching else None
        # The tokens that end an answer, as vLLM stops on them: the tokenizer's EOS and the generation config's.
        ends = llm.model_config.try_get_generation_config().get("eos_token_id")
        ends = set() if ends is None else {ends} if isinstance(ends, int) else set(ends)
        eos = self.tokenizer.eos_token_id
        self.end_token_ids: tuple[int, ...] = tuple(sorted(ends | ({eos} if eos is not None else set())))
        _ = self.tool_parser_class  # a parser the base's tokenizer cannot serve fails the start-up

    @property
    def deployment(self) -> Deployment:
        """The deployment whose policies are served now (its base, experts and engine never change)."""
        return self.policies.deployment

    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def reload(self, deployment: Deployment) -> PolicyChanges:
        """Serve `deployment`'s policies from the next admission on, or raise (`ConfigError`, or
        `RestartRequired` for anything but policies) and keep serving the current ones.

        A request admitted before keeps the `Steering` it resolved, so it finishes on its old
        policy. Call it where requests are admitted (the tokenizer is not shared across threads).
        """
        check_reloadable(self.deployment, deployment)
        if not self.logprobs_at_temperature_one:
            _refuse_rules_without_temperature_one(deployment)
        policies = Policies.build(deployment, self._encode_text)
        previous, self.policies = self.policies, policies  # one assignment: the swap is atomic
        return PolicyChanges.between(previous.deployment, deployment)

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
        return cls(deployment, llm)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def chat_prompt(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        template_kwargs: Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of a conversation (and its tools), rendered by vLLM's chat renderer with the
        base tokenizer's template, as `vllm serve` renders it. The context length is checked at
        admission, by name."""
        variables = {**(template_kwargs or {}), "add_generation_prompt": add_generation_prompt}
        if tools:
            variables["tools"] = list(tools)
        params = ChatParams(chat_template_kwargs=variables)
        tokenize = dataclasses.replace(self.llm.renderer.default_chat_tok_params, max_total_tokens=None)
        try:
            _, (prompt,) = self.llm.renderer.render_chat([list(messages)], params, tokenize)
        except (ValueError, jinja2.TemplateError) as error:  # vLLM's template resolution; the template's own raise
            raise InvalidRequest(f"the base's chat template cannot render this conversation: {error}",
                                 param="messages") from None
        return list(prompt["prompt_token_ids"])

    @functools.cached_property
    def tool_parser_class(self) -> type[Parser] | None:
        """vLLM's parser (tool calls, as `vllm serve --tool-call-parser --enable-auto-tool-choice`)
        for the deployment's `tool_call_parser`, checked against the base's tokenizer."""
        name = self.deployment.tool_call_parser
        if name is None:
            return None
        try:
            return ParserManager.get_parser(tool_parser_name=name, enable_auto_tools=True,
                                            tool_strict_level=self.deployment.tool_strict_level,
                                            model_name=checkpoint_name(self.deployment.base),
                                            tokenizer=self.llm.renderer.tokenizer)
        except TypeError as error:  # vLLM's check that the tokenizer has what the parser needs
            raise ConfigError("tool_call_parser", str(error)) from None

    def tool_parser(self, tools: Sequence[Any]) -> Parser:
        """A fresh parser for one answer (parsers keep state while they read a stream)."""
        return self.tool_parser_class(self.llm.renderer.tokenizer, list(tools), model_config=self.llm.model_config)

    @functools.cached_property
    def chat_template_variables(self) -> frozenset[str]:
        """The variables the base's chat template reads: what `chat_template_kwargs` may set."""
        template = self.tokenizer.chat_template
        if not isinstance(template, str):
            return frozenset()
        return frozenset(jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template)))

    def decode(self, token_ids: Sequence[int], *, param: str = "tokens") -> str:
        """The text of `token_ids`; an id outside the base tokenizer's vocabulary is the request's error."""
        vocabulary = len(self.tokenizer)
        for i, token in enumerate(token_ids):
            if not 0 <= token < vocabulary:
                raise InvalidRequest(f"token id {token} is not in the base's vocabulary of {vocabulary} tokens",
                                     param=f"{param}[{i}]")
        return self.tokenizer.decode(list(token_ids))

    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        *,
        steering: Steering,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream outputs of one request steered as admitted by `Policy.resolve`."""
        if params.logprob_token_ids is not None and self.logprobs_at_temperature_one:
            # vLLM 0.32's V1 sampler prefers token-id logprobs batch-wide: every request in a step
            # with one that asks would get them, its own top logprobs lost. `next_token_logprobs`.
            raise InvalidRequest("logprob_token_ids would erase the top logprobs of every request sharing its "
                                 "engine step (vLLM 0.32's V1 sampler); ask with next_token_logprobs",
                                 param="logprob_token_ids")
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        params = params.clone()
        params.extra_args = {**(params.extra_args or {}), ALPHA_KEY: list(steering.alpha_row)}
        parsed = parse_model_prompt(self.llm.model_config, {"prompt_token_ids": prompt_ids})
        (engine_input,) = self.llm.renderer.render_cmpl([parsed])
        request_id = request_id or uuid.uuid4().hex
        stream = self.llm.generate(engine_input, params, request_id)
        try:
            async for output in stream:
                yield output
        except VLLMClientError as error:
            raise InvalidRequest(str(error), param=getattr(error, "parameter", None)) from None
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
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        *,
        steering: Steering,
        request_id: str | None = None,
    ) -> RequestOutput:
        """The finished output of one request."""
        final = None
        async for final in self.generate(prompt, params, steering=steering, request_id=request_id):
            pass
        return final

    async def next_token_logprobs(
        self,
        prompt: str | Sequence[int],
        tokens: Sequence[int],
        steering: Steering,
        *,
        prompt_logprobs: bool = False,
        request_id: str | None = None,
    ) -> tuple[dict[int, float], RequestOutput]:
        """Steered log-probabilities, at temperature 1, of each of `tokens` next after `prompt`,
        and the first request's output (with the prompt's steered logprobs if `prompt_logprobs`).

        One single-token request per token, its sample forced to it by `allowed_token_ids`: the
        sampler reports a sampled token's logprob from the steered logits, before any mask. Not
        `logprob_token_ids`, which vLLM 0.32's V1 sampler applies to every request of the step (see
        `generate`). Where the prefix cache can keep part of the prompt (`caches_prompt`), the
        first request runs alone and the rest read it from there; else all run together, one step.
        """
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        tokens = list(dict.fromkeys(tokens))
        request_id = request_id or uuid.uuid4().hex

        def ask(i: int) -> Awaitable[RequestOutput]:
            params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=0, allowed_token_ids=[tokens[i]],
                                    ignore_eos=True, prompt_logprobs=0 if prompt_logprobs and i == 0 else None)
            return self.complete(prompt_ids, params, steering=steering,
                                 request_id=f"{request_id}-{i}" if i else request_id)

        if self.caches_prompt(len(prompt_ids)):
            outputs = [await ask(0), *await asyncio.gather(*map(ask, range(1, len(tokens))))]
        else:
            outputs = await asyncio.gather(*map(ask, range(len(tokens))))
        found = {token: output.outputs[0].logprobs[0][token].logprob for token, output in zip(tokens, outputs)}
        return found, outputs[0]

    def caches_prompt(self, prompt_tokens: int) -> bool:
        """Whether a request on a prompt this long leaves some of it in the prefix cache for the
        next one: vLLM keeps whole KV blocks only, and recomputes a prompt's last token. On CPU
        the default block is 128 tokens, so a shorter prompt is never cached there."""
        return self.prefix_cache_block is not None and prompt_tokens > self.prefix_cache_block

    async def label_logprobs(
        self, prompt: str | Sequence[int], steering: Steering, *, request_id: str | None = None
    ) -> list[float]:
        """Steered log-probabilities, at temperature 1, of each of the decision rule's label tokens next."""
        labels = list(steering.rule.label_token_ids)
        found, _ = await self.next_token_logprobs(prompt, labels, steering, request_id=request_id)
        return [found[token] for token in labels]

    async def claim_logprob(self, prompt: Sequence[int], steering: Steering, *, request_id: str | None = None) -> float:
        """Steered log-probability, at temperature 1, that the answer to `prompt` is exactly the
        steering's claim: its tokens, then one of the tokens that end an answer. Single-token
        requests on prompt + claim, one per end token; the first's prompt logprobs score the claim."""
        claim = steering.claim_ids
        ends, first = await self.next_token_logprobs([*prompt, *claim], self.end_token_ids, steering,
                                                     prompt_logprobs=True, request_id=request_id)
        said = sum(entry[token].logprob for entry, token in zip(first.prompt_logprobs[len(prompt):], claim))
        return said + float(np.logaddexp.reduce(list(ends.values())))

    async def first_step(self, prompt: str | Sequence[int], token_ids: Sequence[int],
                         logprobs: Sequence[Mapping[int, Any]], *, familiarity: bool = False) -> FirstStep | None:
        """An answer's first step as the steered distribution (the answer's own logprobs) and the
        base alone see it, and with `familiarity` the base alone's prompt logprobs; None for an
        empty answer. Single-token requests with every alpha 0, so the steered sum is exactly the
        base's logits: one per token of the steered step."""
        if not token_ids:
            return None
        steered = {token: entry.logprob for token, entry in logprobs[0].items()}
        unsteered = Steering(policy="", alpha={}, alpha_row=(0.0,) * len(self.deployment.experts))
        base, first = await self.next_token_logprobs(prompt, list(steered), unsteered, prompt_logprobs=familiarity)
        known = None
        if familiarity:  # entry 0 is None: the first token has no context
            steps = zip(first.prompt_logprobs[1:], first.prompt_token_ids[1:])
            known = [entry[token].logprob for entry, token in steps]
        return FirstStep(token_ids[0], steered, {token: base[token] for token in steered}, known)

    def check_request(self, prompt_ids: list[int], params: SamplingParams, *, limit_field: str = "max_tokens") -> None:
        """Admission: refuse a prompt that leaves no room in the context, or a max_tokens beyond it.

        Callers check before generating (the server at request admission), so a refusal is an
        HTTP error rather than a failure in the middle of a stream.
        """
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if params.prompt_logprobs is not None and not self.logprobs_at_temperature_one:
            raise InvalidRequest("prompt logprobs are steered on vLLM's V1 model runner only; this engine runs "
                                 "Model Runner V2", param="prompt_logprobs")
        room = self.max_model_len - len(prompt_ids)
        if room <= 0:
            raise InvalidRequest(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is {self.max_model_len}",
                param="prompt",
            )
        if params.max_tokens is not None and params.max_tokens > room:
            raise InvalidRequest(
                f"{limit_field} {params.max_tokens} plus the prompt's {len(prompt_ids)} tokens exceed "
                f"the context of {self.max_model_len}",
                param=limit_field,
            )
        try:
            self.verify(params)
        except VLLMClientError as error:
            raise InvalidRequest(str(error), param=getattr(error, "parameter", None)) from None

    def verify(self, params: SamplingParams) -> None:
        """vLLM's own checks of sampling parameters against this engine (logprob limits, token
        ids, structured-output schemas and grammars), run at admission instead of mid-stream."""
        config = self.llm.vllm_config
        params.clone().verify(config.model_config, config.speculative_config, config.structured_outputs_config,
                              self.llm.tokenizer)

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
