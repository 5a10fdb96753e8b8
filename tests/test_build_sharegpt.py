"""build_sharegpt: merging sources, mix weights, dedup, the leak-free split, emotion datasets, the stage."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from persona_lm.data.build import build, read_extra, write_split
from persona_lm.data.emotion_datasets import (
    DAILYDIALOG_TO_PERSONA, GOEMOTIONS_LABELS, GOEMOTIONS_TO_PERSONA, MASK_NAMES, PROMPTS, clean_dailydialog,
    fill_name_masks, read_dailydialog, read_goemotions,
)
from persona_lm.data.sharegpt import check_file, check_row, conversation_key, iter_file, make_row
from persona_lm.errors import InputError, ParamsError, PersonaError, Skips
from persona_lm.params import Persona, parse_params

CLI = str(Path(sys.executable).parent / "persona-lm")
LABELS = set(Persona().emotions)


def qa(i: int, source: str = "templates", label: str | None = "joy") -> dict:
    return make_row(source, [("human", f"question {i}?"), ("gpt", f"answer {i}.")], [label])


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def params(**sections):
    return parse_params(sections)


def keys(rows):
    return [conversation_key(r["conversations"]) for r in rows]


@pytest.fixture
def twenty(tmp_path) -> Path:
    """A dialogues folder with 20 template conversations and nothing else."""
    write_rows(tmp_path / "dialogues" / "templates.jsonl", [qa(i) for i in range(20)])
    return tmp_path / "dialogues"


def run(dialogues: Path, weight: float, seed: int = 1337, val_fraction: float = 0.1):
    train, val, metrics = build(params(seed=seed, sharegpt={"weights": {"templates": weight},
                                                            "val_fraction": val_fraction}), dialogues)
    return train + val, metrics


@pytest.mark.parametrize("weight, expected", [(0, 0), (1, 20), (2, 40), (0.5, 10), (1.5, 30), (0.25, 5)])
def test_weight_sets_the_number_of_rows(twenty, weight, expected):
    if weight == 0:
        with pytest.raises(PersonaError, match="no conversations"):
            run(twenty, weight)
        return
    rows, metrics = run(twenty, weight)
    assert len(rows) == expected
    assert metrics["sources"]["templates"] == {"rows_in": 20, "rows_kept": 20, "rows_out": expected}
    assert len({r["id"] for r in rows}) == len(rows)
    copies = Counter(keys(rows))
    assert set(copies.values()) <= {int(weight), int(weight) + 1} - {0}


def test_weight_zero_drops_one_source_and_keeps_the_others(twenty):
    write_rows(twenty / "messages.jsonl", [qa(i, "messages") for i in range(100, 105)])
    train, val, metrics = build(params(sharegpt={"weights": {"templates": 0}}), twenty)
    assert {r["source"] for r in train + val} == {"messages"}
    assert metrics["sources"]["templates"]["rows_out"] == 0 and metrics["sources"]["messages"]["rows_out"] == 5


def test_two_doubles_every_row(twenty):
    rows, _ = run(twenty, 2)
    assert Counter(keys(rows)) == Counter({k: 2 for k in keys([qa(i) for i in range(20)])})


def test_fractional_weight_is_a_deterministic_seeded_subset_independent_of_input_order(twenty):
    half = set(keys(run(twenty, 0.5)[0]))
    assert half == set(keys(run(twenty, 0.5)[0]))
    write_rows(twenty / "templates.jsonl", [qa(i) for i in reversed(range(20))])
    assert half == set(keys(run(twenty, 0.5)[0]))
    assert half != set(keys(run(twenty, 0.5, seed=7)[0]))
    assert half < set(keys(run(twenty, 0.75)[0]))


def test_dedup_across_sources_keeps_the_first_source(tmp_path):
    d = tmp_path / "dialogues"
    write_rows(d / "templates.jsonl", [qa(1), qa(2)])
    same_as_1 = make_row("messages", [("human", "  QUESTION 1? "), ("gpt", "Answer   1.")])
    write_rows(d / "messages.jsonl", [same_as_1, qa(3, "messages")])
    extra = write_rows(tmp_path / "extra.jsonl", [{"conversations": qa(2)["conversations"]},
                                                   {"conversations": qa(4)["conversations"]}])
    train, val, metrics = build(params(sharegpt={"extra": [str(extra)]}), d)
    rows = train + val
    assert len(rows) == 4 and len(set(keys(rows))) == 4
    by_key = {conversation_key(r["conversations"]): r["source"] for r in rows}
    assert by_key[conversation_key(qa(1)["conversations"])] == "templates"
    assert by_key[conversation_key(qa(2)["conversations"])] == "templates"
    assert metrics["skips"] == {"extra: duplicate conversation": 1, "messages: duplicate conversation": 1}
    assert metrics["sources"]["messages"] == {"rows_in": 2, "rows_kept": 1, "rows_out": 1}


def test_split_is_by_conversation_and_copies_land_on_the_same_side(tmp_path):
    d = tmp_path / "dialogues"
    write_rows(d / "templates.jsonl", [qa(i) for i in range(400)])
    train, val, metrics = build(params(sharegpt={"weights": {"templates": 2}, "val_fraction": 0.2}), d)
    assert not set(keys(train)) & set(keys(val))
    assert all(n == 2 for n in Counter(keys(train)).values()) and all(n == 2 for n in Counter(keys(val)).values())
    assert 0.12 < len(val) / 800 < 0.28
    assert metrics["train"]["rows"] == len(train) and metrics["val"]["rows"] == len(val)
    # a conversation keeps its side when other data is added or the seed changes
    write_rows(d / "messages.jsonl", [qa(i, "messages") for i in range(400, 600)])
    train2, val2, _ = build(params(seed=99, sharegpt={"val_fraction": 0.2}), d)
    assert set(keys(val)) <= set(keys(val2)) and set(keys(train)) <= set(keys(train2))


def test_tiny_inputs_still_get_a_val_row(tmp_path):
    write_rows(tmp_path / "templates.jsonl", [qa(1), qa(2)])
    train, val, _ = build(params(sharegpt={"val_fraction": 0.01}), tmp_path)
    assert len(train) == 1 and len(val) == 1


def test_build_is_deterministic_and_writes_the_split_atomically(tmp_path, twenty):
    write_rows(twenty / "messages.jsonl", [qa(i, "messages", None) for i in range(50, 80)])
    p = params(sharegpt={"weights": {"messages": 1.5}})
    first, second = build(p, twenty), build(p, twenty)
    assert json.dumps(first) == json.dumps(second)
    out = tmp_path / "processed" / "sharegpt"
    write_split(out, first[0], first[1])
    (out / "stale.txt").write_text("from an older run")
    write_split(out, second[0], second[1])
    assert sorted(f.name for f in out.parent.iterdir()) == ["sharegpt"]
    assert sorted(f.name for f in out.iterdir()) == ["train.jsonl", "val.jsonl"]
    assert [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()] == first[0]


def test_bad_rows_of_a_dialogue_file_are_counted_skips(tmp_path):
    d = tmp_path / "dialogues"
    unknown_label = qa(2, label="ecstasy")
    extra_key = qa(3)
    extra_key["conversations"][0]["markdown"] = "x"
    lines = [json.dumps(qa(1)), json.dumps(unknown_label), "{broken", json.dumps(extra_key)]
    d.mkdir()
    (d / "templates.jsonl").write_text("\n".join(lines) + "\n")
    (d / "transcripts.jsonl").write_text("")
    train, val, metrics = build(params(), d)
    assert len(train + val) == 1
    assert metrics["skipped"] == 3
    assert metrics["skips"]["templates: unknown emotion labels ['ecstasy']"] == 1
    assert any(k.startswith("invalid JSON line") for k in metrics["skips"])
    assert metrics["sources"]["transcripts"]["rows_in"] == 0


def test_extra_import_maps_aliases_refuses_bad_conversations_and_counts_everything(tmp_path):
    f = tmp_path / "dl.jsonl"
    f.write_text("\n".join([
        json.dumps({"id": "a", "conversations": [{"from": "user", "value": "hi"},
                                                 {"from": "assistant", "value": "hey", "markdown": {}}]}),
        json.dumps({"id": "b", "conversations": [{"from": "gpt", "value": "Welcome!"}, {"from": "human", "value": "yo"},
                                                 {"from": "gpt", "value": "yo!"}]}),
        json.dumps({"id": "c", "conversations": [{"from": "human", "value": "hi"},
                                                 {"from": "robot", "value": "beep"}]}),
        json.dumps({"id": "d", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]}),
        '{"id": "e", "conversations": [',
        json.dumps({"id": 6, "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}],
                    "emotions": ["love"]}),
    ]) + "\n")
    train, val, m = build(params(sharegpt={"extra": [str(f)]}), tmp_path / "none")
    rows = sorted(train + val, key=lambda r: r["origin"])
    assert [r["original_id"] for r in rows] == ["a", "b", "6"]
    assert [r["origin"] for r in rows] == [f"{f}:1", f"{f}:2", f"{f}:6"]
    assert all(check_row(r, LABELS) == [] and r["source"] == "extra" for r in rows)
    assert [r["emotions"] for r in rows] == [[None], [None], ["love"]]
    assert m["import_notes"] == {"leading gpt turn dropped": 1, "role assistant -> gpt": 1, "role user -> human": 1}
    assert m["skips"]["extra: unknown role 'robot'"] == 1
    assert m["skips"]["extra: empty value"] == 1
    assert any(k.startswith("extra: invalid JSON") for k in m["skips"])


@pytest.mark.parametrize("content, match", [
    (b"", r"empty\.json: no ShareGPT conversations"),
    (b"\n\n  \n", r"empty\.json: no ShareGPT conversations"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), r"empty\.json: binary data"),
    (b'{"conversations": []}\n{"conversations": [{"from": "human", "value": "na\xefve"}]}\n',
     r"empty\.json:2: not valid UTF-8"),
    (b'[\n {"conversations": []},\n {"conversations": [\n]', r"empty\.json:4: invalid JSON"),
    (b"{not json at all\nnor this\n", r"empty\.json:1: invalid JSON"),
])
def test_unreadable_extra_files_are_clear_errors(tmp_path, content, match):
    f = tmp_path / "empty.json"
    f.write_bytes(content)
    with pytest.raises(InputError, match=match):
        read_extra(f, LABELS, Skips("x"), Counter())


def test_missing_inputs_name_the_param_key(tmp_path):
    f = write_rows(tmp_path / "ok.jsonl", [qa(1)])
    with pytest.raises(ParamsError, match=r"sharegpt\.extra\[1\]: file not found: .*nope\.json"):
        build(params(sharegpt={"extra": [str(f), str(tmp_path / "nope.json")]}), tmp_path)
    with pytest.raises(ParamsError, match=r"emotion\.datasets\[0\]\.path: file not found"):
        build(params(emotion={"datasets": [{"kind": "goemotions", "path": str(tmp_path / "x.tsv")}]}), tmp_path)


def test_overlong_turns_are_skipped(tmp_path):
    long = make_row("templates", [("human", "tell me everything"), ("gpt", "word " * 50)])
    write_rows(tmp_path / "templates.jsonl", [qa(1), long, qa(2)])
    train, val, m = build(params(sharegpt={"max_value_chars": 100}), tmp_path)
    assert len(train + val) == 2 and m["skips"] == {"templates: a turn is longer than sharegpt.max_value_chars": 1}




def turn(role: str, value: str) -> dict:
    return {"from": role, "value": value}


def wild_files(d: Path) -> list[Path]:
    """ShareGPT files as downloaded: good, partly bad, of other layouts, and of which nothing is usable."""
    d.mkdir(parents=True, exist_ok=True)
    files = {
        "mixed.jsonl": "".join(x + "\n" for x in [
            json.dumps({"conversations": [turn("human", "a?"), turn("gpt", "a.")]}),
            '{"conversations": [',
            json.dumps({"messages": [{"role": "User", "content": "b?"}, {"role": "user", "content": "b!"},
                                     {"role": "assistant", "content": "b."}]}),
            json.dumps({"conversations": [turn("human", "c?"), turn("robot", "c.")]}),
            json.dumps({"conversation": [turn("gpt", "hi"), turn("human", "d?"), turn("gpt", "d.")]}),
            json.dumps({"text": "e"}),
        ]),
        "array.json": json.dumps([{"id": i, "conversations": [turn("human", f"f{i}?"), turn("gpt", "f." * (i != 1))]}
                                  for i in range(3)], indent=2),
        "lists.jsonl": json.dumps([turn("human", "g?"), turn("gpt", "g.")]) + "\n\n" + json.dumps([turn("gpt", "h")]),
        "bots.json": json.dumps([[turn("human", "i?"), turn("bot", "i.")]] * 2, indent=2),
        "empty.json": "",
    }
    for name, text in files.items():
        (d / name).write_text(text)
    return [d / name for name in files]


def assert_check_agrees_with_the_build(f: Path) -> None:
    """sharegpt-check refuses exactly the rows read_extra skips, for the same reasons, and fails the same files."""
    report = check_file(f, LABELS)
    skips = Skips("conversation")
    try:
        rows = read_extra(f, LABELS, skips, Counter())
    except InputError as e:
        assert report == [str(e)] and skips.total == 0
        return
    kept = {int(r["origin"].rsplit(":", 1)[1]) for r in rows}
    refused = {int(line.removeprefix(f"{f}:").split(":")[0]) for line in report}
    assert not kept & refused
    assert kept | refused == {line for line, _ in iter_file(f)}
    assert skips.as_dict() == dict(Counter("extra: " + line.split(": ", 1)[1] for line in report))


def test_extra_files_and_sharegpt_check_agree_row_by_row(tmp_path):
    files = wild_files(tmp_path)
    for f in files:
        assert_check_agrees_with_the_build(f)
    assert [len(check_file(f)) for f in files] == [3, 1, 1, 1, 1]


def test_sharegpt_cases_and_sharegpt_check_agree_row_by_row(shared_cases):
    for f in sorted((shared_cases / "exports").glob("*sharegpt*")):
        assert_check_agrees_with_the_build(f)
        assert len(read_extra(f, LABELS, Skips("x"), Counter())) == 2


def test_fixes_of_extra_files_are_counted_in_the_build_report(tmp_path):
    f = tmp_path / "texts.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [
        {"messages": [{"role": "system", "content": "Be kind."}, {"role": "assistant", "content": "Hi!"},
                      {"role": "user", "content": "hey"}, {"role": "user", "content": "you up?"},
                      {"role": "assistant", "content": "yes"}]},
        [turn("human", "lunch?"), turn("gpt", "sure"), turn("gpt", "where?")],
    ]))
    train, val, m = build(params(sharegpt={"extra": [str(f)]}), tmp_path / "none")
    assert sorted([(t["from"], t["value"]) for t in r["conversations"]] for r in train + val) == [
        [("human", "lunch?"), ("gpt", "sure\nwhere?")],
        [("system", "Be kind."), ("human", "hey\nyou up?"), ("gpt", "yes")],
    ]
    assert m["import_notes"] == {"consecutive gpt turns joined": 1, "consecutive human turns joined": 1,
                                 "leading gpt turn dropped": 1, "role assistant -> gpt": 2, "role user -> human": 2}
    assert m["skipped"] == 0


# ------------------------------------------------------------------------------------------ emotion data

def test_mapping_tables_cover_every_source_label_and_land_in_the_default_set():
    assert set(GOEMOTIONS_TO_PERSONA) == set(GOEMOTIONS_LABELS) and len(GOEMOTIONS_LABELS) == 28
    assert set(GOEMOTIONS_TO_PERSONA.values()) == LABELS
    assert set(DAILYDIALOG_TO_PERSONA) == set(range(7)) and set(DAILYDIALOG_TO_PERSONA.values()) <= LABELS


def test_goemotions_takes_the_first_mappable_label(tmp_path):
    tsv = tmp_path / "g.tsv"
    tsv.write_text("So what happens next?\t7,27\tid1\nWow, I did not see that coming\t26,17\tid2\n"
                   "Just wondering why\t7\tid3\nI'm a [RELIGION] too\t0\tid4\nbroken line\n\t27\tid6\n")
    skips = Skips("x")
    rows = read_goemotions(tsv, LABELS - {"curiosity"}, skips)
    assert [r["emotions"] for r in rows] == [["neutral"], ["surprise"]]
    assert skips.as_dict() == {
        "goemotions: [RELIGION] anonymisation mask in text": 1,
        "goemotions: empty text": 1,
        "goemotions: label maps to 'curiosity', not in persona.emotions": 1,
        "goemotions: malformed line (expected text, label ids, comment id)": 1,
    }
    assert rows[0]["conversations"][1]["value"] == "So what happens next?"
    assert rows[0]["conversations"][0]["value"] in PROMPTS and rows[0]["origin"] == f"{tsv}:1"


def test_goemotions_real_file(shared_data):
    skips = Skips("x")
    rows = read_goemotions(shared_data / "emotion/goemotions/dev.tsv", LABELS, skips)
    labels = Counter(r["emotions"][0] for r in rows)
    assert 4000 < len(rows) <= 5426 and set(labels) == LABELS
    assert labels.most_common(2)[0][0] in {"neutral", "joy"} and labels["neutral"] > 0.2 * len(rows)
    assert all(check_row(r, LABELS) == [] and len(r["conversations"]) == 2 for r in rows)
    assert Counter(r["conversations"][0]["value"] for r in rows).keys() == set(PROMPTS)
    assert set(skips.as_dict()) == {"goemotions: [RELIGION] anonymisation mask in text"}
    masked = [line.split("\t")[0] for line in (shared_data / "emotion/goemotions/dev.tsv").read_text().splitlines()
              if "[NAME]" in line and "[RELIGION]" not in line]
    replies = {r["conversations"][1]["value"] for r in rows}
    assert len(masked) > 0.1 * len(rows) and not any("[NAME]" in t for t in replies)
    assert sum(fill_name_masks(" ".join(t.split())) in replies for t in masked) == len(masked)


def test_goemotions_name_masks_become_names_deterministically(tmp_path):
    tsv = tmp_path / "g.tsv"
    tsv.write_text("[NAME] is great\t0\tid1\nTell [NAME] and [NAME] I said hi\t0\tid2\n")
    rows = read_goemotions(tsv, LABELS, Skips("x"))
    first, second = (r["conversations"][1]["value"] for r in rows)
    assert first.endswith(" is great") and first.split()[0] in MASK_NAMES
    names = re.fullmatch(r"Tell (\w+) and (\w+) I said hi", second).groups()
    assert set(names) <= set(MASK_NAMES)
    assert [r["conversations"] for r in read_goemotions(tsv, LABELS, Skips("x"))] == [r["conversations"] for r in rows]
    assert len({fill_name_masks(f"[NAME] number {i}").split()[0] for i in range(200)}) > len(MASK_NAMES) // 2


def test_dailydialog_real_files(shared_data):
    skips = Skips("x")
    val = read_dailydialog(shared_data / "emotion/dailydialog/validation/dialogues_validation.txt", LABELS, skips)
    train = read_dailydialog(shared_data / "emotion/dailydialog/train/dialogues_train.txt.gz", LABELS, skips,
                             max_rows=300)
    assert len(val) == 1000 and len(train) == 300 and skips.total == 0
    labels = Counter(e for r in val for e in r["emotions"])
    assert set(labels) <= LABELS and labels.most_common(1)[0][0] == "neutral" and labels.most_common(2)[1][0] == "joy"
    for r in val + train:
        assert check_row(r, LABELS) == []
        roles = [m["from"] for m in r["conversations"]]
        assert roles == ["human", "gpt"] * (len(roles) // 2)
        for m in r["conversations"]:
            assert not any(t in m["value"] for t in (" ,", " .", " ?", " !", " ’ ", "n ' t", "__eou__"))


def test_dailydialog_labels_outside_the_set_are_left_unlabelled_and_counted(tmp_path):
    (tmp_path / "dialogues_x.txt").write_text("Hi . __eou__ Ugh , gross ! __eou__ What ? __eou__\n"
                                              "One . __eou__\n")
    (tmp_path / "dialogues_emotion_x.txt").write_text("0 2 0\n0\n")
    skips = Skips("x")
    rows = read_dailydialog(tmp_path / "dialogues_x.txt", LABELS - {"disgust"}, skips)
    assert len(rows) == 1
    assert rows[0]["conversations"] == [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Ugh, gross!"}]
    assert rows[0]["emotions"] == [None]
    assert skips.as_dict() == {"dailydialog: fewer than two utterances": 1,
                               "dailydialog: reply label 'disgust' not in persona.emotions (left unlabelled)": 1}


def test_dailydialog_needs_its_label_file(tmp_path):
    with gzip.open(tmp_path / "dialogues_train.txt.gz", "wt") as f:
        f.write("Hi . __eou__ Hello . __eou__\n")
    with pytest.raises(InputError, match="dialogues_emotion_train.txt beside it"):
        read_dailydialog(tmp_path / "dialogues_train.txt.gz", LABELS, Skips("x"))
    (tmp_path / "dialogues_emotion_train.txt").write_text("0 4\n0 0\n")
    with pytest.raises(InputError, match="1 dialogues but 2 label lines"):
        read_dailydialog(tmp_path / "dialogues_train.txt.gz", LABELS, Skips("x"))


@pytest.mark.parametrize("raw, clean", [
    ("Say , Jim , how about a few beers after dinner ?", "Say, Jim, how about a few beers after dinner?"),
    ("Good.Let ' s go now .", "Good. Let's go now."),
    ("It ’ s $ 5 ( tax included ) , isn ’ t it ?", "It's $5 (tax included), isn't it?"),
    ('He said " no way " .', 'He said "no way".'),
    ("I ’ m ... I ’ m scared .", "I'm... I'm scared."),
    ("Hello , ma ’ am . It is 9 o ’ clock , Mr . O ’ Neil .", "Hello, ma'am. It is 9 o'clock, Mr. O'Neil."),
    ("It ' s five minutes ' walk .", "It's five minutes' walk."),
    ("Fill in the ' Monthly Report ' , please .", "Fill in the 'Monthly Report', please."),
    ("We call it ‘ Sleeping Beauty ’ here .", "We call it ‘Sleeping Beauty’ here."),
])
def test_clean_dailydialog(raw, clean):
    assert clean_dailydialog(raw) == clean


# --------------------------------------------------------------------------------- real files, CLI, stage

@pytest.mark.parametrize("name", ["sharegpt92k_sample.jsonl", "fastchat_dummy_conversation.json",
                                  "axolotl_conversation.json"])
def test_real_sharegpt_files_pass_the_check_after_import(shared_data, tmp_path, name):
    p = params(sharegpt={"extra": [str(shared_data / "sharegpt" / name)], "val_fraction": 0.2})
    train, val, metrics = build(p, tmp_path / "no-dialogues")
    assert metrics["sources"]["extra"]["rows_kept"] > 0
    write_split(tmp_path / "out", train, val)
    files = [tmp_path / "out" / f"{split}.jsonl" for split, rows in (("train", train), ("val", val)) if rows]
    res = subprocess.run([CLI, "sharegpt-check", *map(str, files)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]


def test_stage_end_to_end(root, tmp_path):
    d = tmp_path / "data" / "interim" / "dialogues"
    write_rows(d / "templates.jsonl", [qa(i) for i in range(30)])
    write_rows(d / "messages.jsonl", [qa(i, "messages", None) for i in range(25, 40)])
    (d / "transcripts.jsonl").write_text("")
    (tmp_path / "dl.json").write_text(json.dumps([{"conversations": [
        {"from": "user", "value": "what's up?"}, {"from": "assistant", "value": "not much!"}]}]))
    (tmp_path / "dialogues_demo.txt").write_text("I won the prize ! __eou__ Wow , really ? __eou__\n")
    (tmp_path / "dialogues_emotion_demo.txt").write_text("4 6\n")
    (tmp_path / "g.tsv").write_text("That is lovely\t18\tx1\n")
    cfg = {"seed": 3, "sharegpt": {"extra": ["dl.json"], "weights": {"emotion": 2.0}},
           "emotion": {"datasets": [{"kind": "dailydialog", "path": "dialogues_demo.txt"},
                                    {"kind": "goemotions", "path": "g.tsv"}]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg))
    stage = [sys.executable, str(root / "stages" / "build_sharegpt.py")]

    res = subprocess.run(stage, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "data" / "processed" / "sharegpt"
    rows = [json.loads(x) for f in ("train.jsonl", "val.jsonl") for x in (out / f).read_text().splitlines()]
    metrics = json.loads((tmp_path / "reports" / "sharegpt.json").read_text())
    assert Counter(r["source"] for r in rows) == {"templates": 30, "messages": 10, "extra": 1, "emotion": 4}
    assert metrics["skips"] == {"messages: duplicate conversation": 5}
    assert metrics["train"]["rows"] + metrics["val"]["rows"] == 45 and metrics["val"]["rows"] >= 1
    assert metrics["labelled_replies"]["surprise"] == 2 and metrics["labelled_replies"]["love"] == 2
    assert json.loads((tmp_path / "reports" / "validation" / "sharegpt.json").read_text())["success"]
    check = subprocess.run([CLI, "sharegpt-check", str(out / "train.jsonl"), str(out / "val.jsonl")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout

    cfg["sharegpt"]["extra"] = ["missing.jsonl"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg))
    before = (out / "train.jsonl").read_bytes()
    res = subprocess.run(stage, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "sharegpt.extra[0]: file not found: missing.jsonl" in res.stderr and "Traceback" not in res.stderr
    assert (out / "train.jsonl").read_bytes() == before


# ------------------------------------------------------------------------------------------ finetune shares

def test_mix_shares_gives_listed_sources_their_share_and_the_rest_by_size():
    from persona_lm.data.build import mix_shares

    sizes = {"templates": 300, "transcripts": 100, "messages": 0, "extra": 0, "emotion": 4000}
    assert mix_shares({"extra": 0.1, "emotion": 0.1}, sizes) == pytest.approx(
        {"templates": 0.9 * 0.75, "transcripts": 0.9 * 0.25, "emotion": 0.1})
    # without public data the default leaves the natural mix; all listed -> scaled to 1
    assert mix_shares({"extra": 0.1, "emotion": 0.1}, {"templates": 3, "transcripts": 1}) == \
        pytest.approx({"templates": 0.75, "transcripts": 0.25})
    assert mix_shares({"templates": 0.2, "emotion": 0.2}, {"templates": 1, "emotion": 9}) == \
        pytest.approx({"templates": 0.5, "emotion": 0.5})
    assert mix_shares({"emotion": 0.0}, {"templates": 1, "emotion": 9}) == pytest.approx({"templates": 1.0, "emotion": 0.0})


def test_build_reports_shares_and_warns_when_public_rows_drown_the_persona(tmp_path, caplog):
    d = tmp_path / "dialogues"
    write_rows(d / "templates.jsonl", [qa(i) for i in range(30)])
    extra = write_rows(tmp_path / "public.jsonl", [qa(1000 + i, source="extra") for i in range(600)])
    p = params(sharegpt={"extra": [str(extra)], "shares": {"extra": 0.1}})
    _, _, m = build(p, d)
    assert m["finetune_shares"]["extra"] == pytest.approx(0.1) and m["finetune_shares"]["templates"] == pytest.approx(0.9)
    assert "persona_floor" not in caplog.text
    _, _, m = build(params(sharegpt={"extra": [str(extra)], "shares": {}}), d)
    assert m["finetune_shares"]["extra"] > 0.9
    assert "below sharegpt.persona_floor 50%" in caplog.text


def test_finetune_samples_each_source_at_its_share_of_tokens():
    import torch

    from persona_lm.train.batches import ChatBatches
    from persona_lm.train.phase import share_weights

    rows = [{"source": "templates"}] * 30 + [{"source": "emotion"}] * 600
    examples = [([1] * 11, [1] * 11, 0)] * 30 + [([2] * 21, [1] * 21, 0)] * 600  # public rows twice as long
    p = params(sharegpt={"shares": {"emotion": 0.2}})
    w = share_weights(p, rows, examples)
    batches = ChatBatches(examples, examples, None, 0.0, 64, 32, 0, seed=3, train_weights=w)
    tokens = torch.zeros(3)
    for step in range(300):
        x = batches.get("train", step)["x"]
        tokens += torch.bincount(x.flatten(), minlength=3)[:3].float()
    assert tokens[2] / (tokens[1] + tokens[2]) == pytest.approx(0.2, abs=0.02)
    assert share_weights(params(sharegpt={"shares": {}}), rows, examples) is None  # natural mix: uniform draws
