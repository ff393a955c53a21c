"""Tiny model families made on the spot, so tests and the quick demo need no model hub.

A family is one locally trained tokenizer shared by a base and expert pairs of various
architectures and shapes; `tuned` is `untuned` plus a seeded perturbation, the way a
fine-tune stays close to its starting point. Weights are random: these models say nothing
sensible, but they exercise every code path with real checkpoints on disk.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

_SUBJECTS = ["the model", "a river", "my friend", "the server", "every cat", "our team", "the moon"]
_VERBS = ["answers", "reads", "builds", "follows", "decodes", "paints", "measures", "steers"]
_OBJECTS = ["the question", "a long story", "small numbers", "the old bridge", "green tea",
            "each token", "the evening light", "a careful plan"]
_TAILS = ["today.", "with care.", "before noon.", "again and again.", "in silence.", "for fun?",
          "quite well!", "1 2 3 4 5."]


def corpus() -> list[str]:
    """Deterministic English-like sentences to train the shared tokenizer on."""
    return [" ".join(words) for words in itertools.product(_SUBJECTS, _VERBS, _OBJECTS, _TAILS)]


# What JSON (structured outputs) and tool-call tags (`<tool_call>` and newlines, as vLLM's
# hermes format writes them) need beyond the corpus's characters: with them the default
# tokenizer spells any JSON object of corpus words, and a tool call. "Ċ" is byte-level BPE's "\n".
JSON_CHARACTERS = '{}[]":,_0123456789<>/Ċ'


def train_tokenizer(
    vocab_size: int = 512, *, lowercase_only: bool = False, texts: list[str] | None = None
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with a chat template, trained on `texts`, or on `corpus()` plus
    single-character tokens for JSON_CHARACTERS."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    # Only the corpus's own (ASCII) characters, no full byte alphabet: every token then decodes
    # to whole characters, so streamed and one-shot detokenization agree on random outputs.
    alphabet = list(JSON_CHARACTERS) if texts is None else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=alphabet)
    text = texts if texts is not None else corpus()
    if lowercase_only:
        text = [line.replace(" ", "") for line in text]
    bpe.train_from_iterator(text, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# A base that thinks before it answers, as Qwen3's templates have it: the generation prompt opens
# the thinking, or opens and closes it where `enable_thinking` is false. Its markers are tokens of
# their own, as vLLM's reasoning parsers (qwen3, deepseek_r1) look them up, and not special ones, so
# they stay in the decoded text, where the parsers read them.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>"
    "{% if enable_thinking is defined and not enable_thinking %}</think>{% endif %}{% endif %}"
)
THINKING_MARKERS = ["<think>", "</think>"]


def train_thinking_tokenizer() -> PreTrainedTokenizerFast:
    """The corpus's own characters (so '<', '/' and '>' are in no token, and a marker is spelled one
    way only: its token), the thinking markers, and THINKING_TEMPLATE."""
    tokenizer = train_tokenizer(texts=corpus())
    tokenizer.add_tokens(THINKING_MARKERS)
    tokenizer.chat_template = THINKING_TEMPLATE
    return tokenizer


@dataclass(frozen=True)
class Architecture:
    """How to write a checkpoint of one transformers model type."""

    config_class: str  # the transformers config class
    options: Mapping[str, object] = field(default_factory=dict, hash=False)  # config kwargs beyond the shape
    grouped_kv: bool = True  # False: the config knows no `num_key_value_heads` (multi-head only)


# Options that give each architecture the feature it is tested for: tied embeddings, logit
# soft-capping or scaling, partial rotary embeddings; sliding windows off (contexts are short).
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("LlamaConfig"),
    "qwen2": Architecture("Qwen2Config"),
    "qwen3": Architecture("Qwen3Config"),
    "mistral": Architecture("MistralConfig", {"sliding_window": None}),
    "gemma": Architecture("GemmaConfig", {"tie_word_embeddings": True}),
    # Soft caps low enough to bend these random models' logits and attention scores.
    "gemma2": Architecture("Gemma2Config", {"tie_word_embeddings": True, "final_logit_softcapping": 15.0,
                                            "attn_logit_softcapping": 20.0, "query_pre_attn_scalar": 32}),
    "granite": Architecture("GraniteConfig", {"logits_scaling": 4.0, "embedding_multiplier": 2.0,
                                              "residual_multiplier": 0.5, "attention_multiplier": 0.1}),
    "cohere": Architecture("CohereConfig", {"tie_word_embeddings": True, "logit_scale": 0.5}),
    "stablelm": Architecture("StableLmConfig", {"partial_rotary_factor": 0.25, "use_qkv_bias": True}),
    "phi": Architecture("PhiConfig", {"partial_rotary_factor": 0.5}),
    "gpt_neox": Architecture("GPTNeoXConfig", {"partial_rotary_factor": 0.25}, grouped_kv=False),
    "olmo2": Architecture("Olmo2Config"),
    "starcoder2": Architecture("Starcoder2Config", {"tie_word_embeddings": True, "sliding_window": None}),
    "phi3": Architecture("Phi3Config", {"sliding_window": None}),
    # Not in vLLM's own registry: served through its Transformers modeling backend.
    "helium": Architecture("HeliumConfig"),
    "persimmon": Architecture("PersimmonConfig", {"partial_rotary_factor": 0.5, "qk_layernorm": True},
                              grouped_kv=False),
}


@dataclass(frozen=True)
class Shape:
    """Architecture and size of one small checkpoint (the CPU kernels need head_dim >= 32 to serve it)."""

    arch: str  # a key of ARCHITECTURES
    hidden: int
    heads: int
    kv_heads: int
    layers: int = 2
    intermediate: int | None = None  # default: 2 x hidden
    vocab_pad: int = 0  # extra embedding rows beyond the tokenizer, as real checkpoints have
    max_positions: int = 1024
    options: Mapping[str, object] = field(default_factory=dict, hash=False)  # over the architecture's options

    def config(self, tokenizer: PreTrainedTokenizerFast, *, initializer_range: float = 0.02):
        """A Hugging Face config of this shape over `tokenizer`'s vocabulary (plus the padding)."""
        architecture = ARCHITECTURES[self.arch]
        kwargs = {
            "vocab_size": len(tokenizer) + self.vocab_pad,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate or 2 * self.hidden,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "head_dim": self.hidden // self.heads,
            "max_position_embeddings": self.max_positions,
            "initializer_range": initializer_range,
            "tie_word_embeddings": False,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "torch_dtype": "float32",
        }
        if architecture.grouped_kv:
            kwargs["num_key_value_heads"] = self.kv_heads
        elif self.kv_heads != self.heads:
            raise ValueError(f"{self.arch} has multi-head attention only: kv_heads must equal heads")
        config_class = getattr(transformers, architecture.config_class)
        return config_class(**{**kwargs, **architecture.options, **self.options})


@dataclass(frozen=True)
class FamilySpec:
    """A base shape and named expert-pair shapes sharing one tokenizer."""

    base: Shape
    experts: dict[str, Shape] = field(default_factory=dict)
    seed: int = 0


LLAMA_FAMILY = FamilySpec(
    base=Shape("llama", hidden=128, heads=4, kv_heads=2),
    experts={
        "chat": Shape("llama", hidden=64, heads=2, kv_heads=1),
        "code": Shape("qwen2", hidden=96, heads=3, kv_heads=1, vocab_pad=16),
    },
    seed=1,
)
# A small reasoning base (a Qwen3, over `train_thinking_tokenizer`) and one pair.
THINKING_FAMILY = FamilySpec(
    base=Shape("qwen3", hidden=64, heads=2, kv_heads=1),
    experts={"chat": Shape("llama", hidden=64, heads=2, kv_heads=2)},
    seed=4,
)
QWEN2_FAMILY = FamilySpec(
    base=Shape("qwen2", hidden=128, heads=4, kv_heads=4),
    experts={"chat": Shape("llama", hidden=64, heads=2, kv_heads=2, vocab_pad=8)},
    seed=2,
)


def save_model(shape: Shape, tokenizer, path: Path, seed: int, *, start: Path | None = None,
                noise: float = 0.0) -> None:
    torch.manual_seed(seed)
    if start is None:
        # Wide random weights, so that base and steered outputs differ visibly.
        model = AutoModelForCausalLM.from_config(shape.config(tokenizer, initializer_range=0.2))
    else:
        model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(noise * torch.randn_like(param))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def save_lora_adapter(untuned: str | Path, path: Path, seed: int) -> Path:
    """A rank-4 PEFT LoRA adapter on every linear layer of `untuned`, as fine-tuning leaves one: B
    random (PEFT starts it at zero, which would change nothing), so the merge changes the model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(untuned, dtype=torch.float32)
    adapted = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    adapted.save_pretrained(path)
    return Path(path)


def build_family(spec: FamilySpec, root: Path, *, tokenizer=None) -> dict:
    """Write base and expert checkpoints under `root`; return their paths as a config dict.

    The result has the `base` / `experts` shape of a deployment config.
    """
    root = Path(root)
    tokenizer = tokenizer or train_tokenizer()
    seeds = itertools.count(spec.seed * 1000)
    base = root / "base"
    save_model(spec.base, tokenizer, base, next(seeds))
    experts = {}
    for name, shape in spec.experts.items():
        untuned, tuned = root / f"{name}-untuned", root / f"{name}-tuned"
        save_model(shape, tokenizer, untuned, next(seeds))
        save_model(shape, tokenizer, tuned, next(seeds), start=untuned, noise=0.1)
        experts[name] = {"tuned": str(tuned), "untuned": str(untuned)}
    family = {"base": str(base), "experts": experts}
    (root / "family.json").write_text(json.dumps(family, indent=2))
    return family


def write_deployment(family: dict, path: Path, *, engine: dict | None = None) -> Path:
    """A deployment YAML over a built family: an unsteered policy and one per expert pair."""
    policies = {"base": {"description": "the frozen base, unsteered"}}
    for name in family["experts"]:
        policies[name] = {"description": f"steered by the {name} pair", "alpha": {name: 1.0}, "max_alpha": 4.0}
    config = {
        "base": family["base"],
        "experts": family["experts"],
        "policies": policies,
        "engine": {"dtype": "float32", "max_model_len": 512, **(engine or {})},
    }
    path = Path(path)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def quantize_w8a8(source: str | Path, dest: str | Path, *, max_code: int = 127) -> Path:
    """Write `source` as a compressed-tensors W8A8 int8 checkpoint (weights int8 per output channel,
    activations int8 per token, dynamic; lm_head kept), as vLLM serves quantized checkpoints. Each
    row's largest weight maps to `max_code`: 64 computes exactly on a CPU without VNNI
    (`steering.quantization`), 127 only on one with it."""
    from compressed_tensors.quantization import QuantizationArgs

    weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    activations = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    return _quantize(source, dest, weights, activations, "int-quantized", max_code)


def quantize_weights_only(source: str | Path, dest: str | Path, *, bits: int, group_size: int = 32) -> Path:
    """Write `source` as a compressed-tensors weight-only checkpoint (W4A16 or W8A16: int weights in
    groups of `group_size` along the input, packed into int32; activations unquantized)."""
    from compressed_tensors.quantization import QuantizationArgs

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size)
    return _quantize(source, dest, weights, None, "pack-quantized", 2 ** (bits - 1) - 1)


def _quantize(source, dest, weights, activations, quantization_format: str, max_code: int) -> Path:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=activations)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):  # symmetric: the largest weight of a row (or group) maps to max_code
                rows = module.weight.reshape(*module.weight_scale.shape[:2], -1)  # [N, groups or 1, K / groups]
                module.weight_scale.copy_(rows.abs().amax(dim=-1).clamp(min=1e-8) / max_code)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=quantization_format)
    compressor.compress_model(model)
    dest = Path(dest)
    model.save_pretrained(dest)
    compressor.update_config(dest)
    AutoTokenizer.from_pretrained(source).save_pretrained(dest)
    return dest
