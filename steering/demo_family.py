"""The demo family: a small but real model family trained here, and the deployment over it.

From one synthetic world (steering.world):
- `base`: the largest model, pretrained on the narratives; never sees the question format;
- `chat-untuned`: a small model pretrained briefly on the same narratives (it holds few facts);
- `chat-tuned`: the untuned model fine-tuned to answer questions, about the tuning entities only;
- `direct`: the base fine-tuned the same way — the ceiling for `steer bench quality`, never served.

Question sets are split by entity: questions about the held-out entities (and about names that
exist nowhere) are never trained on; their `val` half calibrates the demo policies, their `test`
half is what the benchmark reports. The build is cached by the digest of its recipe.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from steering.fixtures import train_tokenizer
from steering.training import answer_batches, shuffled, text_batches, train
from steering.world import QA, World, make_world

RECIPE_VERSION = 2  # bump when the build changes in a way the recipe fields do not show
QA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}Question: {{ m['content'] }}\nAnswer:"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}\n{% endif %}{% endfor %}"
)
ABSTAIN_MESSAGE = "I don't know."
# The alpha that did best on the `val` entities in `steer bench quality` (docs/benchmarks.md).
DEMO_ALPHA = 2.0


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int

    def config(self, tokenizer) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
        )


@dataclass(frozen=True)
class Recipe:
    """Everything the family depends on; its digest names the cache folder."""

    seed: int = 0
    entities: int = 240
    tuning_share: float = 0.5
    strangers: int = 40
    vocab_size: int = 2048
    batch_size: int = 32
    base: Size = field(default_factory=lambda: Size(hidden=256, layers=4, heads=8, kv_heads=4, intermediate=768))
    small: Size = field(default_factory=lambda: Size(hidden=96, layers=2, heads=3, kv_heads=1, intermediate=256))
    base_epochs: int = 100
    base_lr: float = 2e-3
    small_epochs: int = 15
    small_lr: float = 3e-3
    tune_epochs: int = 5
    tune_lr: float = 1e-3
    direct_epochs: int = 8
    direct_lr: float = 5e-4

    def digest(self) -> str:
        blob = json.dumps({"version": RECIPE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_dir(recipe: Recipe) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "steering" / f"demo-family-{recipe.digest()}"


def is_built(out: Path, recipe: Recipe) -> bool:
    marker = out / "recipe.json"
    return marker.exists() and json.loads(marker.read_text()).get("digest") == recipe.digest()


def _split_by_entity(rows: list[QA], seed: int) -> dict[str, list[QA]]:
    """Half the entities' questions for calibration (`val`), the other half for reporting (`test`)."""
    entities = sorted({row.entity for row in rows})
    random.Random(seed).shuffle(entities)
    val = set(entities[: len(entities) // 2])
    return {"val": [r for r in rows if r.entity in val], "test": [r for r in rows if r.entity not in val]}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_questions(world: World, out: Path, seed: int) -> None:
    """The question sets, as JSONL rows `steer calibrate` and `steer bench` read."""
    out.mkdir(parents=True, exist_ok=True)
    answerable = _split_by_entity(world.questions(world.held_out), seed)
    unanswerable = _split_by_entity(world.unanswerable(), seed)
    verify = _split_by_entity(world.verifications(world.held_out, seed), seed)
    for split in ("val", "test"):
        _write_jsonl(out / f"answerable-{split}.jsonl",
                     [{"prompt": q.prompt, "answer": q.answer, "entity": q.entity} for q in answerable[split]])
        _write_jsonl(out / f"unanswerable-{split}.jsonl",
                     [{"prompt": q.prompt, "answer": "", "entity": q.entity} for q in unanswerable[split]])
        _write_jsonl(out / f"verify-{split}.jsonl",
                     [{"prompt": q.prompt, "label": " " + q.answer, "entity": q.entity} for q in verify[split]])
        _write_jsonl(out / f"qa-{split}.jsonl",
                     [{"prompt": q.prompt, "answer": q.answer} for q in answerable[split] + unanswerable[split]])
    _write_jsonl(out / "tuning.jsonl", [{"prompt": q.prompt, "answer": q.answer} for q in world.questions(world.tuning)])


def deployment_config() -> dict:
    """The demo's deploy.yaml: paths relative to the family folder."""
    return {
        "base": "base",
        "experts": {"chat": {"tuned": "chat-tuned", "untuned": "chat-untuned"}},
        "policies": {
            "base": {"description": "The base alone: it knows the facts, not the question format."},
            "chat": {"description": "Proxy-tuned: the base steered by the small question-answering pair.",
                     "alpha": {"chat": DEMO_ALPHA}, "max_alpha": 4.0},
            "qa": {"description": "Proxy-tuned, abstaining when the calibrated first-token confidence is low.",
                   "alpha": {"chat": DEMO_ALPHA},
                   "abstain": {"score": "first_prob", "message": ABSTAIN_MESSAGE, "threshold_bounds": [0.0, 1.0],
                               "cost_wrong": 1.0, "cost_abstain": 0.3},
                   "calibration": "calibration/qa.json"},
            "verify": {"description": "Yes/no verification as a decision: a false yes costs 10, a false no 1.",
                       "alpha": {"chat": DEMO_ALPHA},
                       "decision": {"labels": [" yes", " no"], "cost_fp": 10.0, "cost_fn": 1.0, "max_cost": 100.0},
                       "calibration": "calibration/verify.json"},
        },
        "engine": {"dtype": "float32", "max_model_len": 256, "gpu_memory_utilization": 0.1},
    }


def train_models(world: World, recipe: Recipe, out: Path) -> None:
    """Tokenizer, base, untuned, tuned and direct models, saved as Hugging Face folders."""
    torch.manual_seed(recipe.seed)
    tokenizer = train_tokenizer(recipe.vocab_size, texts=world.corpus_text())
    tokenizer.chat_template = QA_TEMPLATE

    def save(model, name: str) -> None:
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)

    def narratives(epoch: int):
        return text_batches(tokenizer, world.narratives(epoch), recipe.batch_size)

    tuning = [(q.prompt, q.answer) for q in world.questions(world.tuning)]
    tuning += [(q.prompt, q.answer) for q in world.verifications(world.tuning, recipe.seed + 1)]

    def questions(epoch: int):
        return answer_batches(tokenizer, shuffled(tuning, epoch, recipe.seed), recipe.batch_size)

    base = train(LlamaForCausalLM(recipe.base.config(tokenizer)), narratives, epochs=recipe.base_epochs,
                 lr=recipe.base_lr, description="base: narratives")
    save(base, "base")
    untuned = train(LlamaForCausalLM(recipe.small.config(tokenizer)), narratives, epochs=recipe.small_epochs,
                    lr=recipe.small_lr, description="untuned: narratives")
    save(untuned, "chat-untuned")
    tuned = train(copy.deepcopy(untuned), questions, epochs=recipe.tune_epochs, lr=recipe.tune_lr,
                  description="tuned: questions")
    save(tuned, "chat-tuned")
    direct = train(base, questions, epochs=recipe.direct_epochs, lr=recipe.direct_lr,
                   description="direct: base on questions")
    save(direct, "direct")


async def calibrate_policies(out: Path) -> None:
    """Fit the demo's abstention and decision policies on the `val` questions (one engine)."""
    from steering.calibrate import calibrate, summary
    from steering.config import parse_deployment
    from steering.engine import SteeringEngine

    config = deployment_config()
    uncalibrated = copy.deepcopy(config)
    for name in ("qa", "verify"):
        uncalibrated["policies"][name].pop("calibration")
    uncalibrated["policies"]["qa"]["abstain"]["threshold"] = 0.5
    deployment = parse_deployment(uncalibrated, root=out)
    engine = SteeringEngine.start(deployment)
    try:
        for name, data in (("qa", "qa-val.jsonl"), ("verify", "verify-val.jsonl")):
            result = await calibrate(deployment, name, out / "questions" / data, out / "calibration" / f"{name}.json",
                                     engine=engine, max_tokens=6)
            print(summary(result))
    finally:
        engine.shutdown()


async def build(out: Path | None = None, *, recipe: Recipe = Recipe(), force: bool = False) -> Path:
    """Train and calibrate the family into `out` (default: the cache); reuse a matching build."""
    out = Path(out) if out else default_dir(recipe)
    if is_built(out, recipe) and not force:
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    world = make_world(entities=recipe.entities, tuning_share=recipe.tuning_share, strangers=recipe.strangers,
                       seed=recipe.seed)
    write_questions(world, out / "questions", recipe.seed)
    train_models(world, recipe, out)
    await calibrate_policies(out)
    (out / "deploy.yaml").write_text(yaml.safe_dump(deployment_config(), sort_keys=False))
    (out / "recipe.json").write_text(json.dumps({"digest": recipe.digest(), **asdict(recipe)}, indent=2))
    return out
