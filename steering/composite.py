"""The composite vLLM model: a frozen base and expert pairs run as one model on the same tokens.

vLLM sees one model. `forward` runs every sub-model (each its own vLLM implementation, with its
own paged KV cache layers) on the same `input_ids/positions` and concatenates their hidden
states; `compute_logits` splits them, computes each pair's `tuned - untuned` logits and steers
the base logits with each request's alphas through `steering.steer.LINK`.

Every sub-model runs on every token, always: a prefix-cached block must hold expert KV too.
Each sub-model has its own quantization (a quantized base beside full-precision experts, or the
reverse); what vLLM's CPU kernels would get wrong is refused (`steering.quantization`).

Besides the sampler's rows (one per request, in batch order), vLLM's V1 runner asks
`compute_logits` for prompt logprobs with a slice of one request's rows of this step's hidden
states. `_Step` recognises such a slice and names its request, so it is steered with that
request's alphas: prompt logprobs are of the steered distribution too, unless the request is a
trace's view (`steering.steer.VIEW_KEY`): then they are of the one sub-model it names, alone.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.backends import set_model_tag
from vllm.config import ModelConfig, VllmConfig
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.model_loader.utils import initialize_model

from steering.quantization import CpuKernels, checked_codes, cpu_refusal, int8_code_limit, quantization
from steering.spec import CompositeSpec
from steering.steer import LINK, fit_vocab


@dataclasses.dataclass(frozen=True)
class _Step:
    """Where the last forward's hidden states live, and where each request's tokens start in them."""

    storage: int  # data_ptr of the hidden states' storage: alive until the runner's step ends
    offset: int
    row_stride: int
    query_starts: torch.Tensor | None  # [num_reqs + 1], batch order; None outside a real step

    @classmethod
    def of(cls, hidden: torch.Tensor) -> _Step:
        starts = None
        if is_forward_context_available():
            metadata = get_forward_context().attn_metadata
            for layer in (metadata.values() if isinstance(metadata, dict) else ()):
                if getattr(layer, "query_start_loc", None) is not None:
                    starts = layer.query_start_loc.clone()  # the runner reuses its buffer next step
                    break
        return cls(hidden.untyped_storage().data_ptr(), hidden.storage_offset(), hidden.stride(0), starts)

    def request_of(self, rows: torch.Tensor) -> int | None:
        """The batch index of the request whose tokens `rows` are, if they are a slice of this
        step's hidden states (prompt logprobs); None for anything else (the sampler's gather)."""
        if rows.numel() == 0 or rows.untyped_storage().data_ptr() != self.storage:
            return None
        if self.query_starts is None:
            raise RuntimeError("prompt logprobs without the batch's query_start_loc: cannot steer them")
        first = (rows.storage_offset() - self.offset) // self.row_stride
        starts = self.query_starts.tolist()
        request = bisect.bisect_right(starts, first) - 1
        if not (0 <= request < len(starts) - 1 and first + rows.shape[0] <= starts[request + 1]):
            raise RuntimeError(f"rows {first}..{first + rows.shape[0]} are not one request's tokens: {starts}")
        return request


def _sub_model_config(engine: ModelConfig, checkpoint: str) -> ModelConfig:
    """A complete model config of `checkpoint`, built the way vLLM builds its draft model's.

    Everything vLLM derives from a checkpoint (text config, head counts and size, vocabulary,
    architecture and implementation, max positions checked against max_model_len) is the
    sub-model's own; the engine-wide choices are copied. `VllmConfig.with_hf_config` swaps only
    `hf_config` and keeps the base's `hf_text_config`, so the head counts of a sub-model served
    through vLLM's Transformers backend would be the base's.
    """
    config = ModelConfig(
        model=checkpoint,
        tokenizer=checkpoint,
        dtype=engine.dtype,  # resolved once for the engine: hidden states are concatenated
        max_model_len=engine.max_model_len,
        seed=engine.seed,
        trust_remote_code=engine.trust_remote_code,
        model_impl=engine.model_impl,
        config_format=engine.config_format,
        enforce_eager=engine.enforce_eager,
        disable_sliding_window=engine.disable_sliding_window,
    )
    # A view inside the engine's config, as with `with_hf_config`: VllmConfig skips re-validation.
    config.is_submodel_config = True
    return config


def _refuse_what_this_cpu_gets_wrong(configs: dict[str, ModelConfig]) -> dict[str, int]:
    """Refuse a sub-model whose quantization vLLM's CPU build cannot run here (`steering.config`
    refuses it at load already; this is for callers who skip that). Returns the bound on the int8
    weight codes of each sub-model that must keep within one here, checked as its weights load."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {}
    kernels = CpuKernels.detect()
    limits = {}
    for name, config in configs.items():
        found = quantization(config.hf_config)
        reason = cpu_refusal(found, kernels)
        if reason is not None:
            raise ValueError(f"{name} {reason}")
        limit = int8_code_limit(found, kernels)
        if limit is not None:
            limits[name] = limit
    return limits


def _sub_model(vllm_config: VllmConfig, model_config: ModelConfig, name: str) -> nn.Module:
    """One sub-model, its layers built with its own quantization config (None: full precision).

    vLLM derives one `quant_config` per engine, from the base's checkpoint; an expert built under
    it would get the base's kernels for weights of another kind. vLLM's loader then runs each
    layer's own `process_weights_after_loading` (the repacking into its kernel's layout) over the
    whole composite, so every sub-model's layers are prepared by their own method.
    """
    try:  # vLLM's own checks of a quantization (the device's capability, the dtype), named
        own = vllm_config.quant_config if name == "base" else VllmConfig.get_quantization_config(
            model_config, vllm_config.load_config)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from error
    # A distinct model tag per sub-model keeps torch.compile caches from colliding. The other
    # configs (cache, compilation) stay shared: every attention layer registers in one KV cache.
    with set_model_tag(name):
        config = dataclasses.replace(vllm_config, model_config=model_config, quant_config=own)
        return initialize_model(vllm_config=config, prefix=name)


class ProxyTunedForCausalLM(nn.Module):
    """`base` plus `experts.<pair>.tuned/untuned`, each built with its own architecture's class.

    A checkpoint named by several pairs (fine-tunes of one small model share its untuned
    version) is one sub-model, named for its first user, run and projected once per step.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        hf_config = vllm_config.model_config.hf_config
        self.spec = CompositeSpec.from_hf_config(hf_config)
        self.vocab_size = hf_config.get_text_config().vocab_size
        # checkpoint path -> module name of its first user; base first, then pair by pair, tuned first.
        owners: dict[str, str] = {}
        for name, path in [("base", vllm_config.model_config.model), *self.spec.expert_checkpoints]:
            owners.setdefault(path, name)
        configs = {name: _sub_model_config(vllm_config.model_config, path) for path, name in owners.items()}
        # sub-model name -> bound on its int8 weight codes, where this CPU needs one (load_weights checks it).
        self.code_limits = _refuse_what_this_cpu_gets_wrong(configs)
        self.base = _sub_model(vllm_config, configs["base"], "base")
        self.experts = nn.ModuleDict({pair.name: nn.ModuleDict() for pair in self.spec.pairs})
        for name in list(owners.values())[1:]:
            _, pair, role = name.split(".")
            self.experts[pair][role] = _sub_model(vllm_config, configs[name], name)
        # One entry per distinct checkpoint, base first: the order of hidden_widths. A plain tuple
        # (the modules are registered above), so the hot path never walks the module tree.
        self.sub_models = tuple(self.get_submodule(name) for name in owners.values())
        # [H_base, H_1, ...]: widths of the concatenated hidden states.
        self.hidden_widths = [configs[name].get_hidden_size() for name in owners.values()]
        # (tuned, untuned) positions in sub_models, per pair in pair order.
        position = {path: i for i, path in enumerate(owners)}
        self.pair_models = tuple((position[pair.tuned], position[pair.untuned]) for pair in self.spec.pairs)
        # view code -> position in sub_models: the base, then each pair's tuned and untuned (steering.steer).
        self.view_models = (0, *(i for pair in self.pair_models for i in pair))
        # The base checkpoint is vLLM's primary weight source; experts load from their own folders.
        self.secondary_weights = [
            DefaultModelLoader.Source(path, revision=None, prefix=f"{name}.") for path, name in owners.items()
            if name != "base"
        ]
        self._step: _Step | None = None

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("proxy-tuning runs every sub-model on token ids, not embeddings")

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if inputs_embeds is not None or intermediate_tensors is not None:
            raise NotImplementedError("proxy-tuning supports neither prompt embeddings nor pipeline parallelism")
        # input_ids, positions: [T] -> hidden: [T, sum(hidden_widths)]
        hidden = torch.cat([model(input_ids, positions) for model in self.sub_models], dim=-1)
        self._step = _Step.of(hidden)
        return hidden

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # hidden_states: [N, sum(hidden_widths)] -> steered logits [N, V] (deltas: P x [N, V]).
        parts = hidden_states.split(self.hidden_widths, dim=-1)
        request = self._step.request_of(hidden_states) if self._step is not None else None
        view = LINK.view_of(request)
        if view is not None:  # a trace's view: one sub-model's logits alone, over the base's vocabulary
            i = self.view_models[view]
            return fit_vocab(self.sub_models[i].compute_logits(parts[i]), self.vocab_size)
        base_logits = self.sub_models[0].compute_logits(parts[0])
        # Each distinct expert checkpoint's logits once, over the base's vocabulary.
        logits = {i: fit_vocab(self.sub_models[i].compute_logits(parts[i]), self.vocab_size)
                  for i in sorted({i for pair in self.pair_models for i in pair})}
        deltas = [logits[tuned] - logits[untuned] for tuned, untuned in self.pair_models]
        return LINK.steer(base_logits, deltas, request=request)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Route each source's weights to its sub-model; sources arrive one after another."""
        loaded: set[str] = set()
        for prefix, group in itertools.groupby(weights, key=lambda item: self._route(item[0])):
            sub_model = prefix.rstrip(".")
            if sub_model in self.code_limits:
                group = checked_codes(sub_model, group, self.code_limits[sub_model], CpuKernels.detect())
            names = self.get_submodule(sub_model).load_weights(
                (name.removeprefix(prefix), tensor) for name, tensor in group)
            loaded |= {prefix + name for name in names}
        return loaded

    def _route(self, name: str) -> str:
        if name.startswith("experts."):
            return ".".join(name.split(".")[:3]) + "."
        return "base."
