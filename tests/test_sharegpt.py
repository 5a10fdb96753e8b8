"""The ShareGPT format: reading the three file shapes, importing other tools' dialects, `sharegpt-check`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from persona_lm.data.messages import Message, conversations
from persona_lm.data.sharegpt import check_file, check_row, import_conversation, iter_file, read_sharegpt
from persona_lm.errors import InputError

CLI = str(Path(sys.executable).parent / "persona-lm")


def conv(*turns: tuple[str, str]) -> dict:
    return {"conversations": [{"from": r, "value": v} for r, v in turns]}


HELLO = conv(("human", "hi"), ("gpt", "hello!"))


def test_iter_file_reads_jsonl_array_and_single_object_with_real_line_numbers(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps(HELLO) + "\n\n" + json.dumps(HELLO) + "\n")
    assert [line for line, _ in iter_file(jsonl)] == [1, 3]

    array = tmp_path / "b.json"
    array.write_text(json.dumps([HELLO, HELLO, HELLO], indent=2))
    lines = [line for line, obj in iter_file(array)]
    text = array.read_text().splitlines()
    assert len(lines) == 3 and lines[0] == 2
    assert all(text[n - 1].strip() == "{" for n in lines)

    single = tmp_path / "c.json"
    single.write_text("\n" + json.dumps(HELLO, indent=2))
    assert [(line, obj) for line, obj in iter_file(single)] == [(2, HELLO)]


def test_iter_file_detects_json_lines_named_json(tmp_path):
    f = tmp_path / "download.json"
    f.write_text(json.dumps(HELLO) + "\n" + json.dumps(HELLO) + "\n")
    assert [obj for _, obj in iter_file(f)] == [HELLO, HELLO]


def test_broken_json_line_is_yielded_but_broken_array_is_raised_with_its_line(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps(HELLO) + '\n{"conversations": [\n')
    items = list(iter_file(jsonl))
    assert isinstance(items[1][1], InputError) and items[1][0] == 2

    array = tmp_path / "b.json"
    array.write_text('[\n  {"conversations": []},\n  {"conversations": [}\n]')
    with pytest.raises(InputError, match=r"b\.json:3: invalid JSON"):
        list(iter_file(array))


def test_import_maps_role_aliases_and_drops_extra_keys():
    notes = Counter()
    obj = {"id": "x", "conversations": [
        {"from": "system", "value": "be nice"},
        {"from": "user", "value": "hi", "markdown": None},
        {"from": "assistant", "value": "hello", "markdown": {"type": "md"}},
        {"from": "Human", "value": "and you?"},
        {"from": "chatgpt", "value": "fine"},
        {"from": "human", "value": "bing?"},
        {"from": "bing", "value": "yes"},
        {"from": "human", "value": "bard?"},
        {"from": "bard", "value": "yes"},
    ]}
    out = import_conversation(obj, notes)
    assert [m["from"] for m in out] == ["system"] + ["human", "gpt"] * 4
    assert all(set(m) == {"from", "value"} for m in out)
    assert notes == Counter({"role user -> human": 1, "role assistant -> gpt": 1, "role Human -> human": 1,
                             "role chatgpt -> gpt": 1, "role bing -> gpt": 1, "role bard -> gpt": 1})
    assert check_row({"conversations": out}) == []


def test_import_reads_openai_messages():
    obj = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}
    assert import_conversation(obj) == [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hey"}]


@pytest.mark.parametrize("lead", [[], [("system", "sys")]])
def test_import_drops_a_leading_gpt_turn_and_counts_it(lead):
    notes = Counter()
    out = import_conversation(conv(*lead, ("gpt", "Hi! How can I help?"), ("human", "hi"), ("gpt", "hello")), notes)
    assert [m["from"] for m in out] == [r for r, _ in lead] + ["human", "gpt"]
    assert notes["leading gpt turn dropped"] == 1


@pytest.mark.parametrize("obj, reason", [
    (conv(("human", "hi"), ("bot", "hello")), "unknown role 'bot'"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"value": "hello"}]}, "unknown role None"),
    (conv(("human", "hi"), ("gpt", "")), "empty value"),
    (conv(("human", "   "), ("gpt", "hello")), "empty value"),
    ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
     "value is a JSON number, not text"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, "value is a JSON array, not text"),
    ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}, "a turn without 'value' or 'content'"),
    (conv(("gpt", "hello")), "no human turn"),
    (conv(("system", "s"), ("gpt", "hello")), "no human turn"),
    (conv(("human", "hi"), ("gpt", "ok"), ("system", "late")), "a system turn may only come first"),
    (conv(("human", "anyone?")), "no gpt turn"),
    ({"conversations": []}, "'conversations' is an empty list"),
    ({"id": 1, "text": "hi"}, "no 'conversations' list (nor 'messages' or 'conversation')"),
    ({"conversation": "human: hi"}, "'conversation' is a JSON string, not a list of turns"),
    (["not", "an", "object"], "a turn is a JSON string, not an object"),
    ([], "an empty list of turns"),
    ("hi", "not a conversation but a JSON string"),
])
def test_import_refuses_unusable_conversations_with_a_reason(obj, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        import_conversation(obj)


def run_check(*files) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, "sharegpt-check", *map(str, files)], capture_output=True, text=True, timeout=60)


def test_cli_accepts_a_valid_file(tmp_path):
    f = tmp_path / "good.jsonl"
    row = {"id": "a", "source": "extra", "emotions": ["joy"], **conv(("system", "s"), ("human", "hi"), ("gpt", "hi!"))}
    f.write_text(json.dumps(row) + "\n" + json.dumps(HELLO) + "\n")
    res = run_check(f)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{f}: ok" in res.stdout


def test_cli_reports_each_row_the_pipeline_would_skip_and_exits_1(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps([HELLO], indent=1))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([
        json.dumps(HELLO),
        json.dumps(conv(("user", "hi"), ("assistant", "hello"))),
        json.dumps(conv(("human", "hi"), ("gpt", " "))),
        '{"conversations": [{"from": "human"',
        json.dumps({"conversations": [{"from": "human", "value": "hi", "markdown": "x"},
                                      {"from": "gpt", "value": "y"}]}),
        json.dumps(conv(("human", "hi"), ("bot", "beep"))),
    ]) + "\n")
    res = run_check(good, bad, tmp_path / "missing.jsonl")
    assert res.returncode == 1
    out = res.stdout
    assert f"{good}: ok: 1 conversation (" in out
    for accepted in (1, 2, 5):  # other tools' role names and extra keys are what the pipeline imports
        assert f"{bad}:{accepted}:" not in out
    assert f"{bad}:3: empty value" in out
    assert f"{bad}:4: invalid JSON" in out
    assert f"{bad}:6: unknown role 'bot'" in out
    assert f"{bad}: 3 of 6 rows usable" in out and "role user -> human (1)" in out
    assert f"{tmp_path / 'missing.jsonl'}: file not found" in out


def test_check_file_cites_the_line_of_a_bad_item_in_a_json_array(tmp_path):
    f = tmp_path / "arr.json"
    f.write_text(json.dumps([HELLO, conv(("human", "hi"), ("gpt", "ok"), ("robot", "again"))], indent=2))
    line = next(n for n, obj in iter_file(f) if len(obj["conversations"]) == 3)
    assert check_file(f) == [f"{f}:{line}: unknown role 'robot'"]


@pytest.mark.parametrize("content, reason", [
    (b"", "no ShareGPT conversations"),
    (b"\x00\x01\x02garbage\xff" * 20, "binary data"),
    (b'{"conversations": [{"from": "human", "value": "caf\xe9"}]}\n', "not valid UTF-8"),
    (b"[]", "no ShareGPT conversations"),
])
def test_check_file_reports_unreadable_files(tmp_path, content, reason):
    f = tmp_path / "x.json"
    f.write_bytes(content)
    report = check_file(f)
    assert len(report) == 1 and report[0].startswith(str(f)) and reason in report[0]


# ------------------------------------------------------------------------------ files from the wild, one reader

TWO = [[("human", "Is it going to rain?"), ("gpt", "Probably after six.")],
       [("system", "Be brief."), ("human", "Tea or coffee?"), ("gpt", "Tea."), ("human", "Why?"), ("gpt", "Calmer.")]]
SHAREGPT = [conv(*turns) for turns in TWO]
BARE = [c["conversations"] for c in SHAREGPT]
OPENAI = [{"messages": [{"role": {"human": "user", "gpt": "assistant"}.get(r, r), "content": v} for r, v in turns]}
          for turns in TWO]
SINGULAR = [{"conversation": c["conversations"]} for c in SHAREGPT]


def jsonl(items) -> str:
    return "".join(json.dumps(x) + "\n" for x in items)


def turns_of(path) -> list[list[tuple[str, str]]]:
    return [[(m["from"], m["value"]) for m in c.turns] for c in read_sharegpt(path).conversations]


@pytest.mark.parametrize("name, text", [
    ("rows.jsonl", jsonl(SHAREGPT)),
    ("rows-named.json", jsonl(SHAREGPT)),
    ("array.json", json.dumps(SHAREGPT, indent=4)),
    ("array-named.jsonl", json.dumps(SHAREGPT, indent=2)),
    ("one-line-array.jsonl", json.dumps(SHAREGPT)),
    ("list-of-lists.json", json.dumps(BARE, indent=2)),
    ("lists.jsonl", jsonl(BARE)),
    ("openai.jsonl", jsonl(OPENAI)),
    ("openai-array.json", json.dumps(OPENAI, indent=2)),
    ("singular-key.json", json.dumps(SINGULAR, indent=1)),
])
def test_every_layout_gives_the_same_conversations_at_their_real_lines(tmp_path, name, text):
    f = tmp_path / name
    f.write_text(text)
    assert turns_of(f) == TWO
    lines = text.splitlines()
    for c in read_sharegpt(f).conversations:
        assert lines[c.line - 1].lstrip()[0] in "{["
    assert check_file(f) == []


@pytest.mark.parametrize("name, text", [
    ("object.json", json.dumps(SHAREGPT[1], indent=2)),
    ("turns.json", json.dumps(BARE[1], indent=2)),
    ("one-bare-list.jsonl", json.dumps(BARE[1]) + "\n"),
])
def test_one_json_value_is_one_conversation(tmp_path, name, text):
    f = tmp_path / name
    f.write_text(text)
    assert turns_of(f) == [TWO[1]]


@pytest.mark.parametrize("keys", [("from", "value"), ("role", "content")])
@pytest.mark.parametrize("system, human, gpt", [
    ("system", "human", "gpt"), ("SYSTEM", "HUMAN", "GPT"), ("System", "User", "Assistant"),
    ("system", "user", "ChatGPT"), ("system", "Human", "BARD"), ("system", "human", "Bing"),
    ("system", "USER", "model"), ("system", " user ", "assistant"),
])
def test_role_names_of_the_common_tools_in_any_case(system, human, gpt, keys):
    who, what = keys
    notes = Counter()
    out = import_conversation({"id": "x", "conversations": [
        {who: system, what: "s"}, {who: human, what: "hi"}, {who: gpt, what: "hey"}]}, notes)
    assert out == [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hey"}]
    renamed = {f"role {s} -> {r}" for s, r in ((system, "system"), (human, "human"), (gpt, "gpt")) if s != r}
    assert set(notes) == renamed


def test_extra_keys_of_rows_and_turns_are_ignored_and_the_row_id_kept(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text(jsonl([{"id": "r1", "model": "gpt-4", "lang": "en", "conversations": [
        {"from": "human", "value": "hi", "markdown": None, "weight": 0},
        {"from": "gpt", "value": "hello", "markdown": {"type": "md"}, "weight": 1}]}]))
    (c,) = read_sharegpt(f).conversations
    assert c.turns == [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    assert c.original_id == "r1"


def test_consecutive_turns_of_one_side_are_joined_as_the_messages_importer_joins_them():
    said = [("Ana", "hey"), ("Ana", "you there?"), ("Me", "yes"), ("Me", "what's up"), ("Ana", "nothing"),
            ("Ana", "just bored"), ("Ana", "ok bye"), ("Me", "bye!")]
    notes = Counter()
    out = import_conversation([{"from": "gpt" if who == "Me" else "human", "value": text} for who, text in said],
                              notes)
    assert [(m["from"], m["value"]) for m in out] == [
        ("human", "hey\nyou there?"), ("gpt", "yes\nwhat's up"), ("human", "nothing\njust bored\nok bye"),
        ("gpt", "bye!")]
    assert notes == Counter({"consecutive human turns joined": 3, "consecutive gpt turns joined": 1})

    t0 = datetime(2024, 5, 1, 12, 0)
    chat = [Message(t0 + timedelta(minutes=i), who, text) for i, (who, text) in enumerate(said)]
    assert [(m["from"], m["value"]) for m in out] == conversations(chat, "Me", gap_minutes=60, min_turns=2)[0]


def test_a_conversation_opened_by_the_assistant_keeps_its_system_prompt():
    notes = Counter()
    out = import_conversation({"messages": [
        {"role": "system", "content": "You are kind."}, {"role": "assistant", "content": "Hi!"},
        {"role": "assistant", "content": "How can I help?"}, {"role": "user", "content": "A joke?"},
        {"role": "assistant", "content": "Knock knock."}]}, notes)
    assert [(m["from"], m["value"]) for m in out] == [
        ("system", "You are kind."), ("human", "A joke?"), ("gpt", "Knock knock.")]
    assert notes["consecutive gpt turns joined"] == 1 and notes["leading gpt turn dropped"] == 1


def test_emotion_labels_are_kept_only_while_they_fit_the_gpt_turns(tmp_path):
    f = tmp_path / "ours.jsonl"
    f.write_text(jsonl([
        {**conv(("human", "hi"), ("gpt", "hey")), "emotions": ["joy"]},
        {**conv(("human", "hi"), ("gpt", "hey"), ("gpt", "anyone?")), "emotions": ["joy", "sadness"]},
        {**conv(("human", "hi"), ("gpt", "grr")), "emotions": ["rage"]},
    ]))
    got = read_sharegpt(f, labels={"joy", "sadness"})
    assert [c.emotions for c in got.conversations] == [["joy"], None, None]
    assert got.notes["emotions dropped: not one label per gpt turn"] == 1
    assert got.notes["emotions dropped: unknown label"] == 1


def test_a_file_of_which_nothing_is_usable_fails_once_naming_its_layout(tmp_path):
    f = tmp_path / "bots.json"
    f.write_text(json.dumps([[{"from": "human", "value": "hi"}, {"from": "bot", "value": "beep"}]] * 3, indent=2))
    with pytest.raises(InputError) as e:
        read_sharegpt(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}: a JSON array of 3 items, each a list of objects with keys from/value: "
                          "no conversation could be read: unknown role 'bot' (3 rows, first at line 2)")
    assert check_file(f) == [msg]

    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(jsonl([{"instruction": "Add 2 and 2.", "output": "4"}] * 2))
    (line,) = check_file(alpaca)
    assert line.startswith(f"{alpaca}: JSON lines, 2 rows, each an object with keys instruction/output: ")
    assert "no 'conversations' list" in line


def test_sharegpt_case_list_of_lists(shared_cases):
    f = shared_cases / "exports" / "10-sharegpt-list-of-lists.json"
    if not f.is_file():
        pytest.skip(f"{f} not found")
    inner_lists = json.loads(f.read_text())
    assert turns_of(f) == [[(m["from"], m["value"]) for m in turns] for turns in inner_lists]
    assert check_file(f) == []


def test_sharegpt_case_array_named_jsonl_and_the_check_agrees(shared_cases):
    f = shared_cases / "exports" / "11-sharegpt-array-named-jsonl.jsonl"
    if not f.is_file():
        pytest.skip(f"{f} not found")
    got = read_sharegpt(f)
    assert [c.original_id for c in got.conversations] == ["qa-001", "qa-002"]
    assert got.refused == [] and check_file(f) == []
    res = run_check(f)
    assert res.returncode == 0 and res.stdout == f"{f}: ok: 2 conversations ({got.layout})\n"
