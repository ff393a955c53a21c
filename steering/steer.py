"""The hot path: `logits[r] += sum_i alpha[r, i] * (tuned_i - untuned_i)[r]`, and what joins its halves.

Plain tensor code shared by the composite model and the transformers reference, so float32 sums
agree by construction. vLLM gives the model no per-request data and the logits processor no
reference to the model; both live in the same worker process (one engine per worker is vLLM's
invariant), so `LINK` joins them:

- V1 model runner: the processor keeps the `[max_num_seqs, P]` alpha table in batch order,
  updated when the batch changes; `compute_logits` steers with it, so the sampler's input (and
  vLLM's `raw_logprobs`) is already the steered distribution at temperature 1.
- Model Runner V2: rows map to requests only inside the sampler, so `compute_logits` hands the
  deltas over and the processor steers in `apply`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

ALPHA_KEY = "proxy_tuning_alpha"  # SamplingParams.extra_args key: one alpha per pair, in pair order
# SamplingParams.extra_args key of a trace's view: the request's prompt logprobs are of one sub-model
# alone, `BASE_VIEW` or `expert_view(pair, role)`; its sampled token is steered as any other.
VIEW_KEY = "proxy_tuning_view"
BASE_VIEW = 0


def expert_view(pair: int, role: str) -> int:
    """The view code of pair `pair`'s tuned or untuned model (pairs in the engine's pair order)."""
    return 1 + 2 * pair + (role == "untuned")


def fit_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Slice a padded expert vocabulary to the base's (or zero-pad a shorter one)."""
    if logits.shape[-1] >= vocab_size:
        return logits[..., :vocab_size]
    return torch.nn.functional.pad(logits, (0, vocab_size - logits.shape[-1]))


def apply_alpha(logits: torch.Tensor, alpha: torch.Tensor, deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Add each pair's weighted delta to the logits, in place, pair by pair.

    logits: [N, V] base logits; alpha: [N, P]; deltas: P tensors [N, V] (tuned - untuned).
    """
    for i, delta in enumerate(deltas):
        logits.addcmul_(alpha[:, i : i + 1], delta)
    return logits


class SteeringLink:
    """Joins the alpha processor and the composite's `compute_logits` inside one worker."""

    def __init__(self) -> None:
        self.alpha: torch.Tensor | None = None  # V1: [max_num_seqs, P], batch order
        self.view: torch.Tensor | None = None  # V1: [max_num_seqs] view codes, batch order (-1: steered)
        self.steers_in_processor = False  # V2
        self._deltas: Sequence[torch.Tensor] | None = None

    def steer(self, logits: torch.Tensor, deltas: Sequence[torch.Tensor], *, request: int | None = None) -> torch.Tensor:
        """Called by `compute_logits` with base logits [N, V] and P deltas [N, V]: one row per
        request in batch order, or all rows of the request at batch index `request` (its prompt)."""
        num_rows = logits.shape[0]
        if request is not None:
            if self.alpha is None:
                raise RuntimeError("prompt logprobs are steered on vLLM's V1 model runner only")
            return apply_alpha(logits, self.alpha[request].expand(num_rows, -1), deltas)
        if self.alpha is not None:
            if num_rows > self.alpha.shape[0]:
                raise RuntimeError(f"{num_rows} logits rows but alphas for only {self.alpha.shape[0]} requests")
            return apply_alpha(logits, self.alpha[:num_rows], deltas)
        if self.steers_in_processor:
            self._deltas = deltas
            return logits
        raise RuntimeError("no proxy-tuning logits processor in this engine: refusing to sample unsteered")

    def view_of(self, request: int | None) -> int | None:
        """The view of the request at batch index `request` whose prompt rows are asked for, if it has one."""
        if request is None or self.view is None:
            return None
        view = int(self.view[request])
        return view if view >= 0 else None

    def take_deltas(self, num_rows: int) -> Sequence[torch.Tensor]:
        """V2: this step's deltas, once; stale or missing ones fail loudly."""
        deltas, self._deltas = self._deltas, None
        if deltas is None or (deltas and deltas[0].shape[0] != num_rows):
            got = "none" if deltas is None else f"{deltas[0].shape[0]} rows"
            raise RuntimeError(f"steering deltas out of step with the sampler: want {num_rows} rows, got {got}")
        return deltas


LINK = SteeringLink()
