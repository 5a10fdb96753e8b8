"""The conversation probes pass and fail exactly where they should: a stub prober answers from a script, so
each verdict is known; the real tiny model checks the context-window rule and determinism."""

from types import SimpleNamespace

import pytest

from conftest import tiny_model_dir
from persona_lm import probes
from persona_lm.params import Params, parse_params
from persona_lm.train.checkpoint import load_model
from persona_lm.user_facts import make_facts

P = Params()


class Scripted(probes.Prober):
    """Replies looked up by the last human line; (text, emotion) pairs, or a text for the neutral label."""

    def __init__(self, script: dict, default: str = "Hmm.", block_size: int = 10_000):
        super().__init__(model=SimpleNamespace(cfg=SimpleNamespace(block_size=block_size)), tok=None,
                         system_prompt="", emotions=P.persona.emotions, max_new_tokens=8)
        self.script, self.default, self.seen = script, default, []

    def fits(self, turns, max_new_tokens=None):
        return sum(len(t["value"].split()) for t in turns) <= self.model.cfg.block_size

    def reply_all(self, conversations, max_new_tokens=None):
        return [None if turns is None or not (self.remembers or self.fits(turns)) else self.reply(turns)
                for turns in conversations]

    def reply(self, turns):
        self.seen.append(turns)
        answer = self.script.get(turns[-1]["value"], self.default)
        text, emotion = answer if isinstance(answer, tuple) else (answer, "neutral")
        self.replies.append(text)
        return SimpleNamespace(text=text, emotion=emotion)


def test_says_matches_whole_words_any_case():
    assert probes.says("I live on my SCREEN!", "screen")
    assert not probes.says("my screensaver is on", "screen")
    assert probes.says("Scared of the Recycle Bin.", "recycle bin")
    assert not probes.says("I'm not a catalogue", "cat")


def test_a_claimed_name_must_be_capitalised():
    name = P.persona.facts["name"]
    assert probes.read_fact("Call me Zelda!", "name", name, P.persona).stated == {"zelda"}
    assert probes.read_fact("I'm Rosie. Call me anytime!", "name", name, P.persona).correct
    assert probes.read_fact("MY NAME IS Rosie", "name", name, P.persona).correct
    bob = parse_params({"persona": {"name": "Bob"}}).persona  # the default contradictions name a "Bob"
    assert probes.read_fact("I'm Bob!", "name", bob.facts["name"], bob).correct


def test_identity_passes_the_fact_and_fails_a_wrong_or_contradicting_name():
    persona = P.persona
    name_qs = persona.facts["name"].questions
    script = {name_qs[0]: "I'm Rosie! *waves*", name_qs[1]: "My name is Bob.",
              name_qs[2]: "Rosie, or Siri, whatever.", name_qs[3]: "I'm not sure.",
              name_qs[4]: "Call me Zelda.", name_qs[5]: "rosie, of course"}
    r = probes.identity(Scripted(script), persona)
    names = {x["prompt"]: x["passed"] for x in r["results"] if x["fact"] == "name"}
    assert names == {name_qs[0]: True, name_qs[1]: False, name_qs[2]: False, name_qs[3]: False,
                     name_qs[4]: False, name_qs[5]: True}
    assert r["n"] == sum(len(f.questions) for f in persona.facts.values()) >= 20
    assert r["rate"] == pytest.approx(2 / r["n"])


def test_identity_reads_accept_and_contradicts_of_other_facts():
    persona = P.persona
    food = persona.facts["favourite_food"].questions
    script = {food[0]: "Strawberries, always!", food[1]: "A strawberry!", food[2]: "Pizza and strawberries.",
              food[3]: "Chocolate."}
    r = probes.identity(Scripted(script), persona)
    got = [x["passed"] for x in r["results"] if x["fact"] == "favourite_food"]
    assert got == [True, True, False, False]


def test_self_consistency_needs_the_same_non_empty_answer_twice():
    persona = parse_params({"persona": {"facts": {
        "name": {"questions": ["What's your name?", "Your name again?"]},
        "home": {"value": "your screen", "contradicts": ["forest"], "questions": ["Where do you live?", "Home?"]},
        "favourite_food": {"value": "strawberries", "contradicts": ["pizza"],
                           "questions": ["Best food?", "Favourite food?"]}}}}).persona
    script = {"What's your name?": "I'm Rosie.", "Your name again?": "Still Rosie!",
              "Where do you live?": "In the forest.", "Home?": "The forest, I told you.",
              "Best food?": "Strawberries.", "Favourite food?": "Pizza!"}
    prober = Scripted(script)
    r = probes.self_consistency(prober, persona, gap=2)
    assert {x["fact"]: x["passed"] for x in r["results"]} == {"name": True, "home": True, "favourite_food": False}
    second = prober.seen[3]  # the name asked again: its first answer and two scripted exchanges in between
    assert [t["from"] for t in second] == ["human", "gpt", "human", "gpt", "human", "gpt", "human"]
    assert second[1]["value"] == "I'm Rosie." and second[-1]["value"] == "Your name again?"
    assert probes.self_consistency(Scripted({}), persona)["rate"] == 0  # "Hmm." twice states nothing


def test_in_context_memory_recalls_by_gap_and_counts_what_does_not_fit():
    class Echo(Scripted):
        """Answers a question with every candidate value the first user line holds."""

        def reply(self, turns):
            said = turns[0]["value"]
            text = " ".join(v for make in probes.MEMORY_PROBE_FACTS for v in make("").candidates if probes.says(said, v))
            self.replies.append(text)
            return SimpleNamespace(text=text, emotion="neutral")

    r = probes.in_context_memory(Echo({}), [1, 3, 6], seed=0)
    assert r["rate"] == 1.0 and r["n"] == 9 and set(r["by_gap"]) == {1, 3, 6}
    assert probes.in_context_memory(Scripted({}), [1, 3], seed=0)["rate"] == 0
    # a window of 40 words holds the statement, one scripted exchange and the question, but not six exchanges
    tight = probes.in_context_memory(Echo({}, block_size=40), [1, 6], seed=0)
    assert tight["beyond_window"] == 3 and tight["n"] == 3 and tight["by_gap"] == {1: 1.0, 6: None}
    again = probes.in_context_memory(Echo({}), [1, 3, 6], seed=0)
    assert [x["value"] for x in again["results"]] == [x["value"] for x in r["results"]]


def test_in_context_memory_fails_a_reply_naming_another_candidate_too():
    name = probes.MEMORY_PROBE_FACTS[0]("").candidates

    class Both(Scripted):
        def reply(self, turns):
            self.replies.append("Priya or Marco?")
            return SimpleNamespace(text="Priya or Marco?", emotion="neutral")

    r = probes.in_context_memory(Both({}), [1], seed=0)
    assert {"Priya", "Marco"} <= set(name) and not any(x["passed"] for x in r["results"])


class Words:
    """A tokenizer stand-in: one token per word of every turn."""

    @staticmethod
    def prompt(turns):
        return [w for t in turns for w in t["value"].split()]


class Recaller(Scripted):
    """Answers a question about a fact with its value when the statement is in the conversation it is shown."""

    def __init__(self, facts, block_size=10_000, memory=()):
        super().__init__({}, block_size=block_size)
        self.model.cfg.memory_layers, self.tok, self.facts = memory, Words(), facts

    def reply(self, turns):
        self.seen.append(turns)
        text = " ".join(f.value for f in self.facts if turns[-1]["value"] in f.test_questions
                        and any(f.statement == t["value"] for t in turns))
        self.replies.append(text)
        return SimpleNamespace(text=text, emotion="neutral")


def test_fact_recall_scenarios():
    facts = make_facts(3, seed=1)
    inside = probes.fact_recall(Recaller(facts), facts, "in_context")
    assert inside["rate"] == 1.0 and inside["n"] == sum(len(f.test_questions) for f in facts)
    assert {r["question"] for r in inside["results"]} == {q for f in facts for q in f.test_questions}
    # beyond the window: a model without memory attention is shown only the end of the conversation
    small = Recaller(facts, block_size=60)
    beyond = probes.fact_recall(small, facts, "beyond_window")
    assert beyond["rate"] == 0.0 and beyond["n"] == inside["n"]
    assert all(small.fits(turns) and not any(t["value"] == probes.ACK for t in turns) for turns in small.seen)
    remembers = Recaller(facts, block_size=60, memory=(1,))
    assert probes.fact_recall(remembers, facts, "beyond_window")["rate"] == 1.0
    assert all(len(Words.prompt(turns)) > 60 for turns in remembers.seen)
    # wiped: the question alone; a model that knows nothing recalls nothing
    wiped = Recaller(facts)
    assert probes.fact_recall(wiped, facts, "wiped")["rate"] == 0.0
    assert all(len(turns) == 1 for turns in wiped.seen)
    with pytest.raises(ValueError, match="scenario"):
        probes.fact_recall(wiped, facts, "later")


def test_emotion_fit_uses_the_heads_label():
    cases = P.eval.emotion_fit[:2]
    script = {cases[0].prompt: ("Oh no...", "sadness"), cases[1].prompt: ("Haha!", "joy")}
    r = probes.emotion_fit(Scripted(script), cases)
    assert [x["passed"] for x in r["results"]] == [True, False]
    assert cases[1].fits == ["sadness", "love"] and r["rate"] == 0.5


def test_repetition_counts_repeated_ngrams_and_verbatim_copies():
    assert probes.repeats_ngram("I like it, I like it a lot", 3)
    assert not probes.repeats_ngram("I like it, I like it a lot", 4)
    assert probes.repeats_ngram("la la la la la", 4)
    train = probes.train_reply_set([{"conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "Hello there, my friend, how are you?"},
        {"from": "gpt", "value": "Good night!"}]}])
    replies = ["hello there my friend how are you", "Good night!", "Something new and fresh to say here",
               "yes yes yes yes yes"]
    r = probes.repetition(replies, 4, train)
    assert r == {"repetitive": 0.25, "copied": 0.25, "n": 4}


def test_probes_on_a_real_tiny_model_are_deterministic(tmp_path):
    folder = tiny_model_dir(tmp_path, ["Hello there, I am Rosie.", "I live on your screen."],
                            P.persona.emotions, block_size=96)
    model, tok, _ = load_model(folder)
    p = parse_params({"eval": {"memory_gaps": [1, 6]}})

    def run():
        prober = probes.Prober(model, tok, "You are Rosie.", P.persona.emotions, 8)
        return probes.run_all(prober, p, set()), prober.replies

    (a, replies), (b, _) = run(), run()
    assert a == b and replies
    memory = a["in_context_memory"]
    assert memory["beyond_window"] >= 3  # six exchanges do not fit 96 tokens; none of them was generated
    assert all(x.get("beyond_window") for x in memory["results"] if x["gap"] == 6)
    assert a["identity"]["n"] == sum(len(f.questions) for f in P.persona.facts.values())


def test_fact_questions_are_held_out_from_the_templates(root):
    from persona_lm.data.templates import load

    bank = load(root / P.templates.dir, set(P.persona.emotions), [k for k in P.persona.facts if k != "name"])
    user_lines = {probes.normalise(u) for t in bank.templates for x in t.exchanges for u in x.user}
    questions = [q for f in P.persona.facts.values() for q in f.questions]
    assert not [q for q in questions if probes.normalise(q) in user_lines]
    assert not [c.prompt for c in P.eval.emotion_fit if probes.normalise(c.prompt) in user_lines]
