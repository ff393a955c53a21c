"""Proxy-tuning in plain transformers: the test oracle and the benchmark's peer.

No vLLM here. Each model keeps its own KV cache; a batch is left-padded; every step computes
`base + sum_i alpha_i * (tuned_i - untuned_i)` over the base's vocabulary with the serving
path's own `apply_alpha` and `fit_vocab`, so float32 sums agree by construction. A W8A8 int8
checkpoint runs with its linear layers emulated as vLLM computes them; `steer_over` takes any
model's logits from elsewhere (a quantized base served by vLLM alone).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from steering.quantization import Scheme, describe, quantization, schemes
from steering.steer import apply_alpha, fit_vocab


@dataclass
class _Stream:
    """One model's state across a batched generation."""

    model: torch.nn.Module
    cache: DynamicCache


def _load(path: str, dtype: torch.dtype) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(path)
    found = quantization(config)
    if found is not None:
        if schemes(found) != (Scheme("int", 8, 8),):
            raise ValueError(f"the reference runs W8A8 int8 checkpoints only; {path} is {describe(found)}")
        return _load_w8a8(path, config, dtype)
    # transformers' default attention (sdpa) drops attention logit soft-capping (Gemma-2);
    # its eager attention computes it, as vLLM does.
    soft_capped = getattr(config.get_text_config(), "attn_logit_softcapping", None)
    attention = {"attn_implementation": "eager"} if soft_capped else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **attention).eval()


class _W8A8Linear(torch.nn.Module):
    """vLLM's W8A8 int8 linear layer in plain torch: activations quantized per token as it does
    (symmetric, scale max|x| / 127, rounded to nearest), integer products summed exactly (float64
    holds them), then both scales applied. What a CPU with VNNI computes, at any weight codes."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("codes", codes.double())  # [N, K]
        self.register_buffer("scale", scale.reshape(-1).double())  # [N]
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N]
        x_scale = (x.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=torch.finfo(x.dtype).tiny)  # [..., 1]
        x_codes = torch.round(x / x_scale).clamp(-127, 127)
        out = (x_codes.double() @ self.codes.T * x_scale.double() * self.scale).to(x.dtype)
        return out if self.bias is None else out + self.bias


def _load_w8a8(path: str, config, dtype: torch.dtype) -> torch.nn.Module:
    """A compressed-tensors W8A8 int8 checkpoint with every quantized linear layer emulated."""
    from safetensors.torch import load_file

    state = {name: tensor for file in sorted(Path(path).glob("*.safetensors"))
             for name, tensor in load_file(file).items()}
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and f"{name}.weight_scale" in state:
            parent, _, child = name.rpartition(".")
            bias = state.pop(f"{name}.bias").to(dtype) if f"{name}.bias" in state else None
            emulated = _W8A8Linear(state.pop(f"{name}.weight"), state.pop(f"{name}.weight_scale"), bias)
            setattr(model.get_submodule(parent), child, emulated)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    if unexpected or [key for key in missing if not key.endswith((".codes", ".scale"))]:
        raise ValueError(f"{path}: weights the reference cannot place: {unexpected or missing}")
    return model


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
    def steer_over(self, tokens: Sequence[int], alpha: Mapping[str, float],
                   given: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[L, V] steered log-probabilities of the token after each of `tokens`, in one forward
        pass per model. `given` holds [L, V] logits computed elsewhere, by role (`base`,
        `<pair>.tuned`, `<pair>.untuned`), e.g. a quantized checkpoint served by vLLM alone; this
        reference computes the others. Log-probabilities serve as logits: a row's constant cancels."""
        input_ids = torch.tensor([list(tokens)])  # [1, L]

        def logits(role: str, model: torch.nn.Module) -> torch.Tensor:
            if role in given:
                return fit_vocab(given[role].float(), self.vocab_size)
            return fit_vocab(model(input_ids=input_ids).logits[0].float(), self.vocab_size)

        base = logits("base", self.base).clone()
        deltas = [logits(f"{name}.tuned", tuned) - logits(f"{name}.untuned", untuned)
                  for name, (tuned, untuned) in self.pairs.items()]
        row = torch.tensor([[float(alpha.get(name, 0.0)) for name in self.pairs]]).expand(len(tokens), -1)
        return apply_alpha(base, row, deltas).log_softmax(dim=-1)

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
