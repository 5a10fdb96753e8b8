"""Facts a user tells a companion about themselves, for the memory benchmark and for weight memory.

A fact has a kind (the user's name, a pet's name, their home town, a favourite thing, a plan for a day), a
value, the sentence the user says it with, questions that ask it back, and the reply that answers them.
The questions come in two sets: `train_questions` a memory may learn from, and `test_questions`, held-out
paraphrases used only to test it, so a memory that recalls a fact must generalise from one phrasing to
another rather than replay a string it was taught. Every value is invented (towns that do not exist, names
drawn from a fixed list) so a model cannot know it from its training data.

`make_facts(n, seed)` draws `n` facts with distinct slots (one name, one home town, one pet per species, one
favourite per thing, one plan per day); `parse_fact(text)` reads a fact the user typed ("my dog is called
Rex") into the same form, or None when it matches no kind. `recalled(reply, fact)` is the benchmark's verdict:
the reply names the fact's value and no other candidate value of its kind.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import partial
from typing import Callable

NAMES = ("Priya", "Marco", "Lena", "Tomasz", "Aiko", "Jamal", "Sofia", "Oskar", "Ines", "Rafael", "Yara",
         "Dmitri", "Keiko", "Emeka", "Greta", "Nilo")
TOWNS = ("Brackwater", "Elmsby", "Farrowdale", "Quillmouth", "Ostervik", "Marrowgate", "Tindle", "Lowenbrook",
         "Kestrel Bay", "Ashcombe", "Vellmoor", "Corrin")
PET_NAMES = ("Biscuit", "Pepper", "Noodle", "Ziggy", "Mochi", "Waffles", "Pickle", "Bean", "Juniper", "Turnip",
             "Clementine", "Pixel")
SPECIES = ("dog", "cat", "rabbit", "parrot", "hamster")
FAVOURITES = {
    "colour": ("teal", "crimson", "lilac", "amber", "olive", "coral", "indigo", "mustard"),
    "fruit": ("mango", "kiwi", "plum", "lychee", "apricot", "papaya", "fig", "quince"),
    "food": ("ramen", "lasagne", "falafel", "risotto", "dumplings", "paella", "goulash", "tacos"),
    "sport": ("rowing", "fencing", "curling", "handball", "archery", "squash", "badminton", "judo"),
    "season": ("spring", "summer", "autumn", "winter"),
    "flower": ("tulips", "peonies", "daisies", "orchids", "lilies", "poppies", "irises", "dahlias"),
    "drink": ("cocoa", "lemonade", "chai", "espresso", "kombucha", "cider", "matcha", "smoothies"),
}
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
PLACES = ("lake", "museum", "cinema", "zoo", "beach", "library", "bakery", "stadium", "aquarium", "market",
          "theatre", "harbour")


@dataclass(frozen=True)
class Fact:
    """One fact about the user. `slot` identifies what it is about ("pet:dog", "plan:Saturday"): a newer fact
    with the same slot replaces an older one. `candidates` are every value the benchmark would accept for a
    fact of this kind, the value included, so a reply naming another one is caught."""

    kind: str
    slot: str
    value: str
    statement: str
    train_questions: tuple[str, ...]
    test_questions: tuple[str, ...]
    answer: str
    candidates: tuple[str, ...]


def name_fact(value: str) -> Fact:
    return Fact("name", "name", value, f"My name is {value}.",
                ("What's my name?", "What is my name?", "Who am I?", "What am I called?"),
                ("Do you remember my name?", "Can you tell me my name?"),
                f"Your name is {value}.", NAMES)


def home_fact(value: str) -> Fact:
    return Fact("home", "home", value, f"I live in {value}.",
                ("Where do I live?", "What's my home town?", "Which town am I from?"),
                ("Do you remember where I live?", "Where is my home?"),
                f"You live in {value}.", TOWNS)


def pet_fact(species: str, value: str) -> Fact:
    return Fact("pet", f"pet:{species}", value, f"I have a {species} called {value}.",
                (f"What's my {species} called?", f"What is my {species}'s name?", f"What did I name my {species}?"),
                (f"Do you remember my {species}'s name?", f"Remind me, what is my {species} called?"),
                f"Your {species} is called {value}.", PET_NAMES)


def favourite_fact(thing: str, value: str) -> Fact:
    return Fact("favourite", f"favourite:{thing}", value, f"My favourite {thing} is {value}.",
                (f"What's my favourite {thing}?", f"What is my favourite {thing}?",
                 f"Which {thing} do I like most?"),
                (f"Do you remember my favourite {thing}?", f"Which {thing} do I love best?"),
                f"Your favourite {thing} is {value}.", FAVOURITES[thing])


def plan_fact(day: str, value: str) -> Fact:
    return Fact("plan", f"plan:{day}", value, f"On {day} I'm going to the {value}.",
                (f"Where am I going on {day}?", f"What are my plans for {day}?", f"Where will I be on {day}?"),
                (f"Do you remember where I'm going on {day}?", f"What did I say I'm doing on {day}?"),
                f"On {day} you're going to the {value}.", PLACES)


def slots() -> list[tuple[Callable[[str], Fact], tuple[str, ...]]]:
    """Every distinct slot a user can fill: (fact maker taking the value, the values it draws from)."""
    return ([(name_fact, NAMES), (home_fact, TOWNS)]
            + [(partial(pet_fact, s), PET_NAMES) for s in SPECIES]
            + [(partial(favourite_fact, t), v) for t, v in FAVOURITES.items()]
            + [(partial(plan_fact, d), PLACES) for d in DAYS])


def make_facts(n: int, seed: int) -> list[Fact]:
    """`n` facts with distinct slots and values drawn by `seed` (the same seed gives the same facts).

    Values of one candidate list are distinct (two pets never share a name), so a reply naming a value
    belongs to exactly one fact. Raises ValueError when `n` exceeds the number of slots (21).
    """
    pool = slots()
    if not 0 <= n <= len(pool):
        raise ValueError(f"between 0 and {len(pool)} facts, got {n}")
    rng = random.Random(seed)
    used: dict[tuple[str, ...], set[str]] = {}
    facts = []
    for make, values in rng.sample(pool, n):
        taken = used.setdefault(values, set())
        value = rng.choice([v for v in values if v not in taken])
        taken.add(value)
        facts.append(make(value))
    return facts


_VALUE = r"([A-Za-z][\w' -]*?)"
_END = r"\s*[.!?]*$"
_SPECIES = "|".join(SPECIES)
_THINGS = "|".join(FAVOURITES)
_DAYS = "|".join(DAYS)
_PATTERNS = (
    (re.compile(rf"(?:my name is|my name's|call me|i'm called|i am called)\s+{_VALUE}{_END}", re.I),
     lambda m: name_fact(_title(m[1]))),
    (re.compile(rf"(?:i live in|i'm from|i am from|my home ?town is)\s+{_VALUE}{_END}", re.I),
     lambda m: home_fact(_title(m[1]))),
    (re.compile(rf"i have an? ({_SPECIES}) (?:called|named)\s+{_VALUE}{_END}", re.I),
     lambda m: pet_fact(m[1].lower(), _title(m[2]))),
    (re.compile(rf"my ({_SPECIES})(?:'s name is| is called| is named)\s+{_VALUE}{_END}", re.I),
     lambda m: pet_fact(m[1].lower(), _title(m[2]))),
    (re.compile(rf"my favou?rite ({_THINGS}) is\s+{_VALUE}{_END}", re.I),
     lambda m: favourite_fact(m[1].lower(), m[2].strip())),
    (re.compile(rf"on ({_DAYS}) i'm going to (?:the )?{_VALUE}{_END}", re.I),
     lambda m: plan_fact(m[1].capitalize(), m[2].strip())),
    (re.compile(rf"i'm going to (?:the )?{_VALUE} on ({_DAYS}){_END}", re.I),
     lambda m: plan_fact(m[2].capitalize(), m[1].strip())),
)


def _title(value: str) -> str:
    return " ".join(w[:1].upper() + w[1:] for w in value.split())


def parse_fact(text: str) -> Fact | None:
    """The fact a user states in one sentence ("My dog is called Rex", "on friday I'm going to the zoo"), or
    None when it is none of the kinds above. A parsed value keeps its own candidates list, so a value outside
    the benchmark's lists is still a fact (its candidates then only guard against the listed ones)."""
    text = " ".join(text.split())
    for pattern, build in _PATTERNS:
        m = pattern.search(text)
        if m:
            return build(m)
    return None


def says(text: str, phrase: str) -> bool:
    """`phrase` occurs in `text` as whole words, any case ("Bean" in "Bean!", not in "Beanie")."""
    return re.search(rf"(?<![\w']){re.escape(phrase.lower())}(?![\w'])", text.lower()) is not None


def recalled(reply: str, fact: Fact) -> bool:
    """The reply names the fact's value and no other candidate value of its kind."""
    return says(reply, fact.value) and not any(says(reply, v) for v in fact.candidates if v != fact.value)
