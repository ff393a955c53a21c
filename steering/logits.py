"""The alpha processor: `logits[r] += sum_i alpha[r, i] * delta_i[r]`, per request, per step.

Alphas come from `SamplingParams.extra_args[ALPHA_KEY]` (a `{pair: alpha}` dict), so requests
in one batch steer differently; a request without it gets alpha 0 (the plain base).

vLLM gives the model no per-request data and the logits processor no reference to the model;
both live in the same worker process, so `LINK` joins them:

- V1 model runner (the CPU path, and pinned on GPU): the processor keeps a `[max_num_seqs, P]`
  alpha table in persistent-batch order, updated in `update_state` before every forward pass,
  and the composite's `compute_logits` steers with it. The sampler's input is then already the
  steered distribution, so vLLM's `raw_logprobs` are steered logprobs at temperature 1 —
  what confidence scores and label probabilities need, whatever the request's temperature.
- Model Runner V2: rows map to requests only inside the sampler (`LogitsContext`), so
  `compute_logits` hands the deltas over and the processor steers in `apply`.
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

from steering.spec import CompositeSpec

ALPHA_KEY = "proxy_tuning_alpha"


def apply_alpha(logits: torch.Tensor, alpha: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Add each pair's weighted delta to the logits, in place, pair by pair.

    logits: [N, V] base logits; alpha: [N, P]; deltas: [P, N, V] (tuned - untuned).
    The pair-by-pair order is the reference implementation's, so float32 sums agree.
    """
    for i in range(deltas.shape[0]):
        logits += alpha[:, i : i + 1] * deltas[i]
    return logits


class SteeringLink:
    """Joins the alpha processor and the composite's `compute_logits` inside one worker."""

    def __init__(self) -> None:
        self.alpha: torch.Tensor | None = None  # V1: [max_num_seqs, P], batch order
        self.steers_in_processor = False  # V2
        self._deltas: torch.Tensor | None = None

    def steer(self, logits: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """Called by `compute_logits` with base logits [N, V] and deltas [P, N, V]."""
        num_rows = logits.shape[0]
        if self.alpha is not None:
            if num_rows > self.alpha.shape[0]:
                raise RuntimeError(f"{num_rows} logits rows but alphas for only {self.alpha.shape[0]} requests")
            return apply_alpha(logits, self.alpha[:num_rows], deltas)
        if self.steers_in_processor:
            self._deltas = deltas
            return logits
        raise RuntimeError("no proxy-tuning logits processor in this engine: refusing to sample unsteered")

    def take_deltas(self, num_rows: int) -> torch.Tensor:
        """V2: this step's deltas, once; stale or missing ones fail loudly."""
        deltas, self._deltas = self._deltas, None
        if deltas is None or deltas.shape[1] != num_rows:
            got = "none" if deltas is None else f"{deltas.shape[1]} rows"
            raise RuntimeError(f"steering deltas out of step with the sampler: want {num_rows} rows, got {got}")
        return deltas


LINK = SteeringLink()


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
    """V1 runner interface: owns the alpha table that `compute_logits` steers with."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.pair_names = CompositeSpec.from_hf_config(vllm_config.model_config.hf_config).pair_names
        num_slots = vllm_config.scheduler_config.max_num_seqs
        self.alpha = torch.zeros(num_slots, len(self.pair_names), dtype=torch.float32, device=device)
        LINK.alpha = self.alpha

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_alpha(sampling_params)

    def is_argmax_invariant(self) -> bool:
        # The logits it receives are already steered; `apply` changes nothing.
        return True

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
        return logits


class AlphaLogitsProcessorV2(V2LogitsProcessor):
    """Model Runner V2 interface: alphas by request slot, gathered per logits row in `apply`."""

    def __init__(self, vllm_config, req_states: LogitsProcRequestState):
        self.pair_names = CompositeSpec.from_hf_config(vllm_config.model_config.hf_config).pair_names
        self.alpha = torch.zeros(
            req_states.max_num_reqs, len(self.pair_names), dtype=torch.float32, device=req_states.device
        )
        LINK.steers_in_processor = True

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_alpha(sampling_params)

    def add_request(self, req_idx: int, sampling_params) -> bool:
        row = alpha_row(sampling_params, self.pair_names)
        self.alpha[req_idx] = torch.tensor(row)
        # The sampler skips processors for batches where no request needs them; then the
        # deltas are simply overwritten by the next step's.
        return any(row)

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        num_rows = logits.shape[0]
        alpha = self.alpha[ctx.expanded_idx_mapping]  # [N, P]
        return apply_alpha(logits, alpha, LINK.take_deltas(num_rows))
