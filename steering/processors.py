"""The alpha processors: vLLM's logits-processor interfaces around `steering.steer`.

Each request's alphas come in `SamplingParams.extra_args[ALPHA_KEY]`, a row in pair order that
`steering.policy` resolved; a request without one gets 0 (the plain base). The V1 class owns the
alpha table `compute_logits` steers with; the V2 class steers in the sampler (see steering.steer).
"""

from __future__ import annotations

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
from steering.steer import ALPHA_KEY, LINK, VIEW_KEY, apply_alpha


def alpha_row(params, num_pairs: int) -> torch.Tensor:
    """A request's alphas, one per pair in pair order (resolved by `steering.policy`); none: 0."""
    row = (params.extra_args or {}).get(ALPHA_KEY)
    if row is None:
        return torch.zeros(num_pairs)
    if len(row) != num_pairs:
        raise ValueError(f"{ALPHA_KEY} has {len(row)} alphas; this engine has {num_pairs} expert pairs")
    return torch.tensor(row, dtype=torch.float32)


def view_code(params) -> int:
    """A trace request's view (`steering.steer.VIEW_KEY`); -1 for every other request."""
    return (params.extra_args or {}).get(VIEW_KEY, -1)


def validate_alpha(params) -> None:
    """vLLM's admission hook: the row is a list of numbers, the view a whole number (what
    `SteeringEngine` sends)."""
    row = (params.extra_args or {}).get(ALPHA_KEY)
    if row is not None and not (isinstance(row, list | tuple) and all(
            isinstance(a, int | float) and not isinstance(a, bool) for a in row)):
        raise ValueError(f"{ALPHA_KEY} must be a list of numbers, one per expert pair")
    view = view_code(params)
    if not isinstance(view, int) or isinstance(view, bool) or view < -1:
        raise ValueError(f"{VIEW_KEY} must be a view code (0: the base; 1 + 2 * pair + untuned: an expert)")


class AlphaLogitsProcessor(V1LogitsProcessor):
    """V1 runner interface: owns the alpha table that `compute_logits` steers with, and the view
    table it reads for a trace's prompt rows."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.num_pairs = len(CompositeSpec.from_hf_config(vllm_config.model_config.hf_config).pairs)
        num_slots = vllm_config.scheduler_config.max_num_seqs
        self.alpha = torch.zeros(num_slots, self.num_pairs, dtype=torch.float32, device=device)
        # On the CPU: read one entry at a time, for prompt rows only, never in the sampler's path.
        self.view = torch.full((num_slots,), -1, dtype=torch.long)
        LINK.alpha, LINK.view = self.alpha, self.view

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
            self.alpha[index], self.view[index] = 0.0, -1
        for index, params, _, _ in batch_update.added:
            self.alpha[index], self.view[index] = alpha_row(params, self.num_pairs), view_code(params)
        for src, dst, direction in batch_update.moved:
            for table, empty in ((self.alpha, 0.0), (self.view, -1)):
                if direction == MoveDirectionality.SWAP:
                    table[[src, dst]] = table[[dst, src]]
                else:
                    table[dst] = table[src]
                    table[src] = empty

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


class AlphaLogitsProcessorV2(V2LogitsProcessor):
    """Model Runner V2 interface: alphas by request slot, gathered per logits row in `apply`."""

    def __init__(self, vllm_config, req_states: LogitsProcRequestState):
        self.num_pairs = len(CompositeSpec.from_hf_config(vllm_config.model_config.hf_config).pairs)
        self.alpha = torch.zeros(req_states.max_num_reqs, self.num_pairs, dtype=torch.float32, device=req_states.device)
        LINK.steers_in_processor = True

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_alpha(sampling_params)

    def add_request(self, req_idx: int, sampling_params) -> bool:
        row = alpha_row(sampling_params, self.num_pairs)
        self.alpha[req_idx] = row
        # The sampler skips processors for batches where no request needs them; then the
        # deltas are simply overwritten by the next step's.
        return bool(row.any())

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        num_rows = logits.shape[0]
        alpha = self.alpha[ctx.expanded_idx_mapping]  # [N, P]
        return apply_alpha(logits, alpha, LINK.take_deltas(num_rows))
