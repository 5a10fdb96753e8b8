"""The persona templates load, expand deterministically into valid rows, and fail loudly when malformed."""

import importlib.util
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from persona_lm.data.sharegpt import check_row
from persona_lm.data.templates import TemplateError, expand, load
from persona_lm.errors import PersonaError
from persona_lm.params import Params, parse_params

P = Params()
LABELS = set(P.persona.emotions)
FACTS = {k: P.persona.fact_value(k) for k in P.persona.facts if k != "name"}
CATEGORIES = {"greetings", "how_are_you", "actions", "idle_chat", "helping", "comfort", "jokes", "farewells"}


@pytest.fixture(scope="module")
def bank(root):
    return load(root / P.templates.dir, LABELS, FACTS)


@pytest.fixture(scope="module")
def rows(bank):
    return expand(bank, P.templates.conversations, P.templates.max_turns, P.seed, P.persona.name,
                  P.persona.user_name, facts=FACTS)


def _write(folder, **files):
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / f"{name}.yaml").write_text(text, encoding="utf-8")
    return folder


def _problems(folder, labels=LABELS, facts=()):
    with pytest.raises(TemplateError) as e:
        load(folder, labels, facts)
    return str(e.value), e.value.problems


GOOD = """\
templates:
  - id: hi
    user: ["hi {name}", "hello"]
    reply:
      joy: ["Hi, {user}!", "*waves* Hello!"]
"""


# ------------------------------------------------------------------------------------------ the data

def test_templates_cover_categories_and_emotions(bank):
    assert CATEGORIES <= set(bank.categories)
    assert len(bank.templates) >= 150
    assert len(bank.emotions) >= 7
    assert any(len(t.exchanges) >= 2 for t in bank.templates)


def test_templates_never_spell_the_persona_name(root):
    for path in (root / P.templates.dir).glob("*.yaml"):
        assert P.persona.name not in path.read_text(encoding="utf-8"), path


def test_name_questions_are_answered_with_the_name(bank):
    (t,) = [t for t in bank.templates if t.id == "name"]
    assert all("{name}" in text for _, text in t.exchanges[0].replies)


# ------------------------------------------------------------------------------------------ expansion

def test_expansion_is_exact_valid_and_deterministic(bank, rows):
    assert len(rows) == P.templates.conversations
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        assert check_row(row, LABELS) == [], row
        assert row["source"] == "templates"
        assert all(m["from"] != "system" for m in row["conversations"])
        assert 1 <= len(row["emotions"]) <= P.templates.max_turns
        assert not any(re.search(r"[{}]", m["value"]) for m in row["conversations"])
    again = expand(bank, P.templates.conversations, P.templates.max_turns, P.seed, P.persona.name,
                   P.persona.user_name, facts=FACTS)
    assert json.dumps(again) == json.dumps(rows)
    other = expand(bank, P.templates.conversations, P.templates.max_turns, P.seed + 1, P.persona.name,
                   P.persona.user_name, facts=FACTS)
    assert json.dumps(other) != json.dumps(rows)


def test_every_category_and_seven_emotions_appear(rows):
    categories = Counter(c for r in rows for c in r["category"].split("+"))
    emotions = Counter(e for r in rows for e in r["emotions"])
    assert CATEGORIES <= set(categories)
    assert len(emotions) >= 7
    assert min(emotions.values()) >= 50  # no label is a rounding error


def test_chaining_respects_positions_and_categories(rows):
    assert any("+" in r["template"] for r in rows)
    for r in rows:
        cats = r["category"].split("+")
        assert len(cats) == len(set(cats)) == len(r["template"].split("+"))
        assert "greetings" not in cats[1:]
        assert "farewells" not in cats[:-1]


def test_dialogues_are_kept_whole_when_they_fit(bank, rows):
    length = {t.id: len(t.exchanges) for t in bank.templates}
    assert max(length.values()) <= P.templates.max_turns
    for r in rows:
        assert sum(length[t] for t in r["template"].split("+")) == len(r["emotions"]), r["template"]


@pytest.mark.parametrize("max_turns", [1, 2])
def test_max_turns_caps_exchanges(bank, max_turns):
    rows = expand(bank, 300, max_turns, 7, "Rosie", "friend", facts=FACTS)
    lengths = Counter(len(r["emotions"]) for r in rows)
    assert max(lengths) == max_turns


def test_action_lines_get_in_character_replies(rows):
    replies = [(conv[i]["value"], conv[i + 1]) for r in rows if "actions" in r["category"]
               for conv in [r["conversations"]] for i in range(0, len(conv), 2)
               if re.fullmatch(r"\*[^*]+\*", conv[i]["value"])]
    assert len(replies) >= 200
    assert all(reply["from"] == "gpt" and reply["value"].strip() for _, reply in replies)
    assert sum("*" in reply["value"] for _, reply in replies) > 0.6 * len(replies)  # she acts back
    assert any(action == "*pokes Rosie*" for action, _ in replies)


def test_persona_name_and_user_come_from_params(bank, rows):
    pixel = expand(bank, 500, 4, P.seed, "Pixel", "Sam", facts=FACTS)
    text = json.dumps([r["conversations"] for r in pixel])
    assert "Rosie" not in text and "Pixel" in text and "Sam" in text
    asked = [(c[i]["value"], c[i + 1]["value"]) for r in pixel if "name" in r["template"].split("+")
             for c in [r["conversations"]] for i in range(0, len(c), 2) if "name" in c[i]["value"]]
    assert asked and all("Pixel" in reply for _, reply in asked)
    assert json.dumps(pixel[:500]) != json.dumps(rows[:500])


def test_slot_is_one_value_per_conversation_and_capitalised_at_sentence_start(tmp_path):
    folder = _write(tmp_path / "t", food="""\
slots:
  food: ["a plum", "a fig", "a pear", "a lime"]
templates:
  - id: feed
    user: ["*gives {name} {food}*"]
    reply:
      joy: ["{food}! I love {food}."]
""")
    rows = expand(load(folder, LABELS), 4, 1, 0, "Rosie", "friend")
    for r in rows:
        user, reply = (m["value"] for m in r["conversations"])
        food = re.fullmatch(r"\*gives Rosie (.+)\*", user).group(1)
        assert reply == f"{food.capitalize()}! I love {food}."


def test_too_few_distinct_conversations_is_an_error(tmp_path):
    folder = _write(tmp_path / "t", tiny=GOOD)
    assert len(expand(load(folder, LABELS), 4, 1, 0, "Rosie", "friend")) == 4
    with pytest.raises(PersonaError, match="distinct conversations"):
        expand(load(folder, LABELS), 5, 1, 0, "Rosie", "friend")


# ------------------------------------------------------------------------------------------ errors

def test_unknown_emotion_names_file_line_template_and_labels(tmp_path):
    folder = _write(tmp_path / "t", chat=GOOD.replace("joy:", "joyful:"))
    message, problems = _problems(folder)
    assert len(problems) == 1
    assert f"{folder / 'chat.yaml'}:5:" in message
    assert "template 'hi'" in message and "['joyful']" in message


def test_removing_a_label_from_persona_emotions_fails_on_the_repo_templates(root):
    message, problems = _problems(root / P.templates.dir, LABELS - {"disgust"}, FACTS)
    assert problems and all("['disgust']" in p.reason for p in problems)
    assert "actions.yaml" in message and "template 'feed-gross'" in message


def test_unknown_slot_names_the_slot_and_file(tmp_path):
    folder = _write(tmp_path / "t", chat=GOOD.replace("hello", "hello, want {snak}?"))
    message, _ = _problems(folder)
    assert f"{folder / 'chat.yaml'}:3:" in message and "unknown slot(s) {snak}" in message


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    folder = _write(tmp_path / "t", ok=GOOD, broken=GOOD.replace('user: ["hi {name}", "hello"]', 'user: ["hi'))
    message, problems = _problems(folder)
    assert len(problems) == 1 and problems[0].path.endswith("broken.yaml") and problems[0].line
    assert "not valid YAML" in message


@pytest.mark.parametrize("text, needle", [
    (GOOD.replace('    user: ["hi {name}", "hello"]\n', ""), "template 'hi': missing key 'user'"),
    (GOOD.replace('["hi {name}", "hello"]', "[]"), "'user' must be a non-empty list"),
    (GOOD.replace('["Hi, {user}!", "*waves* Hello!"]', '["", "x"]'), "'joy' has an empty or non-text phrasing"),
    (GOOD.replace("reply:", "replies:"), "unknown key 'replies'"),
    (GOOD.replace("Hello!", "Hello! {oops"), "stray brace"),
    (GOOD + '      joy: ["again"]\n', "duplicate key 'joy'"),
    (GOOD + GOOD.replace("templates:\n", ""), "duplicate id"),
    ("position: middle\n" + GOOD, "position must be one of first, any, last"),
    ("slots:\n  name: [Bob]\n" + GOOD, "{name} is built in"),
    ("- just a list\n", "top level must be a mapping"),
])
def test_malformed_template_is_reported(tmp_path, text, needle):
    message, _ = _problems(_write(tmp_path / "t", chat=text))
    assert needle in message and "chat.yaml" in message


def test_all_problems_are_reported_together(tmp_path):
    folder = _write(tmp_path / "t", a=GOOD.replace("joy:", "glee:"), b=GOOD.replace("id: hi", "id: b").replace(
        "hello", "{nope}"))
    _, problems = _problems(folder)
    assert sorted(p.path.rsplit("/", 1)[1] for p in problems) == ["a.yaml", "b.yaml"]


def test_empty_folder_is_an_error(tmp_path):
    message, _ = _problems(tmp_path)
    assert "no *.yaml template files" in message


# ------------------------------------------------------------------------------------------ stage

def _stage(root):
    spec = importlib.util.spec_from_file_location("expand_templates", root / "stages" / "expand_templates.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stage_writes_validated_rows(root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = parse_params({"templates": {"dir": str(root / P.templates.dir), "conversations": 120}})
    _stage(root).main(p)
    lines = Path("data/interim/dialogues/templates.jsonl").read_text(encoding="utf-8").splitlines()
    bank = load(root / P.templates.dir, LABELS, FACTS)
    assert [json.loads(x) for x in lines] == expand(bank, 120, P.templates.max_turns, P.seed, P.persona.name,
                                                    P.persona.user_name, facts=FACTS)
    assert json.loads(Path("reports/validation/templates.json").read_text())["success"] is True


def test_stage_reports_bad_templates_in_one_line_and_writes_nothing(root, tmp_path):
    _write(tmp_path / "tpl", chat=GOOD.replace("joy:", "joyful:"))
    (tmp_path / "params.yaml").write_text("templates:\n  dir: tpl\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, str(root / "stages" / "expand_templates.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "error: 1 problem(s)" in proc.stderr and "tpl/chat.yaml:5:" in proc.stderr
    assert not (tmp_path / "data").exists()
