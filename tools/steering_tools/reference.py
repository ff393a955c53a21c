"""Proxy-tuning in plain transformers: the test oracle and the benchmark's peer.

No vLLM here. Each model keeps its own KV cache; a batch is left-padded; every step computes
`base + sum_i alpha_i * (tuned_i - untuned_i)` over the base's vocabulary with the serving
path's own `apply_alpha` and `fit_vocab`, so float32 sums agree by construction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from steering.steer import apply_alpha, fit_vocab


@dataclass
class _Stream:
    """One model's state across a batched generation."""

    model: torch.nn.Module
    cache: DynamicCache


def _load(path: str, dtype: torch.dtype) -> torch.nn.Module:
    # transformers' default attention (sdpa) drops attention logit soft-capping (Gemma-2);
    # its eager attention computes it, as vLLM does.
    soft_capped = getattr(AutoConfig.from_pretrained(path).get_text_config(), "attn_logit_softcapping", None)
    attention = {"attn_implementation": "eager"} if soft_capped else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **attention).eval()


class ReferenceSteerer:
    """A base and named expert pairs, loaded with transformers."""

    def __init__(
        self,
        base: str,
        experts: Mapping[str, tuple[str, str]] | None = None,
        *,
        dtype: torch.dtype = torch.float32,
    ):
        self.base = _load(base, dtype)
        self.pairs = {
            name: (_load(tuned, dtype), _load(untuned, dtype))
            for name, (tuned, untuned) in (experts or {}).items()
        }
        self.vocab_size = self.base.config.vocab_size
        eos = self.base.generation_config.eos_token_id
        self.eos_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        alphas: Sequence[Mapping[str, float]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
        stop_token_ids: Sequence[int] | None = None,
    ) -> list[list[int]]:
        """Greedy (temperature 0) or sampled completions, one per prompt; stops at EOS by default."""
        stop_token_ids = self.eos_token_ids if stop_token_ids is None else stop_token_ids
        generator = torch.Generator().manual_seed(seed)
        outputs: list[list[int]] = [[] for _ in prompts]
        done = torch.zeros(len(prompts), dtype=torch.bool)
        for logits in self.steered_logits(prompts, alphas, outputs, max_tokens):
            tokens = _sample(logits, temperature, generator)
            for row, token in enumerate(tokens.tolist()):
                if not done[row]:
                    outputs[row].append(token)
                    done[row] = token in stop_token_ids
            if done.all():
                break
        return outputs

    @torch.inference_mode()
    def next_token_logprobs(
        self, prompts: Sequence[Sequence[int]], alphas: Sequence[Mapping[str, float]]
    ) -> torch.Tensor:
        """[B, V] log-probabilities of the steered next-token distribution at temperature 1."""
        logits = next(self.steered_logits(prompts, alphas, [[] for _ in prompts], 1))
        return logits.log_softmax(dim=-1)

    @torch.inference_mode()
    def completion_logprobs(self, prompt: Sequence[int], completion: Sequence[int], alpha: Mapping[str, float]) -> list[float]:
        """Steered log-probabilities at temperature 1 of each `completion` token, teacher-forced."""
        outputs: list[list[int]] = [[]]
        logprobs = []
        for step, logits in enumerate(self.steered_logits([prompt], [alpha], outputs, len(completion))):
            logprobs.append(logits.log_softmax(dim=-1)[0, completion[step]].item())
            outputs[0].append(completion[step])
        return logprobs

    @torch.inference_mode()
    def prompt_logprobs(self, prompt: Sequence[int], alpha: Mapping[str, float]) -> list[float]:
        """Steered log-probabilities at temperature 1 of prompt tokens 1.. given the ones before,
        all positions in one forward pass per model (token 0 has none)."""
        input_ids = torch.tensor([list(prompt)])  # [1, L]
        logits = [fit_vocab(model(input_ids=input_ids).logits[0, :-1].float(), self.vocab_size)
                  for model in (self.base, *(m for pair in self.pairs.values() for m in pair))]  # [L-1, V] each
        deltas = [logits[1 + 2 * i] - logits[2 + 2 * i] for i in range(len(self.pairs))]
        row = torch.tensor([[float(alpha.get(name, 0.0)) for name in self.pairs]]).expand(len(prompt) - 1, -1)
        steered = apply_alpha(logits[0].clone(), row, deltas).log_softmax(dim=-1)
        return steered.gather(1, input_ids[0, 1:, None])[:, 0].tolist()

    @torch.inference_mode()
    def trace(self, prompt: Sequence[int], completion: Sequence[int], alpha: Mapping[str, float]) -> list[dict]:
        """Per `completion` token, teacher-forced: its steered and base-alone log-probabilities, each
        nonzero-alpha pair's alpha * (log p_tuned - log p_untuned), and the base's argmax where it
        differs (`flip`: token id and log-probability), as `steering.trace` reports them."""
        input_ids = torch.tensor([[*prompt, *completion]])  # [1, L]
        rows = slice(len(prompt) - 1, input_ids.shape[1] - 1)  # the positions that predict `completion`
        logits = [fit_vocab(model(input_ids=input_ids).logits[0, rows].float(), self.vocab_size)
                  for model in (self.base, *(m for pair in self.pairs.values() for m in pair))]  # [C, V] each
        deltas = [logits[1 + 2 * i] - logits[2 + 2 * i] for i in range(len(self.pairs))]
        row = torch.tensor([[float(alpha.get(name, 0.0)) for name in self.pairs]]).expand(len(completion), -1)
        steered = apply_alpha(logits[0].clone(), row, deltas).log_softmax(dim=-1)
        base, *experts = (x.log_softmax(dim=-1) for x in logits)
        moved = {name: float(alpha[name]) * (experts[2 * i] - experts[2 * i + 1])
                 for i, name in enumerate(self.pairs) if alpha.get(name)}  # [C, V] each
        entries = []
        for k, token in enumerate(completion):
            top = int(base[k].argmax())
            entries.append({
                "token_id": token, "logprob": steered[k, token].item(), "base_logprob": base[k, token].item(),
                "contributions": {name: delta[k, token].item() for name, delta in moved.items()},
                "flip": None if top == token else {"token_id": top, "base_logprob": base[k, top].item()},
            })
        return entries

    def steered_logits(self, prompts, alphas, outputs, max_steps):
        """Yield [B, V] steered logits per step; `outputs` must be extended by the caller."""
        alpha = torch.tensor(
            [[float(a.get(name, 0.0)) for name in self.pairs] for a in alphas], dtype=torch.float32
        )  # [B, P]
        streams = [_Stream(self.base, DynamicCache())] + [
            _Stream(model, DynamicCache()) for pair in self.pairs.values() for model in pair
        ]
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts])  # [B, L]
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # [B, L]
        for step in range(max_steps):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
            last = [
                fit_vocab(
                    s.model(
                        input_ids=input_ids,
                        attention_mask=mask,
                        position_ids=positions,
                        past_key_values=s.cache,
                        use_cache=True,
                    ).logits[:, -1].float(),
                    self.vocab_size,
                )
                for s in streams
            ]
            deltas = [last[1 + 2 * i] - last[2 + 2 * i] for i in range(len(self.pairs))]
            yield apply_alpha(last[0].clone(), alpha, deltas)
            input_ids = torch.tensor([[out[-1] if out else 0] for out in outputs])
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=-1)


def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = (logits / temperature).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
