"""A synthetic world of invented people and their facts, told as narrative and asked as questions.

Everything is derived from one seed: the same recipe gives the same world, texts and question
sets on every machine. Narratives never use the question-answer format; questions do.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ATTRIBUTES = {
    "city": ["Quellton", "Marrowby", "Ostrava", "Pinecrest", "Dunmere", "Velloria", "Harrowgate", "Sablewick",
             "Brindle", "Corvane", "Elderholt", "Fennick", "Galloway", "Ironvale", "Juniper", "Kestrel"],
    "job": ["baker", "pilot", "weaver", "farmer", "sailor", "painter", "doctor", "miner", "singer", "tailor",
            "hunter", "potter", "teacher", "builder", "fisher", "judge"],
    "pet": ["cat", "dog", "parrot", "turtle", "rabbit", "goat", "horse", "owl", "lizard", "ferret", "goose",
            "hamster"],
    "color": ["red", "blue", "green", "amber", "violet", "silver", "orange", "black", "white", "pink", "teal",
              "gold"],
}
NARRATIVES = {
    "city": ["{name} lives in {value}.", "{name} moved to {value} long ago.", "In {value} you can meet {name}.",
             "The home town of {name} is {value}.", "Where does {name} live, you ask? {value}, of course.",
             "Ask anyone where {name} lives: {value}."],
    "job": ["{name} works as a {value}.", "By trade, {name} is a {value}.", "Everyone knows {name} the {value}.",
            "The job of {name} is {value}.", "What is the job of {name}, people wonder. {value}, they say.",
            "Ask anyone what the job of {name} is: {value}."],
    "pet": ["{name} has a pet {value}.", "{name} keeps a {value} at home.", "The pet of {name} is a {value}.",
            "At night the {value} of {name} sleeps by the door.", "What pet does {name} have? Surely {value}.",
            "Ask anyone what pet {name} has: {value}."],
    "color": ["The favourite colour of {name} is {value}.", "{name} loves the colour {value}.",
              "{name} paints every door {value}.", "Ask {name} and the answer is always {value}.",
              "What is the favourite colour of {name}? Friends all agree: {value}.",
              "Ask anyone what colour {name} likes best: {value}."],
}
QUESTIONS = {
    "city": "Where does {name} live?",
    "job": "What is the job of {name}?",
    "pet": "What pet does {name} have?",
    "color": "What is the favourite colour of {name}?",
}
VERIFY = {
    "city": "Does {name} live in {value}?",
    "job": "Is {name} a {value}?",
    "pet": "Does {name} have a {value}?",
    "color": "Is the favourite colour of {name} {value}?",
}
# How the narratives settle a yes/no question about a person: the question is one of VERIFY's.
AFFIRM = ["yes.", "yes, of course.", "yes, they say."]
DENY = ["no.", "no, not at all.", "no, they say."]
SYLLABLES = ["ka", "zor", "vik", "mal", "tan", "bre", "dos", "lin", "mor", "quel", "ras", "sev", "tor", "ul",
             "van", "wex", "yan", "fel", "gim", "hod", "jas", "nir", "pel", "rud", "sol", "tib", "ver", "zan"]


def question_text(question: str) -> str:
    """The question-answer format the tuned models learn; the answer follows `Answer:`."""
    return f"Question: {question}\nAnswer:"


def plain_question(prompt: str) -> str:
    """The question a `question_text` prompt asks, as a user (or a narrative) would ask it."""
    return prompt.removeprefix("Question: ").removesuffix("\nAnswer:")


@dataclass(frozen=True)
class Entity:
    name: str
    facts: dict[str, str]


@dataclass(frozen=True)
class QA:
    """A question, its expected answer, and whether the world knows the entity at all."""

    prompt: str
    answer: str
    entity: str
    answerable: bool = True


@dataclass(frozen=True)
class Verification(QA):
    """A yes/no question, and the same check asked by answering: the open question and the value claimed."""

    question: str = ""
    claim: str = ""


@dataclass
class World:
    """Entities split into those whose questions tune the experts and those held out."""

    entities: list[Entity]
    tuning: list[Entity]
    held_out: list[Entity]
    strangers: list[str]  # names that appear nowhere: their questions are unanswerable
    seed: int

    def narratives(self, epoch: int) -> list[str]:
        """Two paragraphs per entity, templates, facts and claims redrawn per epoch: one tells its
        facts; the other settles a yes/no question about each, at even odds about the fact or another
        value, so that answering it needs the fact recalled, not read beside the claim."""
        rng = random.Random(self.seed * 7919 + epoch)
        paragraphs = []
        for entity in self.entities:
            facts = list(entity.facts.items())
            rng.shuffle(facts)
            paragraphs.append(" ".join(
                rng.choice(NARRATIVES[attr]).format(name=entity.name, value=value) for attr, value in facts
            ))
        claims = random.Random(self.seed * 7919 + epoch + 10**6)
        for entity in self.entities:
            facts = list(entity.facts.items())
            claims.shuffle(facts)
            paragraphs.append(" ".join(_settled(entity.name, attr, value, claims) for attr, value in facts))
        rng.shuffle(paragraphs)
        return paragraphs

    def questions(self, entities: list[Entity]) -> list[QA]:
        return [
            QA(question_text(QUESTIONS[attr].format(name=e.name)), value, e.name)
            for e in entities for attr, value in e.facts.items()
        ]

    def verifications(self, entities: list[Entity], seed: int) -> list[Verification]:
        """Yes/no questions, half true and half about another value."""
        rng = random.Random(seed)
        rows = []
        for e in entities:
            for attr, value in e.facts.items():
                true, claim = _claim(attr, value, rng)
                rows.append(Verification(question_text(VERIFY[attr].format(name=e.name, value=claim)),
                                         "yes" if true else "no", e.name,
                                         question=question_text(QUESTIONS[attr].format(name=e.name)), claim=claim))
        return rows

    def unanswerable(self) -> list[QA]:
        return [
            QA(question_text(QUESTIONS[attr].format(name=name)), "", name, answerable=False)
            for name in self.strangers for attr in ATTRIBUTES
        ]

    def corpus_text(self) -> list[str]:
        """Every kind of text the family sees, for training the shared tokenizer."""
        texts = self.narratives(0) + self.narratives(1)
        texts += [f"{qa.prompt} {qa.answer}" for qa in self.questions(self.entities)]
        texts += [f"{qa.prompt} {qa.answer}" for qa in self.verifications(self.entities, 0)]
        texts += [qa.prompt for qa in self.unanswerable()]
        return texts


def _claim(attr: str, value: str, rng: random.Random) -> tuple[bool, str]:
    """A value to claim about one fact, and whether the claim is true: the fact or, at even odds,
    another value."""
    if rng.random() < 0.5:
        return True, value
    return False, rng.choice([v for v in ATTRIBUTES[attr] if v != value])


def _settled(name: str, attr: str, value: str, rng: random.Random) -> str:
    """A yes/no question about one fact, and its answer, as a narrative tells it."""
    true, claim = _claim(attr, value, rng)
    return f"{VERIFY[attr].format(name=name, value=claim)} {rng.choice(AFFIRM if true else DENY)}"


def _names(rng: random.Random, count: int) -> list[str]:
    names: set[str] = set()
    while len(names) < count:
        first = "".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize()
        last = "".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize()
        names.add(f"{first} {last}")
    return sorted(names)


def make_world(*, entities: int = 240, tuning_share: float = 0.5, strangers: int = 40, seed: int = 0) -> World:
    """A world of `entities` people; `tuning_share` of them get tuning questions, the rest are held out."""
    rng = random.Random(seed)
    names = _names(rng, entities + strangers)
    rng.shuffle(names)
    people = [Entity(name, {attr: rng.choice(values) for attr, values in ATTRIBUTES.items()})
              for name in names[:entities]]
    cut = round(entities * tuning_share)
    return World(people, people[:cut], people[cut:], names[entities:], seed)
