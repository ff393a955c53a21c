"""The alpha processor: `logits[r] += sum_i alpha[r, i] * delta_i[r]`, per request, per step.

Alphas come from `SamplingParams.extra_args[ALPHA_KEY]` (a `{pair: alpha}` dict), so requests
in one batch steer differently; a request without it gets alpha 0 (the plain base). Two thin
classes wrap the same `apply_alpha`: one for vLLM's V1 model runner (the CPU path) and one for
Model Runner V2 (the GPU default).
"""

from __future__ import annotations

import math

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor.interface import (
    LogitsContext,
    LogitsProcRequestState,
)
from vllm.v1.worker.gpu.sample.logits_processor.interface import (
    LogitsProcessor as V2LogitsProcessor,
)

from steering.composite import HANDOFF, CompositeSpec

ALPHA_KEY = "proxy_tuning_alpha"


def apply_alpha(logits: torch.Tensor, alpha: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Add each pair's weighted delta to the logits, in place, pair by pair.

    logits: [N, V] base logits; alpha: [N, P]; deltas: [P, N, V] (tuned - untuned).
    The pair-by-pair order is the reference implementation's, so float32 sums agree.
    """
    for i in range(deltas.shape[0]):
        logits += alpha[:, i : i + 1] * deltas[i]
    return logits


def alpha_row(params, pair_names: tuple[str, ...]) -> list[float]:
    """A request's alphas in pair order; pairs it does not name get 0."""
    requested = (params.extra_args or {}).get(ALPHA_KEY) or {}
    unknown = set(requested) - set(pair_names)
    if unknown:
        raise ValueError(f"unknown expert pair(s) {sorted(unknown)}; this engine has {list(pair_names)}")
    return [float(requested.get(name, 0.0)) for name in pair_names]


def validate_alpha(params) -> None:
    """Admission check: the alpha dict maps names to finite numbers."""
    requested = (params.extra_args or {}).get(ALPHA_KEY)
    if requested is None:
        return
    if not isinstance(requested, dict):
        raise ValueError(f"{ALPHA_KEY} must be a mapping of expert pair to alpha")
    for name, value in requested.items():
        if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{ALPHA_KEY}[{name!r}] must be a number")
        if not math.isfinite(value):
            raise ValueError(f"{ALPHA_KEY}[{name!r}] must be finite, got {value}")


class AlphaLogitsProcessor(V1LogitsProcessor):
    """V1 runner interface: a dense [max_num_reqs, P] alpha table kept in batch order."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.pair_names = CompositeSpec.from_hf_config(vllm_config.model_config.hf_config).pair_names
        num_slots = vllm_config.scheduler_config.max_num_seqs
        self.alpha = torch.zeros(num_slots, len(self.pair_names), dtype=torch.float32, device=device)

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_alpha(sampling_params)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.alpha[index] = 0.0
        for index, params, _, _ in batch_update.added:
            self.alpha[index] = torch.tensor(alpha_row(params, self.pair_names))
        for src, dst, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                self.alpha[[src, dst]] = self.alpha[[dst, src]]
            else:
                self.alpha[dst] = self.alpha[src]
                self.alpha[src] = 0.0

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        num_rows = logits.shape[0]
        return apply_alpha(logits, self.alpha[:num_rows], HANDOFF.take(num_rows))


class AlphaLogitsProcessorV2(V2LogitsProcessor):
    """Model Runner V2 interface: alphas by request slot, gathered per logits row."""

    def __init__(self, vllm_config, req_states: LogitsProcRequestState):
        self.pair_names = CompositeSpec.from_hf_config(vllm_config.model_config.hf_config).pair_names
        self.alpha = torch.zeros(
            req_states.max_num_reqs, len(self.pair_names), dtype=torch.float32, device=req_states.device
        )

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_alpha(sampling_params)

    def add_request(self, req_idx: int, sampling_params) -> bool:
        row = alpha_row(sampling_params, self.pair_names)
        self.alpha[req_idx] = torch.tensor(row)
        # The sampler skips processors for batches where no request needs them; then the
        # handoff is simply overwritten by the next step's deltas.
        return any(row)

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        num_rows = logits.shape[0]
        alpha = self.alpha[ctx.expanded_idx_mapping]  # [N, P]
        return apply_alpha(logits, alpha, HANDOFF.take(num_rows))
