"""The ShareGPT format: reading the three file shapes, importing other tools' dialects, `sharegpt-check`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from persona_lm.data.sharegpt import check_file, check_row, import_conversation, iter_file
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
