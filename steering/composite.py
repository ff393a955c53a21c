"""The composite vLLM model: a frozen base and expert pairs run as one model on the same tokens.

vLLM sees one model. `forward` runs every sub-model (each its own vLLM implementation, with its
own paged KV cache layers) on the same `input_ids/positions` and concatenates their hidden
states; `compute_logits` splits them, computes each pair's `tuned - untuned` logits and steers
the base logits with each request's alphas through `steering.steer.LINK`.

Every sub-model runs on every token, always: a prefix-cached block must hold expert KV too.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.backends import set_model_tag
from vllm.config import VllmConfig
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.models.utils import init_vllm_registered_model
from vllm.transformers_utils.config import get_config

from steering.spec import CompositeSpec
from steering.steer import LINK, fit_vocab


def _sub_model(vllm_config: VllmConfig, hf_config, name: str, architectures: list[str]) -> nn.Module:
    # A distinct model tag per sub-model keeps torch.compile caches from colliding.
    with set_model_tag(name):
        return init_vllm_registered_model(
            vllm_config, hf_config=hf_config, prefix=name, architectures=architectures
        )


class ProxyTunedForCausalLM(nn.Module):
    """`base` plus `experts.<pair>.tuned/untuned`, each built with its own architecture's class."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        hf_config = vllm_config.model_config.hf_config
        self.spec = CompositeSpec.from_hf_config(hf_config)
        self.vocab_size = hf_config.get_text_config().vocab_size
        self.base = _sub_model(vllm_config, hf_config, "base", list(self.spec.base_architectures))
        self.experts = nn.ModuleDict({pair.name: nn.ModuleDict() for pair in self.spec.pairs})
        # [H_base, H_tuned_0, H_untuned_0, ...]: widths of the concatenated hidden states.
        self.hidden_widths = [hf_config.get_text_config().hidden_size]
        for module_name, path in self.spec.expert_checkpoints:
            config = get_config(path, trust_remote_code=False)
            _, pair, role = module_name.split(".")
            self.experts[pair][role] = _sub_model(vllm_config, config, module_name, config.architectures)
            self.hidden_widths.append(config.get_text_config().hidden_size)
        # Base first, then each pair tuned before untuned: the order of hidden_widths. A plain
        # tuple (the modules are registered above), so the hot path never walks the module tree.
        self.sub_models = (self.base, *(self.get_submodule(name) for name, _ in self.spec.expert_checkpoints))
        # The base checkpoint is vLLM's primary weight source; experts load from their own folders.
        self.secondary_weights = [
            DefaultModelLoader.Source(path, revision=None, prefix=f"{module_name}.")
            for module_name, path in self.spec.expert_checkpoints
        ]

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
        return torch.cat([model(input_ids, positions) for model in self.sub_models], dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # hidden_states: [N, sum(hidden_widths)] -> steered logits [N, V] (deltas: P x [N, V]).
        parts = hidden_states.split(self.hidden_widths, dim=-1)
        models = self.sub_models
        base_logits = models[0].compute_logits(parts[0])
        deltas = [
            fit_vocab(tuned.compute_logits(h_tuned), self.vocab_size)
            - fit_vocab(untuned.compute_logits(h_untuned), self.vocab_size)
            for tuned, untuned, h_tuned, h_untuned in zip(models[1::2], models[2::2], parts[1::2], parts[2::2])
        ]
        return LINK.steer(base_logits, deltas)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Route each source's weights to its sub-model; sources arrive one after another."""
        loaded: set[str] = set()
        for prefix, group in itertools.groupby(weights, key=lambda item: self._route(item[0])):
            model = self.get_submodule(prefix.rstrip("."))
            names = model.load_weights((name.removeprefix(prefix), tensor) for name, tensor in group)
            loaded |= {prefix + name for name in names}
        return loaded

    def _route(self, name: str) -> str:
        if name.startswith("experts."):
            return ".".join(name.split(".")[:3]) + "."
        return "base."
