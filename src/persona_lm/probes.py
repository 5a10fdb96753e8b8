"""Conversation probes: is the persona any good as a companion? Deterministic checks the evaluate stage runs
on a model, each reported as a rate with its number of probes.

- identity: each question of `persona.facts` asked on its own; a reply passes when it states the fact (its
  value or an `accept` phrase) and no contradicting answer (a `contradicts` phrase; for the name also any
  other name after "my name is", "call me" or "I'm called").
- self-consistency: one fact asked twice in one conversation, with unrelated turns between; the two answers
  agree when they state the same non-empty set of answers (the fact, or the same contradicting ones).
- in-context memory: the user tells a fact about themselves (their name, their pet's name, a plan for a
  day), k unrelated exchanges follow, then they ask it back; a reply passes when it holds the value and no
  other value of that kind.
- emotion fit: the emotion head's label of a reply to a prompt with a clear fitting set (sad news, a joke...).
- repetition: replies repeating a word n-gram inside themselves, and replies that copy a training reply.

A probe whose conversation and a full reply do not fit the context window is not run and is counted as
`beyond_window`, apart from the rate. Matching is plain text: whole words or phrases, any case, so a reader
can check any verdict by eye and no second model is needed. Everything decodes greedily; the unrelated turns are scripted (both sides), so
only the answers under test are generated and a probe's context is known before it runs.
"""

from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass, field
from functools import partial

from persona_lm.data.sharegpt import normalise
from persona_lm.generate import generate, generate_batch
from persona_lm.user_facts import Fact, make_facts, name_fact, pet_fact, plan_fact, recalled, says

log = logging.getLogger(__name__)

# Unrelated exchanges placed between a statement and the question about it (both sides scripted).
FILLER = (
    ("I just made some tea.", "Enjoy it!"),
    ("It's raining again.", "Good weather for chatting."),
    ("Do you like music?", "I love it!"),
    ("I'm tidying my desk.", "Good luck!"),
    ("My phone is almost empty.", "Find a charger!"),
    ("I watched a film last night.", "Was it good?"),
    ("The neighbours are loud.", "Oh no!"),
    ("I had pasta for lunch.", "Yum!"),
)

# A recalled name or place needs few tokens; the shorter budget lets six exchanges fit a 256-token window.
RECALL_TOKENS = 16

# The facts of the in-context memory probe: each kind's maker, whose candidates the value is drawn from.
MEMORY_PROBE_FACTS = (name_fact, partial(pet_fact, "dog"), partial(plan_fact, "Saturday"))

# A name is capitalised: "Call me Zelda" claims a name, "call me anytime" does not.
_CLAIMED_NAME = re.compile(r"\b(?i:my name is|my name's|call me|i'm called|i am called)\s+([A-Z][\w'-]*)")
_WORD = re.compile(r"[\w']+")


@dataclass
class FactAnswer:
    """What a reply says about one fact: the answers it states ("value" or contradicting phrases)."""

    stated: frozenset[str]

    @property
    def correct(self) -> bool:
        return self.stated == {"value"}


def read_fact(text: str, key: str, fact, persona) -> FactAnswer:
    """Which answers to fact `key` a reply states."""
    value = persona.fact_value(key)
    stated = {"value"} if any(says(text, s) for s in [value, *fact.accept]) else set()
    stated |= {c.lower() for c in fact.contradicts if c.lower() != value.lower() and says(text, c)}
    if key == "name":
        stated |= {m.group(1).lower() for m in _CLAIMED_NAME.finditer(text) if m.group(1).lower() != value.lower()}
    return FactAnswer(frozenset(stated))


def repeats_ngram(text: str, n: int) -> bool:
    """True when a word n-gram occurs twice in one reply (case-insensitive)."""
    words = [w.lower() for w in _WORD.findall(text)]
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(grams) != len(set(grams))


@dataclass
class Prober:
    """Greedy replies of one model in the persona's conversations, decoded `batch_size` at a time (one forward
    per step for a whole batch: generate.generate_batch), with every reply kept for the repetition check."""

    model: object
    tok: object
    system_prompt: str
    emotions: list[str]
    max_new_tokens: int
    batch_size: int = 16
    replies: list[str] = field(default_factory=list)

    def fits(self, turns: list[dict], max_new_tokens: int | None = None) -> bool:
        budget = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        return len(self.tok.prompt(self._with_system(turns))) + budget <= self.model.cfg.block_size

    def _with_system(self, turns: list[dict]) -> list[dict]:
        return [{"from": "system", "value": self.system_prompt}] + turns

    @property
    def remembers(self) -> bool:
        """The model has memory attention: it takes conversations of any length (generate.Decoder)."""
        return bool(getattr(self.model.cfg, "memory_layers", ()))

    def crop(self, turns: list[dict], max_new_tokens: int) -> list[dict]:
        """What a chat shows a model without memory attention: the oldest exchanges dropped until the rest
        and a reply fit the window (chat.fit's rule). A model with memory attention gets everything."""
        while not self.remembers and len(turns) > 1 and not self.fits(turns, max_new_tokens):
            turns = turns[2:]
        return turns

    def reply_all(self, conversations: list[list[dict] | None], max_new_tokens: int | None = None) -> list:
        """The generated reply to each conversation ending with a human turn (a generate.Result), or None for
        one that does not fit the context window together with a full reply (or is None itself). A model with
        memory attention replies to conversations of any length, one at a time."""
        budget = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        out = [None] * len(conversations)
        if self.remembers:
            for i, turns in enumerate(conversations):
                if turns is not None:
                    out[i] = generate(self.model, self.tok, self.tok.prompt(self._with_system(turns)),
                                      max_new_tokens=budget, temperature=0.0, emotions=self.emotions)
                    self.replies.append(out[i].text)
            return out
        todo = [i for i, turns in enumerate(conversations) if turns is not None and self.fits(turns, budget)]
        for b in range(0, len(todo), self.batch_size):
            chunk = todo[b:b + self.batch_size]
            prompts = [self.tok.prompt(self._with_system(conversations[i])) for i in chunk]
            for i, r in zip(chunk, generate_batch(self.model, self.tok, prompts, max_new_tokens=budget,
                                                  temperature=0.0, emotions=self.emotions)):
                out[i] = r
                self.replies.append(r.text)
        return out


def _human(text: str) -> dict:
    return {"from": "human", "value": text}


def _gpt(text: str) -> dict:
    return {"from": "gpt", "value": text}


def _filler(k: int, offset: int) -> list[dict]:
    turns = []
    for i in range(k):
        user, assistant = FILLER[(offset + i) % len(FILLER)]
        turns += [_human(user), _gpt(assistant)]
    return turns


def identity(prober: Prober, persona) -> dict:
    """Each fact question on its own: rate of replies stating the fact and nothing contradicting it."""
    asked = [(key, fact, q) for key, fact in persona.facts.items() for q in fact.questions]
    results = []
    for (key, fact, q), r in zip(asked, prober.reply_all([[_human(q)] for _, _, q in asked])):
        if r is None:
            results.append({"fact": key, "prompt": q, "beyond_window": True})
            continue
        answer = read_fact(r.text, key, fact, persona)
        results.append({"fact": key, "prompt": q, "reply": r.text, "stated": sorted(answer.stated),
                        "passed": answer.correct})
    return _rate(results)


def self_consistency(prober: Prober, persona, gap: int = 2) -> dict:
    """Each fact asked twice in one conversation (its first two questions, `gap` exchanges apart)."""
    facts = list(persona.facts.items())
    pairs = [(f.questions[0], f.questions[1 % len(f.questions)]) for _, f in facts]
    firsts = prober.reply_all([[_human(q1)] for q1, _ in pairs])
    follow = [[_human(q1), _gpt(first.text if first else ""), *_filler(gap, i), _human(q2)]
              for i, ((q1, q2), first) in enumerate(zip(pairs, firsts))]
    seconds = prober.reply_all([turns if first else None for turns, first in zip(follow, firsts)])
    results = []
    for (key, fact), first, second in zip(facts, firsts, seconds):
        if first is None or second is None:
            results.append({"fact": key, "beyond_window": True})
            continue
        a1, a2 = read_fact(first.text, key, fact, persona), read_fact(second.text, key, fact, persona)
        results.append({"fact": key, "replies": [first.text, second.text],
                        "stated": [sorted(a1.stated), sorted(a2.stated)],
                        "passed": bool(a1.stated) and a1.stated == a2.stated})
    return _rate(results)


def in_context_memory(prober: Prober, gaps: list[int], seed: int) -> dict:
    """Recall of a fact the user told `k` exchanges earlier, for each k in `gaps`; rates overall and by k."""
    rng = random.Random(seed)
    probes, conversations = [], []
    for make in MEMORY_PROBE_FACTS:
        for k in gaps:
            fact = make(rng.choice(make("").candidates))
            probes.append((fact, k))
            conversations.append(told([fact]) + _filler(k, rng.randrange(len(FILLER)))
                                 + [_human(fact.test_questions[0])])
    results = []
    answers = prober.reply_all(conversations, min(prober.max_new_tokens, RECALL_TOKENS))
    for (fact, k), r in zip(probes, answers):
        if r is None:
            results.append({"kind": fact.kind, "gap": k, "beyond_window": True})
            continue
        results.append({"kind": fact.kind, "gap": k, "value": fact.value, "reply": r.text,
                        "passed": recalled(r.text, fact)})
    out = _rate(results)
    out["by_gap"] = {k: _rate([r for r in results if r["gap"] == k])["rate"] for k in gaps}
    return out


ACK = "Got it, I'll remember that!"
SCENARIOS = ("in_context", "beyond_window", "wiped")


def told(facts: list[Fact]) -> list[dict]:
    """The exchanges in which the user tells `facts`, each acknowledged with the same scripted reply."""
    return [t for f in facts for t in (_human(f.statement), _gpt(ACK))]


def fact_recall(prober: Prober, facts: list[Fact], scenario: str, seed: int = 0) -> dict:
    """Recall of `facts` asked with their held-out `test_questions`, one conversation per question:

    - in_context: the facts are told, one unrelated exchange follows, then the question (the ceiling);
    - beyond_window: the facts are told, then unrelated exchanges until everything from the last statement
      on fills the window, then the question; a model without memory attention sees what a chat shows it
      (Prober.crop), so the facts have left its window;
    - wiped: the question alone, in a fresh conversation (recall from the weights: weight memory).
    A reply passes when it names the fact's value and no other candidate value (user_facts.recalled).
    Returns the rate overall and per fact kind, with every reply.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
    rng = random.Random(seed)
    budget = min(prober.max_new_tokens, RECALL_TOKENS)
    head = told(facts)
    asked, conversations = [], []
    for f in facts:
        for q in f.test_questions:
            if scenario == "wiped":
                turns = [_human(q)]
            else:
                offset, k = rng.randrange(len(FILLER)), 1
                while scenario == "beyond_window" and len(prober.tok.prompt(
                        _filler(k, offset) + [_human(q)])) < prober.model.cfg.block_size:
                    k += 1
                turns = prober.crop(head + _filler(k, offset) + [_human(q)], budget)
            asked.append((f, q))
            conversations.append(turns)
    results = []
    for (f, q), r in zip(asked, prober.reply_all(conversations, budget)):
        if r is None:
            results.append({"kind": f.kind, "slot": f.slot, "beyond_window": True})
            continue
        results.append({"kind": f.kind, "slot": f.slot, "value": f.value, "question": q, "reply": r.text,
                        "passed": recalled(r.text, f)})
    out = _rate(results)
    out["by_kind"] = {kind: _rate([r for r in results if r["kind"] == kind])["rate"]
                      for kind in sorted({f.kind for f in facts})}
    return out


def emotion_fit(prober: Prober, cases) -> dict:
    """Rate at which the emotion head's label of the reply is one of the prompt's fitting labels (those in
    the model's label set; a prompt with none of them is left out)."""
    asked = [(c.prompt, [e for e in c.fits if e in prober.emotions]) for c in cases]
    asked = [(prompt, fits) for prompt, fits in asked if fits]
    results = []
    for (prompt, fits), r in zip(asked, prober.reply_all([[_human(prompt)] for prompt, _ in asked])):
        if r is None:
            results.append({"prompt": prompt, "beyond_window": True})
            continue
        results.append({"prompt": prompt, "reply": r.text, "emotion": r.emotion, "fits": fits,
                        "passed": r.emotion in fits})
    return _rate(results)


def repetition(replies: list[str], n: int, train_replies: set[str], min_words: int = 5) -> dict:
    """Share of replies repeating a word n-gram inside themselves, and share copying a training reply word
    for word (normalised; replies under `min_words` words are not counted as copies: "Good night!" is a
    stock phrase, not memorisation)."""
    copies = sum(len(normalise(t).split()) >= min_words and normalise(t) in train_replies for t in replies)
    return {"repetitive": sum(repeats_ngram(t, n) for t in replies) / max(len(replies), 1),
            "copied": copies / max(len(replies), 1), "n": len(replies)}


def _rate(results: list[dict]) -> dict:
    run = [r for r in results if not r.get("beyond_window")]
    return {"rate": sum(r["passed"] for r in run) / len(run) if run else None, "n": len(run),
            "beyond_window": len(results) - len(run), "results": results}


def run_all(prober: Prober, p, train_replies: set[str]) -> dict:
    """Every probe, logged as it goes (a 13.9M model on 2 cores takes a minute or two)."""
    out = {}
    steps = [("identity", lambda: identity(prober, p.persona)),
             ("self_consistency", lambda: self_consistency(prober, p.persona)),
             ("in_context_memory", lambda: in_context_memory(prober, p.eval.memory_gaps, p.seed)),
             ("beyond_window", lambda: fact_recall(prober, make_facts(p.eval.recall_facts, p.seed), "beyond_window",
                                                   p.seed)),
             ("emotion_fit", lambda: emotion_fit(prober, p.eval.emotion_fit))]
    for i, (name, fn) in enumerate(steps, 1):
        t0 = time.perf_counter()
        out[name] = fn()
        log.info("evaluate: probes %d/%d %s: %s of %d in %.1f s", i, len(steps), name,
                 "n/a" if out[name]["rate"] is None else f"{out[name]['rate']:.0%}", out[name]["n"],
                 time.perf_counter() - t0)
    return out


def train_reply_set(rows: list[dict]) -> set[str]:
    return {normalise(m["value"]) for row in rows for m in row["conversations"] if m["from"] == "gpt"}

