"""The memory benchmark's facts: distinct slots and values, held-out questions, parsing typed facts, the verdict."""

from __future__ import annotations

import pytest

from persona_lm.user_facts import make_facts, parse_fact, pet_fact, plan_fact, recalled, slots


def test_facts_are_seeded_with_distinct_slots_and_values():
    facts = make_facts(len(slots()), seed=3)
    assert len({f.slot for f in facts}) == len(facts)
    for f in facts:
        others = [g.value for g in facts if g is not f and g.candidates == f.candidates]
        assert f.value in f.candidates and f.value not in others
        assert f.value in f.statement and f.value in f.answer
        assert not set(f.train_questions) & set(f.test_questions)
        assert all(f.value not in q for q in f.train_questions + f.test_questions)
    assert make_facts(5, seed=3) == make_facts(5, seed=3) != make_facts(5, seed=4)
    with pytest.raises(ValueError, match="between 0 and"):
        make_facts(len(slots()) + 1, seed=0)


@pytest.mark.parametrize("text, slot, value", [
    ("my dog is called rex", "pet:dog", "Rex"),
    ("I have a cat named Mr Whiskers!", "pet:cat", "Mr Whiskers"),
    ("Call me Ana.", "name", "Ana"),
    ("My name's   Jo", "name", "Jo"),
    ("i live in new york", "home", "New York"),
    ("my favorite colour is sea green", "favourite:colour", "sea green"),
    ("On friday I'm going to the dentist", "plan:Friday", "dentist"),
    ("I'm going to the zoo on sunday", "plan:Sunday", "zoo"),
])
def test_typed_facts_are_parsed_into_slot_and_value(text, slot, value):
    fact = parse_fact(text)
    assert (fact.slot, fact.value) == (slot, value)
    assert value in fact.answer


@pytest.mark.parametrize("text", ["I like trains", "my dog is lovely and called nothing", "What's my name?", ""])
def test_sentences_that_state_no_known_kind_of_fact_are_not_facts(text):
    assert parse_fact(text) is None


def test_recalled_needs_the_value_and_no_other_candidate():
    dog = pet_fact("dog", "Bean")
    assert recalled("Your dog is called Bean!", dog)
    assert not recalled("Your dog is called Bean or Pepper.", dog)
    assert not recalled("Your dog is a beanie baby.", dog)
    assert recalled("You're off to the zoo.", plan_fact("Sunday", "zoo"))
