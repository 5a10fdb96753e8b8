"""Chat-export parsers, conversation building and the import_messages stage (PII rules: test_pii.py)."""

from __future__ import annotations

import json
import runpy
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from persona_lm.data.messages import (
    Message, conversations, date_order, detect_format, fix_mojibake, import_messages, parse_instagram,
    parse_telegram, parse_whatsapp, read_export, telegram_text,
)
from persona_lm.data.sharegpt import check_row
from persona_lm.errors import InputError, Skips
from persona_lm.params import Export, Messages, Params

SAMPLE = "data/sample/messages/whatsapp_chat.txt"


def chat_miner(shared_data: Path) -> Path:
    d = shared_data / "messages" / "chat-miner"
    if not d.is_dir():
        pytest.skip(f"{d} not found")
    return d


def expected(d: Path, kind: str) -> list[tuple[str, str, str]]:
    target = json.loads((d / f"{kind}__target.json").read_text(encoding="utf-8"))
    return sorted((t["timestamp"], t["author"], t["message"]) for t in target)


def parsed(chats: dict[str, list[Message]]) -> list[tuple[str, str, str]]:
    # The targets join a multi-line message with spaces; we keep its newlines, so compare words.
    return sorted((m.timestamp.isoformat(), m.author, " ".join(m.text.split())) for ms in chats.values() for m in ms)


# ------------------------------------------------------------------------------------------ real fixtures

@pytest.mark.parametrize("name", ["ddmmyy_24hrs", "mmddyy_24hrs", "mmddyyyy_12hrs", "yyyymmdd_24hrs",
                                  "brackets_mmddyy_24hrs"])
def test_whatsapp_fixtures_match_expected_parse(shared_data, name):
    d = chat_miner(shared_data)
    path = d / f"whatsapp__test_{name}.txt"
    stats = Counter()
    assert detect_format(str(path), path.read_text(encoding="utf-8")) == "whatsapp"
    assert parsed(read_export(path, stats=stats)) == expected(d, "whatsapp")
    # "created group", "You were added" and the authorless "John Doe:." line
    assert stats["system lines"] == 3


@pytest.mark.parametrize("kind, file", [("telegram", "telegram__test_single_export.json"),
                                        ("telegram", "telegram__test_batch_export.json"),
                                        ("signal", "signal__test_export.txt"),
                                        ("instagram", "instagram__test_export.json")])
def test_other_fixtures_match_expected_parse(shared_data, kind, file):
    d = chat_miner(shared_data)
    assert detect_format(str(d / file), (d / file).read_text(encoding="utf-8")) == kind
    assert parsed(read_export(d / file)) == expected(d, kind)
    assert parsed(read_export(d / file, kind)) == expected(d, kind)


def test_signal_fixture_keeps_the_line_break(shared_data):
    chats = read_export(chat_miner(shared_data) / "signal__test_export.txt")
    assert [m.text for m in chats["signal__test_export.txt"]] == ["Hello John!", "Hello\nJane!"]


# ---------------------------------------------------------------------------------------------- WhatsApp

def test_day_month_order_is_decided_per_file():
    assert date_order([(1, 2, 21), (13, 2, 21)], twelve_hour=False) == "dmy"
    assert date_order([(1, 2, 21), (2, 13, 21)], twelve_hour=True) == "mdy"
    assert date_order([(2021, 2, 1)], twelve_hour=False) == "ymd"
    # No field above 12: the reading that keeps the file in time order wins.
    assert date_order([(12, 1, 21), (1, 2, 21)], twelve_hour=True) == "dmy"  # 12 Jan, 1 Feb
    assert date_order([(1, 12, 21), (2, 1, 21)], twelve_hour=False) == "mdy"  # Jan 12, Feb 1
    # Nothing decides: 12-hour clocks are the US order, 24-hour the day-first one.
    assert date_order([(3, 4, 21)], twelve_hour=True) == "mdy"
    assert date_order([(3, 4, 21)], twelve_hour=False) == "dmy"
    with pytest.raises(ValueError, match="both day-first and month-first"):
        date_order([(13, 1, 21), (1, 13, 21)], twelve_hour=False)


def test_a_late_date_decides_the_order_of_the_early_ones():
    text = "03/04/21, 10:00 - Ann: first\n20/04/21, 10:00 - Bob: second\n"
    msgs = parse_whatsapp(text)
    assert [m.timestamp for m in msgs] == [datetime(2021, 4, 3, 10), datetime(2021, 4, 20, 10)]


def test_whatsapp_ios_style_with_invisible_marks_and_seconds():
    text = ("\u200e[31/12/2021, 10:15:07\u202fPM] \u202a+44 7700 900123\u202c: hi there\n"
            "[31/12/2021, 12:01:00 a.m.] Zoë 🌸: late\n"
            "[31/12/2021, 12:30:00 PM] Zoë 🌸: \u200eimage omitted\n")
    msgs = parse_whatsapp(text)
    assert msgs == [Message(datetime(2021, 12, 31, 22, 15, 7), "+44 7700 900123", "hi there"),
                    Message(datetime(2021, 12, 31, 0, 1), "Zoë 🌸", "late")]


def test_whatsapp_multiline_system_media_deleted_and_edited():
    text = (
        "05/01/2024, 09:00 - Messages and calls are end-to-end encrypted. No one outside of this chat, "
        "not even WhatsApp, can read or listen to them.\n"
        '05/01/2024, 09:01 - Ann changed the subject from "Trip" to "Trip: day 2"\n'
        "05/01/2024, 09:02 - Ann: list:\n- eggs\n\n- milk: two\n"
        "05/01/2024, 09:03 - Bob: <Media omitted>\n"
        "05/01/2024, 09:04 - Bob: This message was deleted\n"
        "05/01/2024, 09:05 - Bob: fixed it <This message was edited>\n"
    )
    stats = Counter()
    msgs = parse_whatsapp(text, stats=stats)
    assert [(m.author, m.text) for m in msgs] == [("Ann", "list:\n- eggs\n\n- milk: two"), ("Bob", "fixed it")]
    assert stats == Counter({"system lines": 2, "media or deleted": 2})


def test_whatsapp_bad_date_names_the_line():
    with pytest.raises(InputError, match=r"chat.txt:2: bad date"):
        parse_whatsapp("01/02/2021, 10:00 - Ann: ok\n31/02/2021, 10:00 - Ann: no such day\n", "chat.txt")


# -------------------------------------------------------------------------------- Telegram and Instagram

def test_telegram_text_entities_and_plain_strings():
    assert telegram_text("plain") == "plain"
    assert telegram_text(["Hello ", {"type": "bold", "text": "world"}, "!"]) == "Hello world!"
    assert telegram_text([{"type": "plain", "text": "see "}, {"type": "link", "text": "https://x.org"}]) == \
        "see https://x.org"


def test_telegram_service_media_and_undated_messages():
    data = {"name": "Chat", "type": "personal_chat", "messages": [
        {"type": "service", "date_unixtime": "1700000000", "actor": "Ann", "action": "phone_call"},
        {"type": "message", "date_unixtime": "1700000060", "from": "Ann", "text": "", "photo": "p.jpg"},
        {"type": "message", "from": "Ann", "text": "no date"},
        {"type": "message", "date": "2023-11-14T22:15:00", "from": "Bob", "text": "local date"},
    ]}
    skips, stats = Skips("message"), Counter()
    chats = parse_telegram(data, "result.json", skips, stats)
    assert chats == {"Chat": [Message(datetime(2023, 11, 14, 22, 15), "Bob", "local date")]}
    assert stats == Counter({"system lines": 1, "media or deleted": 1})
    assert skips.total == 1


def test_instagram_mojibake_is_repaired():
    assert fix_mojibake("Caf\u00c3\u00a9 \u00f0\u009f\u0098\u008a") == "Café 😊"
    assert fix_mojibake("Café") == "Café"  # already correct text is left alone
    data = {"participants": [], "messages": [
        {"sender_name": "Zo\u00c3\u00ab", "timestamp_ms": 1579294140000, "content": "d\u00c3\u00a9j\u00c3\u00a0 vu"},
        {"sender_name": "Ann", "timestamp_ms": 1579294150000, "content": "Liked a message"},
        {"sender_name": "Ann", "timestamp_ms": 1579294160000, "photos": [{"uri": "x.jpg"}]},
    ]}
    stats = Counter()
    assert parse_instagram(data, stats=stats) == [Message(datetime(2020, 1, 17, 20, 49), "Zoë", "déjà vu")]
    assert stats == Counter({"system lines": 1, "media or deleted": 1})


# ------------------------------------------------------------------------------------ malformed exports

@pytest.mark.parametrize("name, content, match", [
    ("empty.txt", b"", "empty.txt: file is empty"),
    ("garbage.bin", bytes(range(256)) * 4, "garbage.bin: binary data"),
    ("latin1.txt", "01/02/21, 10:00 - Ann: ok\n02/02/21, 10:00 - Ann: caf\u00e9\n".encode("latin-1"),
     r"latin1.txt:2: not valid UTF-8"),
    ("notes.txt", b"just some notes\nno chat here\n", "notes.txt: unknown chat export format"),
    ("result.json", b'{\n  "messages": [\n    {"type": "message",,}\n  ]\n}\n', r"result.json:3: invalid JSON"),
    ("other.json", b'{"rows": []}', "other.json: unknown chat export format"),
])
def test_malformed_exports_are_one_clear_error(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=match):
        read_export(tmp_path / name)


def test_whatsapp_without_message_lines(tmp_path):
    (tmp_path / "chat.txt").write_text("hello\nworld\n")
    with pytest.raises(InputError, match="chat.txt: no whatsapp message lines found"):
        read_export(tmp_path / "chat.txt", "whatsapp")


def test_wrong_shape_for_the_named_format(tmp_path):
    (tmp_path / "x.json").write_text('{"chats": {"list": []}}')
    with pytest.raises(InputError, match="x.json: not an Instagram export"):
        read_export(tmp_path / "x.json", "instagram")


# ---------------------------------------------------------------------------------------- conversations

def msg(minute: int, author: str, text: str) -> Message:
    return Message(datetime(2024, 1, 1, 9) + timedelta(minutes=minute), author, text)


def test_conversations_split_merge_and_trim():
    msgs = [
        msg(0, "Sam", "morning all"),          # leading own message: nothing to answer, dropped
        msg(1, "Ann", "hi"), msg(2, "Bob", "hey"),  # group chat: every other author is the human side
        msg(3, "sam", "hello you two"), msg(4, "Sam", "coffee?"),
        msg(5, "Ann", "yes"),
        msg(6, "Sam", "great"),
        msg(7, "Bob", "wait for me"),          # last human message has no reply: dropped
        msg(500, "Ann", "new day"), msg(501, "Sam", "hi Ann"),
        msg(900, "Ann", "alone"),              # no reply at all: too short
    ]
    convs = conversations(list(reversed(msgs)), me="Sam", gap_minutes=240, min_turns=2)
    assert convs == [
        [("human", "hi\nhey"), ("gpt", "hello you two\ncoffee?"), ("human", "yes"), ("gpt", "great")],
        [("human", "new day"), ("gpt", "hi Ann")],
    ]
    assert conversations(msgs, me="Sam", gap_minutes=240, min_turns=4) == convs[:1]


def test_me_must_be_an_author(tmp_path):
    (tmp_path / "chat.txt").write_text("01/02/21, 10:00 - Ann: hi\n01/02/21, 10:01 - Sam R: hey\n")
    cfg = Messages(exports=[Export(path=str(tmp_path / "chat.txt"), me="Sam")])
    with pytest.raises(InputError, match=r"chat.txt: me: 'Sam' is not an author.*'Ann' \(1\), 'Sam R' \(1\)"):
        import_messages(cfg)


def test_import_telegram_batch_and_whatsapp_together(tmp_path):
    (tmp_path / "result.json").write_text(json.dumps({"chats": {"list": [
        {"name": "Ann", "messages": [
            {"type": "message", "date_unixtime": "1700000000", "from": "Ann", "text": "call me on 07700 900123"},
            {"type": "message", "date_unixtime": "1700000060", "from": "Me", "text": "will do"}]},
        {"name": "Bob", "messages": [
            {"type": "message", "date_unixtime": "1700000000", "from": "Bob", "text": "lunch at 12:30?"},
            {"type": "message", "date_unixtime": "1700000060", "from": "Me",
             "text": ["ok, ", {"type": "link", "text": "https://example.org/cafe"}]}]},
    ]}}))
    (tmp_path / "chat.txt").write_text("01/02/21, 10:00 - Ann: hi\n01/02/21, 10:01 - Me: hi Ann\n")
    cfg = Messages(exports=[Export(path=str(tmp_path / "result.json"), me="Me"),
                            Export(path=str(tmp_path / "chat.txt"), format="whatsapp", me="Me")])
    result = import_messages(cfg)
    assert [[t["value"] for t in r["conversations"]] for r in result.rows] == [
        ["call me on <phone>", "will do"], ["lunch at 12:30?", "ok, <url>"], ["hi", "hi Ann"]]
    assert [r["export"] for r in result.rows] == ["result.json", "result.json", "chat.txt"]
    assert all(check_row(r) == [] for r in result.rows)
    assert result.pii == Counter({"phone": 1, "url": 1})
    assert result.counts["messages read"] == 6


# ------------------------------------------------------------------------------------- sample and stage

def test_sample_chat_is_a_day_first_whatsapp_export_with_sam(root):
    stats = Counter()
    chats = read_export(root / SAMPLE, stats=stats)
    msgs = chats["whatsapp_chat.txt"]
    assert {m.author for m in msgs} == {"Sam", "Priya", "Leo", "Maya"}
    assert msgs[0].timestamp == datetime(2024, 6, 10, 8, 4)
    assert any("\n" in m.text for m in msgs)
    assert stats["system lines"] >= 3 and stats["media or deleted"] >= 2


def test_stage_writes_scrubbed_valid_dialogues(root, tmp_path, monkeypatch):
    main = runpy.run_path(str(root / "stages" / "import_messages.py"))["main"]
    monkeypatch.chdir(tmp_path)
    params = Params(messages=Messages(exports=[Export(path=str(root / SAMPLE), me="Sam")]))
    main(params)
    rows = [json.loads(line) for line in (tmp_path / "data/interim/dialogues/messages.jsonl").read_text().splitlines()]
    assert len(rows) >= 20
    assert all(check_row(r, set(params.persona.emotions)) == [] for r in rows)
    assert {r["source"] for r in rows} == {"messages"} and {r["export"] for r in rows} == {"whatsapp_chat.txt"}
    text = json.dumps(rows, ensure_ascii=False)
    for secret in ("maya.kent@example.com", "7700 900461", "07700 900318", "example.org/bakes"):
        assert secret not in text
    for placeholder in ("<email>", "<phone>", "<url>"):
        assert placeholder in text
    assert "<Media omitted>" not in text and "£4.50" in text and "10:30" in text
    assert json.loads((tmp_path / "reports/validation/messages.json").read_text())["success"] is True


def test_stage_leaves_no_output_when_an_export_is_bad(root, tmp_path, monkeypatch):
    main = runpy.run_path(str(root / "stages" / "import_messages.py"))["main"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.json").write_text('{"messages": [')
    params = Params(messages=Messages(exports=[Export(path=str(root / SAMPLE), me="Sam"),
                                               Export(path="broken.json", me="Sam")]))
    with pytest.raises(InputError, match="broken.json:1: invalid JSON"):
        main(params)
    assert not (tmp_path / "data").exists()
