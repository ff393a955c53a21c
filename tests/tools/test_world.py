"""The synthetic world and the training data drawn from it: deterministic, and split by entity."""

from __future__ import annotations

import dataclasses

from steering_tools.demo_family import Recipe, is_built
from steering_tools.fixtures import train_tokenizer
from steering_tools.training import answer_batches
from steering_tools.world import ATTRIBUTES, NARRATIVES, VERIFY, make_world


def test_the_same_seed_gives_the_same_world_and_texts():
    one, two = make_world(seed=3), make_world(seed=3)
    assert one.entities == two.entities
    assert one.narratives(5) == two.narratives(5)
    assert one.narratives(5) != one.narratives(6), "paraphrases are redrawn every epoch"
    assert make_world(seed=4).entities != one.entities


def test_narratives_never_use_the_question_format():
    world = make_world()
    text = " ".join(world.narratives(0) + world.narratives(1))
    assert "Question:" not in text and "Answer:" not in text
    for entity in world.entities:
        for value in entity.facts.values():
            assert value in text


def test_narratives_settle_yes_no_questions_from_recall():
    world = make_world(entities=40, seed=5)
    paragraphs = world.narratives(2)
    answers = []
    for entity in world.entities:
        asked = [p for p in paragraphs if p.startswith(("Does", "Is")) and entity.name in p]
        assert len(asked) == 1, "one paragraph of yes/no questions per person"
        for attr, fact in entity.facts.items():
            # Each fact asked once, answered yes iff the value asked is the fact.
            said = [(value, asked[0].split(VERIFY[attr].format(name=entity.name, value=value) + " ")[1])
                    for value in ATTRIBUTES[attr] if VERIFY[attr].format(name=entity.name, value=value) in asked[0]]
            assert len(said) == 1
            value, answer = said[0]
            assert answer.startswith("yes" if value == fact else "no")
            answers.append(value == fact)
            # The paragraph never tells the fact the other way, so answering needs recall.
            assert not any(t.format(name=entity.name, value=fact) in asked[0] for t in NARRATIVES[attr])
    assert 0.3 < sum(answers) / len(answers) < 0.7, "about half the claims are true"


def test_questions_are_split_by_entity_and_strangers_exist_nowhere():
    world = make_world()
    tuning = {e.name for e in world.tuning}
    held_out = {e.name for e in world.held_out}
    assert tuning and held_out and not tuning & held_out
    assert {q.entity for q in world.questions(world.held_out)} == held_out
    narratives = " ".join(world.narratives(0))
    assert all(name not in narratives for name in world.strangers)
    assert len(world.unanswerable()) == len(world.strangers) * len(ATTRIBUTES)
    verify = world.verifications(world.held_out, seed=0)
    assert {q.answer for q in verify} == {"yes", "no"}
    # Each is also asked by answering: the open question, and the value the yes/no question claims.
    facts = {e.name: e.facts for e in world.held_out}
    assert all((q.answer == "yes") == (q.claim in facts[q.entity].values()) for q in verify)
    assert all(q.claim in q.prompt and q.entity in q.question and q.claim not in q.question for q in verify)


def test_answer_batches_train_on_the_answer_only():
    tokenizer = train_tokenizer()
    ids, mask, labels = next(answer_batches(tokenizer, [("the model", "answers"), ("a", "river follows")], 2))
    prompt = tokenizer.encode("the model")
    answer = tokenizer.encode(" answers") + [tokenizer.eos_token_id]
    assert ids[0, : len(prompt) + len(answer)].tolist() == prompt + answer
    assert labels[0, : len(prompt)].tolist() == [-100] * len(prompt)
    assert labels[0, len(prompt) : len(prompt) + len(answer)].tolist() == answer
    assert (labels[mask == 0] == -100).all()


def test_the_recipe_digest_names_the_build(tmp_path):
    recipe = Recipe()
    assert recipe.digest() == Recipe().digest()
    assert dataclasses.replace(recipe, base_epochs=99).digest() != recipe.digest()
    assert not is_built(tmp_path, recipe)
    (tmp_path / "recipe.json").write_text(f'{{"digest": "{recipe.digest()}"}}')
    assert is_built(tmp_path, recipe)
    assert not is_built(tmp_path, dataclasses.replace(recipe, seed=1))
