"""The demo family: a small but real model family trained here, and the deployment over it.

From one synthetic world (steering_tools.world):
- `base`: the largest model, pretrained on the narratives; never sees the question format;
- `chat-untuned`: a small model pretrained on the same narratives, long enough to be about as sure
  of their form as the base (so its delta has the base's scale), too small to hold many facts;
- `chat-tuned`: the untuned model fine-tuned to answer questions, about the tuning entities only;
- `direct`: the base fine-tuned the same way — the ceiling for `steer bench quality`, never served.

Question sets are split by entity: questions about the held-out entities (and about names that
exist nowhere) are never trained on; their `val` half calibrates the demo policies, their `test`
half is what the benchmark reports. The build runs in stages (questions, tokenizer, each model,
calibration); each is cached under the digest of its recipe and its own version, so a failed build
resumes where it stopped.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch
import yaml
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from steering_tools.fixtures import Shape, train_tokenizer
from steering_tools.training import Batch, answer_batches, shuffled, text_batches, train
from steering_tools.world import QA, World, make_world

RECIPE_VERSION = 4  # bump when the models change in a way the recipe fields do not show (else: `_Stage.version`)
QA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}Question: {{ m['content'] }}\nAnswer:"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}\n{% endif %}{% endfor %}"
)
ABSTAIN_MESSAGE = "I don't know."
# The risk the `qa` policy states: at most this share of its answers wrong, with probability at
# least 1 - delta over its calibration rows (certified on the held-out half of the `val` questions).
# A family with fewer held-out rows than QA_RISK_ROWS (the tests' toy ones) cannot certify a useful
# epsilon: its qa keeps the threshold of least cost.
QA_RISK = {"epsilon": 0.15, "delta": 0.1}
QA_RISK_ROWS = 100
# The `verify` policy's costs: a false yes (saying yes to a false statement) costs 10, a false no 1.
VERIFY_COST_FP, VERIFY_COST_FN = 10.0, 1.0
# Chosen on the `val` entities in `steer bench quality` with recipe 3; with recipe 4, alphas 1 to 2
# are level there (docs/benchmarks.md).
DEMO_ALPHA = 2.0


def demo_shape(**size) -> Shape:
    """A Llama of the demo family: contexts of 256 tokens are plenty for its questions."""
    return Shape("llama", max_positions=256, **size)


@dataclass(frozen=True)
class Recipe:
    """Everything the family depends on; its digest names the cache folder."""

    seed: int = 0
    entities: int = 240
    tuning_share: float = 0.5
    strangers: int = 40
    vocab_size: int = 2048
    batch_size: int = 32
    base: Shape = field(default_factory=lambda: demo_shape(hidden=256, layers=4, heads=8, kv_heads=4, intermediate=768))
    small: Shape = field(default_factory=lambda: demo_shape(hidden=96, layers=2, heads=3, kv_heads=1, intermediate=256))
    base_epochs: int = 100
    base_lr: float = 2e-3
    # At 15 the untuned model was less sure than the base that a value is followed by more
    # narrative, so at alpha 1 the pair's "stop here" lost and answers ran on (docs/benchmarks.md).
    small_epochs: int = 30
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


def read_recipe(out: Path) -> Recipe:
    """The recipe a finished build was made from (its `recipe.json`)."""
    fields = json.loads((Path(out) / "recipe.json").read_text())
    digest = fields.pop("digest")
    recipe = Recipe(**fields | {name: Shape(**fields[name]) for name in ("base", "small")})
    if recipe.digest() != digest:
        raise ValueError(f"{out}/recipe.json was written by another version of the build (digest {digest}, "
                         f"read back as {recipe.digest()}): rebuild it")
    return recipe


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


def read_questions(path: Path) -> list[dict]:
    """The rows of a question set written by `write_questions`."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


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
        _write_jsonl(out / f"check-{split}.jsonl",  # the same checks, asked by answering
                     [{"prompt": q.question, "claim": " " + q.claim, "label": q.answer, "entity": q.entity}
                      for q in verify[split]])
        _write_jsonl(out / f"qa-{split}.jsonl",
                     [{"prompt": q.prompt, "answer": q.answer} for q in answerable[split] + unanswerable[split]])
    _write_jsonl(out / "tuning.jsonl", [{"prompt": q.prompt, "answer": q.answer} for q in world.questions(world.tuning)])


def deployment_config(out: Path) -> dict:
    """The demo's deploy.yaml for the family in `out` (its question sets written): paths relative to it."""
    held_out = len(read_questions(out / "questions" / "qa-val.jsonl")) // 2  # `steer calibrate`'s default split
    risk = QA_RISK if held_out >= QA_RISK_ROWS else None
    stated = (f": at most {QA_RISK['epsilon']:.0%} of its answers wrong, certified at delta {QA_RISK['delta']}"
              if risk else "")
    return {
        "base": "base",
        "experts": {"chat": {"tuned": "chat-tuned", "untuned": "chat-untuned"}},
        "policies": {
            "base": {"description": "The base alone: it knows the facts, not the question format."},
            "chat": {"description": "Proxy-tuned: the base steered by the small question-answering pair.",
                     "alpha": {"chat": DEMO_ALPHA}, "max_alpha": 4.0},
            "qa": {"description": "Proxy-tuned, abstaining when the base alone finds the question unfamiliar "
                                  f"(its surprise at the prompt, weighed by a fit on labelled answers){stated}.",
                   "alpha": {"chat": DEMO_ALPHA},
                   "abstain": {"score": "base_familiarity_fit", "message": ABSTAIN_MESSAGE,
                               **({"risk": risk} if risk else {"threshold_bounds": [0.0, 1.0]}),
                               # the threshold of least cost (served without a risk; the bench's comparison)
                               "cost_wrong": 1.0, "cost_abstain": 0.3},
                   "calibration": "calibration/qa.json"},
            "verify": {"description": "Yes/no verification as a decision: a false yes costs 10, a false no 1.",
                       "alpha": {"chat": DEMO_ALPHA},
                       "decision": {"labels": [" yes", " no"], "cost_fp": VERIFY_COST_FP, "cost_fn": VERIFY_COST_FN,
                                    "max_cost": 100.0},
                       "calibration": "calibration/verify.json"},
            "check": {"description": "The same verification asked by answering: yes iff the answer to the open "
                                     "question is the claim (steering.claim). A false yes costs 10, a false no 1.",
                      "alpha": {"chat": DEMO_ALPHA},
                      "decision": {"claim": True, "labels": ["yes", "no"], "cost_fp": VERIFY_COST_FP,
                                   "cost_fn": VERIFY_COST_FN, "max_cost": 100.0},
                      "calibration": "calibration/check.json"},
        },
        "engine": {"dtype": "float32", "max_model_len": 256},  # KV cache: sized from the models
    }


def utility_weight(answer: str) -> float:
    """An example's weight in utility-weighted tuning: the cost of getting it wrong."""
    return {"no": VERIFY_COST_FP, "yes": VERIFY_COST_FN}.get(answer, 1.0)


@dataclass
class _Family:
    """What the stages share: the family folder, its recipe, and what both determine."""

    out: Path
    recipe: Recipe

    @cached_property
    def world(self) -> World:
        recipe = self.recipe
        return make_world(entities=recipe.entities, tuning_share=recipe.tuning_share, strangers=recipe.strangers,
                          seed=recipe.seed)

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        return PreTrainedTokenizerFast.from_pretrained(self.out / "tokenizer")

    @cached_property
    def tuning(self) -> list[tuple[str, str]]:
        world = self.world
        rows = world.questions(world.tuning) + world.verifications(world.tuning, self.recipe.seed + 1)
        return [(q.prompt, q.answer) for q in rows]

    def narratives(self, epoch: int) -> Iterator[Batch]:
        return text_batches(self.tokenizer, self.world.narratives(epoch), self.recipe.batch_size)

    def questions(self, epoch: int) -> Iterator[Batch]:
        return answer_batches(self.tokenizer, shuffled(self.tuning, epoch, self.recipe.seed), self.recipe.batch_size)

    def weighted_questions(self, epoch: int) -> Iterator[Batch]:
        """The same questions, the utility baked into the loss: a verification whose truth is "no"
        weighs what a false yes costs, one whose truth is "yes" what a false no costs."""
        return answer_batches(self.tokenizer, shuffled(self.tuning, epoch, self.recipe.seed), self.recipe.batch_size,
                              weight=utility_weight)

    def load(self, folder: str) -> LlamaForCausalLM:
        return LlamaForCausalLM.from_pretrained(self.out / folder)

    def save(self, model: LlamaForCausalLM, into: Path) -> None:
        model.save_pretrained(into)
        self.tokenizer.save_pretrained(into)


def _write_question_sets(family: _Family, into: Path) -> None:
    write_questions(family.world, into, family.recipe.seed)


def _train_tokenizer(family: _Family, into: Path) -> None:
    tokenizer = train_tokenizer(family.recipe.vocab_size, texts=family.world.corpus_text())
    tokenizer.chat_template = QA_TEMPLATE
    tokenizer.save_pretrained(into)


def _train_base(family: _Family, into: Path) -> None:
    recipe = family.recipe
    model = LlamaForCausalLM(recipe.base.config(family.tokenizer))
    train(model, family.narratives, epochs=recipe.base_epochs, lr=recipe.base_lr, description="base: narratives")
    family.save(model, into)


def _train_untuned(family: _Family, into: Path) -> None:
    recipe = family.recipe
    model = LlamaForCausalLM(recipe.small.config(family.tokenizer))
    train(model, family.narratives, epochs=recipe.small_epochs, lr=recipe.small_lr, description="untuned: narratives")
    family.save(model, into)


def _train_tuned(family: _Family, into: Path, *, weighted: bool = False) -> None:
    recipe = family.recipe
    model = family.load("chat-untuned")
    train(model, family.weighted_questions if weighted else family.questions, epochs=recipe.tune_epochs,
          lr=recipe.tune_lr, description=f"tuned{', utility-weighted' if weighted else ''}: questions")
    family.save(model, into)


def _train_direct(family: _Family, into: Path, *, weighted: bool = False) -> None:
    recipe = family.recipe
    model = family.load("base")
    train(model, family.weighted_questions if weighted else family.questions, epochs=recipe.direct_epochs,
          lr=recipe.direct_lr, description=f"direct{', utility-weighted' if weighted else ''}: base on questions")
    family.save(model, into)


async def calibrate_policies(out: Path, into: Path | None = None) -> None:
    """Fit the demo's abstention and decision policies on the `val` questions (one engine).

    The calibrations go to `into` (default `out/calibration`, where deploy.yaml names them).
    """
    from steering.config import parse_deployment
    from steering.engine import SteeringEngine
    from steering_tools.calibrate import calibrate, summary

    into = into or out / "calibration"
    config = deployment_config(out)
    uncalibrated = copy.deepcopy(config)
    for name in ("qa", "verify", "check"):
        uncalibrated["policies"][name].pop("calibration")
    abstain = uncalibrated["policies"]["qa"]["abstain"]
    if "risk" not in abstain:
        abstain["threshold"] = 0.5  # any: collecting answers withholds none, and the fit writes its own
    deployment = parse_deployment(uncalibrated, root=out, calibrating=True)  # qa's weights are what it fits
    engine = SteeringEngine.start(deployment)
    try:
        for name, data in (("qa", "qa-val.jsonl"), ("verify", "verify-val.jsonl"), ("check", "check-val.jsonl")):
            result = await calibrate(deployment, name, out / "questions" / data, into / f"{name}.json",
                                     engine=engine, max_tokens=6)
            print(summary(result))
    finally:
        engine.shutdown()


async def _calibrate(family: _Family, into: Path) -> None:
    await calibrate_policies(family.out, into)


@dataclass(frozen=True)
class _Stage:
    name: str
    folder: str  # its outputs, relative to the family folder
    verb: str  # for the progress line: "base: trained in 291 s"
    make: Callable[[_Family, Path], Awaitable[None] | None]  # writes the outputs into the folder it is given
    # Bump when the stage writes something else from the same recipe, and bump every stage that
    # reads it: only they are redone, and the models (and the recipe's digest) stay what they were.
    version: int = 1


# In build order: each stage reads only what the ones before it saved.
STAGES = (
    _Stage("questions", "questions", "written", _write_question_sets, version=2),  # 2: claim checks
    _Stage("tokenizer", "tokenizer", "trained", _train_tokenizer),
    _Stage("base", "base", "trained", _train_base),
    _Stage("untuned", "chat-untuned", "trained", _train_untuned),
    _Stage("tuned", "chat-tuned", "trained", _train_tuned),
    _Stage("direct", "direct", "trained", _train_direct),
    _Stage("calibration", "calibration", "fitted", _calibrate, version=3),  # 2: the check policy; 3: qa's risk
)
# Built for `steer bench quality` only: the same tunings with the verification costs in the loss.
BENCH_STAGES = (
    _Stage("tuned-weighted", "chat-tuned-weighted", "trained", functools.partial(_train_tuned, weighted=True)),
    _Stage("direct-weighted", "direct-weighted", "trained", functools.partial(_train_direct, weighted=True)),
)


def _marker(out: Path, stage: _Stage) -> Path:
    return out / ".stages" / f"{stage.name}.json"


def _done_earlier(out: Path, stage: _Stage, recipe: Recipe) -> dict | None:
    """The stage's marker, if it marks the stage's folder as built for this recipe."""
    marker = _marker(out, stage)
    if not (marker.exists() and (out / stage.folder).is_dir()):
        return None
    done = json.loads(marker.read_text())
    return done if (done["digest"], done.get("version", 1)) == (recipe.digest(), stage.version) else None


async def _run_stage(family: _Family, number: int, stage: _Stage) -> None:
    """Write the stage's folder under a temporary name, move it into place, then mark it done."""
    target = family.out / stage.folder
    partial = family.out / f".partial-{stage.folder}"
    shutil.rmtree(partial, ignore_errors=True)  # a crash mid-stage leaves it behind
    # Seeded per stage, so a stage's result does not depend on which stages ran before it in this process.
    torch.manual_seed(family.recipe.seed * 1000 + number)
    started = time.monotonic()
    made = stage.make(family, partial)
    if made is not None:
        await made
    shutil.rmtree(target, ignore_errors=True)  # a stale output: another recipe, or an unmarked earlier try
    partial.rename(target)
    seconds = time.monotonic() - started
    marker = _marker(family.out, stage)
    marker.parent.mkdir(exist_ok=True)
    written = marker.with_suffix(".tmp")
    written.write_text(json.dumps({"digest": family.recipe.digest(), "version": stage.version,
                                   "seconds": round(seconds)}))
    written.replace(marker)  # whole or not at all: a crash never leaves a marker that cannot be read
    print(f"{stage.name}: {stage.verb} in {seconds:.0f} s", flush=True)


async def build(out: Path | None = None, *, recipe: Recipe = Recipe(), force: bool = False,
                bench: bool = False) -> Path:
    """Train and calibrate the family into `out` (default: the cache), stage by stage; with
    `bench`, also the models only `steer bench quality` needs.

    Stages already done for this recipe are reused, so a failed build resumes; `force` redoes them all.
    """
    out = Path(out) if out else default_dir(recipe)
    stages = STAGES + BENCH_STAGES if bench else STAGES
    if is_built(out, recipe) and not force and all(_done_earlier(out, stage, recipe) for stage in stages):
        return out
    out.mkdir(parents=True, exist_ok=True)
    # Whatever recipe.json named, the folder is not a finished build of this recipe until the end.
    (out / "recipe.json").unlink(missing_ok=True)
    if force:
        shutil.rmtree(out / ".stages", ignore_errors=True)
    family = _Family(out, recipe)
    for number, stage in enumerate(stages, start=1):
        if done := _done_earlier(out, stage, recipe):
            print(f"{stage.name}: reused ({stage.verb} in {done['seconds']} s by an earlier run)", flush=True)
        else:
            await _run_stage(family, number, stage)
    (out / "deploy.yaml").write_text(yaml.safe_dump(deployment_config(out), sort_keys=False))
    (out / "recipe.json").write_text(json.dumps({"digest": recipe.digest(), **asdict(recipe)}, indent=2))
    return out
