"""Chat-export parsers, what they drop (and count), conversation building, the import_messages stage and
the `persona-lm messages` command. PII rules themselves are in test_pii.py."""

from __future__ import annotations

import json
import re
import runpy
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from persona_lm.cli import main as cli
from persona_lm.data.messages import (
    ExportLog, Message, conversations, date_order, detect_format, fix_mojibake, import_messages, parse_instagram,
    parse_telegram, parse_whatsapp, read_export, telegram_text, whatsapp_text,
)
from persona_lm.data.sharegpt import check_row
from persona_lm.errors import InputError, ParamsError, Skips
from persona_lm.params import Export, Messages, Params, parse_params

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


def texts(msgs: list[Message]) -> list[tuple[str, str]]:
    return [(m.author, m.text) for m in msgs]


def turns(rows: list[dict]) -> list[list[tuple[str, str]]]:
    return [[(t["from"], t["value"]) for t in r["conversations"]] for r in rows]


# ------------------------------------------------------------------------------------------ real fixtures

@pytest.mark.parametrize("name", ["ddmmyy_24hrs", "mmddyy_24hrs", "mmddyyyy_12hrs", "yyyymmdd_24hrs",
                                  "brackets_mmddyy_24hrs"])
def test_whatsapp_fixtures_match_expected_parse(shared_data, name):
    d = chat_miner(shared_data)
    path = d / f"whatsapp__test_{name}.txt"
    log = ExportLog()
    assert detect_format(str(path), path.read_text(encoding="utf-8")) == "whatsapp"
    assert parsed(read_export(path, log=log)) == expected(d, "whatsapp")
    # "created group", "You were added" and the authorless "John Doe:." line
    assert log.dropped["system lines"] == 3


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


# ------------------------------------------------------------- real-world cases (../shared/cases/exports)

def run_case(shared_cases: Path, name: str, me: str) -> tuple[list[list[tuple[str, str]]], dict]:
    """The case through the importer as its README says: gap 240 minutes, PII scrubbing on."""
    path = shared_cases / "exports" / name
    if not path.is_file():
        pytest.skip(f"{path} not found")
    result = import_messages(Messages(exports=[Export(path=str(path), me=me)], gap_minutes=240, scrub_pii=True))
    return turns(result.rows), result.report()


def gpt_replies(convs: list[list[tuple[str, str]]]) -> list[str]:
    return [text for conv in convs for role, text in conv if role == "gpt"]


def test_case_ios_notices_with_the_group_as_author(shared_cases):
    convs, report = run_case(shared_cases, "01-whatsapp-ios-system-as-author.txt", "Theo")
    # Six notices dropped and counted whatever name stands before them; the talk starts with Nora's question.
    assert report["dropped"]["system lines"] == 6
    assert convs[0][0] == ("human", "Who is up for the ridge trail on Sunday?")
    assert gpt_replies(convs) == ["Count me in, as long as we start after nine", "Great, I will pack snacks for everyone"]


def test_case_german_android_media_and_deletions(shared_cases):
    convs, report = run_case(shared_cases, "02-whatsapp-de-android-media.txt", "Jonas")
    assert gpt_replies(convs) == ["Hier sind sie, die Sonne war super", "Danke, nächstes Mal kommst du mit"]
    text = json.dumps(convs, ensure_ascii=False)
    for placeholder in ("Medien ausgeschlossen", "Datei angehängt", "gelöscht", ".jpg", ".opus"):
        assert placeholder not in text
    assert report["dropped"]["media placeholders"] == 3 and report["dropped"]["deleted messages"] == 2


def test_case_spanish_ios_attachments(shared_cases):
    convs, report = run_case(shared_cases, "04-whatsapp-es-ios-adjunto.txt", "Lucía")
    assert gpt_replies(convs) == ["¿Te gusta el color?", "Genial, la pinto el sábado entonces"]
    assert report["dropped"]["media placeholders"] == 3
    assert "phone" not in report["pii_replaced"]  # a file name is never a phone number


def test_case_telegram_forwarded_is_not_my_voice(shared_cases):
    convs, report = run_case(shared_cases, "06-telegram-forwarded.json", "Karl")
    assert gpt_replies(convs) == ["this one, ugh", "We could carpool on Tuesdays"]
    assert "bridge will close" not in json.dumps(convs)
    assert report["dropped"]["forwarded messages"] == 1 and report["dropped"]["stickers"] == 1


def test_case_spanish_national_phone_numbers(shared_cases):
    convs, report = run_case(shared_cases, "13-whatsapp-es-phone-pii.txt", "Paco")
    text = json.dumps(convs, ensure_ascii=False)
    for secret in ("612 34 56 78", "91 123 45 67", "699 11 22 33", "ines.vidal@example.es"):
        assert secret not in text
    assert text.count("<phone>") == 3 and text.count("<email>") == 1
    assert report["pii_replaced"] == {"email": 1, "phone": 3}


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
    log = ExportLog()
    msgs = parse_whatsapp(text, log=log)
    assert texts(msgs) == [("Ann", "list:\n- eggs\n\n- milk: two"), ("Bob", "fixed it")]
    assert log.dropped == Counter({"system lines": 2, "media placeholders": 1, "deleted messages": 1})
    assert log.changed == Counter({"edit markers removed": 1}) and log.language == "en"


@pytest.mark.parametrize("lang, lines", [
    ("de", ["[03.02.24, 10:00:00] Wandergruppe: \u200eNachrichten und Anrufe sind Ende-zu-Ende-verschlüsselt.",
            "[03.02.24, 10:00:01] Nora: \u200eNora hat die Gruppe „Wandergruppe“ erstellt.",
            "[03.02.24, 10:00:02] Wandergruppe: \u200eNora hat dich hinzugefügt.",
            "[03.02.24, 10:00:03] Wandergruppe: \u200eDu bist jetzt ein Admin",
            "[03.02.24, 10:01:00] Nora: Hallo zusammen"]),
    ("es", ["03/02/24, 10:00 - Los mensajes y las llamadas están cifrados de extremo a extremo. Toca para más info.",
            "03/02/24, 10:00 - Nora creó el grupo «Senderismo: 2024»",
            "03/02/24, 10:00 - Nora te añadió.",
            "03/02/24, 10:00 - Nora cambió el asunto de “Senderismo” a “Senderismo: otoño”",
            "03/02/24, 10:01 - Nora: Hola a todos"]),
    ("fr", ["[03/02/2024 10:00:00] Randonnée : \u200eLes messages et les appels sont chiffrés de bout en bout.",
            "[03/02/2024 10:00:01] Nora: \u200eNora a créé le groupe « Randonnée »",
            "[03/02/2024 10:00:02] Randonnée: \u200eNora vous a ajouté",
            "[03/02/2024 10:01:00] Nora: Salut tout le monde"]),
])
def test_group_notices_in_the_export_language(lang, lines):
    """Android writes notices without an author; iOS names the group or contact and starts the text with U+200E."""
    log = ExportLog()
    msgs = parse_whatsapp("\n".join(lines), log=log)
    assert texts(msgs) == [("Nora", lines[-1].split("Nora: ")[1])]
    assert log.dropped == Counter({"system lines": len(lines) - 1}) and log.language == lang


# One placeholder per kind in each language WhatsApp exports in: (language, text, reason it is dropped).
PLACEHOLDERS = [
    ("en", "<Media omitted>", "media placeholders"), ("en", "\u200esticker omitted", "stickers"),
    ("en", "IMG-20240312-WA0007.jpg (file attached)", "media placeholders"),
    ("en", "\u200e<attached: 00000034-PHOTO-2024-03-12-10-00-00.jpg>", "media placeholders"),
    ("en", "You deleted this message", "deleted messages"), ("en", "Missed voice call", "calls"),
    ("de", "<Medien ausgeschlossen>", "media placeholders"), ("de", "\u200eBild weggelassen", "media placeholders"),
    ("de", "Diese Nachricht wurde gelöscht.", "deleted messages"),
    ("es", "<Multimedia omitido>", "media placeholders"), ("es", "\u200eimagen omitida", "media placeholders"),
    ("es", "Se eliminó este mensaje.", "deleted messages"),
    ("es", "DOC-20240101-WA0004.pdf (archivo adjunto)", "media placeholders"),
    ("fr", "<Médias omis>", "media placeholders"), ("fr", "Ce message a été supprimé", "deleted messages"),
    ("fr", "PTT-20240101-WA0001.opus (fichier joint)", "media placeholders"),
    ("pt", "<Mídia oculta>", "media placeholders"), ("pt", "Você apagou esta mensagem", "deleted messages"),
    ("pt", "IMG-20240312-WA0007.jpg (arquivo anexado)", "media placeholders"),
    ("it", "<Media omessi>", "media placeholders"), ("it", "\u200eimmagine omessa", "media placeholders"),
    ("it", "Questo messaggio è stato eliminato", "deleted messages"),
    ("nl", "<Media weggelaten>", "media placeholders"), ("nl", "Dit bericht is verwijderd", "deleted messages"),
    ("tr", "<Medya dahil edilmedi>", "media placeholders"), ("tr", "Bu mesaj silindi", "deleted messages"),
    ("ru", "<Без медиафайлов>", "media placeholders"), ("ru", "Данное сообщение удалено", "deleted messages"),
    ("id", "<Media tidak disertakan>", "media placeholders"), ("id", "Pesan ini telah dihapus", "deleted messages"),
    ("hi", "<मीडिया के बिना>", "media placeholders"),
]


@pytest.mark.parametrize("lang, text, reason", PLACEHOLDERS)
def test_placeholders_are_dropped_counted_and_name_the_language(lang, text, reason):
    log = ExportLog()
    assert whatsapp_text(text, log) is None
    assert log.dropped == Counter({reason: 1}) and log.language == lang


@pytest.mark.parametrize("text", [
    "This message was deleted by my cat, I swear",
    "I deleted this message by accident",
    "the photo got deleted. Sorry!",
    "Media omitted from the report, ask Sam",
    "Diese Nachricht wurde gelöscht? Komisch",
    "imagen omitida en el informe de ayer",
    "the invoice (file attached) is on its way",
    "null and void",
])
def test_sentences_that_mention_a_placeholder_are_messages(text):
    log = ExportLog()
    assert whatsapp_text(text, log) == text and not log.dropped


@pytest.mark.parametrize("line", ["IMG-20220517-WA0004.jpg (file attached)", "IMG-20220517-WA0004.jpg (Datei angehängt)",
                                  "<Media omitted>"])
def test_android_attachment_caption_is_the_message(line):
    log = ExportLog()
    assert whatsapp_text(f"{line}\nthe view from the top!\nworth it", log) == "the view from the top!\nworth it"
    assert log.changed == Counter({"captions kept from attachment lines": 1}) and not log.dropped


@pytest.mark.parametrize("marker, lang", [(" <This message was edited>", "en"), (" \u200e<This message was edited>", "en"),
                                          (" <Diese Nachricht wurde bearbeitet.>", "de"),
                                          (" <Se editó este mensaje.>", "es"), (" <Ce message a été modifié>", "fr")])
def test_edit_marker_is_removed(marker, lang):
    log = ExportLog()
    assert whatsapp_text("see you at eight" + marker, log) == "see you at eight"
    assert log.changed == Counter({"edit markers removed": 1}) and log.language == lang


def test_whatsapp_bad_date_names_the_line():
    with pytest.raises(InputError, match=r"chat.txt:2: bad date"):
        parse_whatsapp("01/02/2021, 10:00 - Ann: ok\n31/02/2021, 10:00 - Ann: no such day\n", "chat.txt")


# -------------------------------------------------------------------------------- Telegram and Instagram

def test_telegram_text_entities_and_plain_strings():
    assert telegram_text("plain") == "plain"
    assert telegram_text(["Hello ", {"type": "bold", "text": "world"}, "!"]) == "Hello world!"
    assert telegram_text([{"type": "plain", "text": "see "}, {"type": "link", "text": "https://x.org"}]) == \
        "see https://x.org"


def tg(i: int, author: str | None, text="", **extra) -> dict:
    return {"id": i, "type": "message", "date_unixtime": str(1700000000 + 60 * i), "from": author, "text": text, **extra}


def test_telegram_drops_what_is_not_the_authors_voice():
    data = {"name": "Chat", "type": "personal_chat", "messages": [
        {"type": "service", "date_unixtime": "1700000000", "actor": "Ann", "action": "phone_call"},
        tg(1, "Ann", "", photo="p.jpg"),
        tg(2, "Ann", "look at this", photo="p.jpg"),
        tg(3, "Me", "Breaking: the bridge closes", forwarded_from="City Daily"),
        tg(4, "Ann", "a chain letter", forwarded_from="Aunt May"),
        tg(5, "Ann", "", poll={"question": "Pizza?", "answers": []}),
        tg(6, "Me", "", file="s.webp", media_type="sticker", sticker_emoji="😩"),
        tg(7, None, "from a deleted account"),
        {"type": "message", "from": "Ann", "text": "no date"},
        {"type": "message", "date": "2023-11-14T22:15:00", "from": "Me", "text": "local date"},
    ]}
    skips, log = Skips("message"), ExportLog()
    chats = parse_telegram(data, "result.json", skips, log)
    assert {k: texts(v) for k, v in chats.items()} == {"Chat": [("Ann", "look at this"), ("Me", "local date")]}
    assert log.dropped == Counter({"system lines": 1, "media placeholders": 1, "forwarded messages": 2, "polls": 1,
                                   "stickers": 1, "messages without an author": 1})
    assert skips.total == 1


def test_telegram_account_export_reads_left_chats():
    data = {"chats": {"list": [{"name": "Ann", "messages": [tg(1, "Ann", "hi"), tg(2, "Me", "hey")]}]},
            "left_chats": {"list": [{"name": "Old club", "messages": [tg(3, "Bo", "bye?"), tg(4, "Me", "bye!")]},
                                    {"name": "broken"}]}}
    skips, log = Skips("message"), ExportLog()
    chats = parse_telegram(data, "result.json", skips, log)
    assert {k: texts(v) for k, v in chats.items()} == {"Ann": [("Ann", "hi"), ("Me", "hey")],
                                                       "Old club": [("Bo", "bye?"), ("Me", "bye!")]}
    assert log.changed == Counter({"left chats read": 1}) and skips.counts == Counter(
        {"Telegram chat without a 'messages' list": 1})


def test_instagram_mojibake_is_repaired():
    assert fix_mojibake("Caf\u00c3\u00a9 \u00f0\u009f\u0098\u008a") == "Café 😊"
    assert fix_mojibake("Café") == "Café"  # already correct text is left alone
    data = {"participants": [], "messages": [
        {"sender_name": "Zo\u00c3\u00ab", "timestamp_ms": 1579294140000, "content": "d\u00c3\u00a9j\u00c3\u00a0 vu"},
        {"sender_name": "Ann", "timestamp_ms": 1579294150000, "content": "Liked a message"},
        {"sender_name": "Ann", "timestamp_ms": 1579294160000, "photos": [{"uri": "x.jpg"}]},
    ]}
    log = ExportLog()
    assert parse_instagram(data, log=log) == [Message(datetime(2020, 1, 17, 20, 49), "Zoë", "déjà vu")]
    assert log.dropped == Counter({"system lines": 1, "media placeholders": 1})


def ig(seconds: int, author: str, content: str) -> dict:
    return {"sender_name": author, "timestamp_ms": (1720829000 + seconds) * 1000, "content": content}


def test_instagram_edited_message_keeps_only_its_final_text():
    data = {"participants": [], "messages": [  # newest first, as Instagram writes them
        ig(900, "Ann", "new topic (edited)"),  # edited, but nothing similar was sent before it
        ig(614, "Me", "Last year \u00f0\u009f\u0098\u00ad (edited)"),
        ig(600, "Ann", "When was that trip?"),
        ig(595, "Me", "ok"),  # sent in between: another message, not the edited one
        ig(590, "Me", "Last year"),
        ig(580, "Ann", "Remember the lake?"),
    ]}
    log = ExportLog()
    msgs = parse_instagram(data, log=log)
    assert texts(msgs) == [("Ann", "Remember the lake?"), ("Me", "Last year 😭"), ("Me", "ok"),
                           ("Ann", "When was that trip?"), ("Ann", "new topic")]
    assert msgs[1].timestamp == datetime(2024, 7, 13, 0, 13, 10)  # when it was sent, not when it was edited
    assert log.dropped == Counter({"earlier versions of edited messages": 1})
    assert log.changed == Counter({"edit markers removed": 2})


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


def test_conversations_split_merge_trim_and_count():
    msgs = [
        msg(0, "Sam", "morning all"),          # leading own message: nothing to answer, dropped
        msg(1, "Ann", "hi"), msg(2, "Bob", "hey"),  # group chat: every other author is the human side
        msg(3, "sam", "hello you two"), msg(4, "Sam", "coffee?"),
        msg(5, "Ann", "yes"),
        msg(6, "Sam", "great"),
        msg(7, "Bob", "wait for me"),          # last human message has no reply: dropped
        msg(500, "Ann", "new day"), msg(501, "Sam", "hi Ann"),
        msg(900, "Ann", "alone"),              # no reply at all
    ]
    dropped = Counter()
    convs = conversations(list(reversed(msgs)), me="Sam", gap_minutes=240, min_turns=2, dropped=dropped)
    assert convs == [
        [("human", "hi\nhey"), ("gpt", "hello you two\ncoffee?"), ("human", "yes"), ("gpt", "great")],
        [("human", "new day"), ("gpt", "hi Ann")],
    ]
    assert dropped == Counter({"own messages with nothing to answer": 1, "messages without a reply": 2})
    dropped.clear()
    assert conversations(msgs, me="Sam", gap_minutes=240, min_turns=4, dropped=dropped) == convs[:1]
    assert dropped["messages in conversations under min_turns"] == 2


def test_me_must_be_an_author(tmp_path):
    (tmp_path / "chat.txt").write_text("01/02/21, 10:00 - Ann: hi\n01/02/21, 10:01 - Sam R: hey\n")
    cfg = Messages(exports=[Export(path=str(tmp_path / "chat.txt"), me="Sam")])
    with pytest.raises(InputError, match=r"chat.txt: me: 'Sam' is not an author.*'Ann' \(1\), 'Sam R' \(1\)"):
        import_messages(cfg)


def test_import_telegram_batch_and_whatsapp_together(tmp_path):
    (tmp_path / "result.json").write_text(json.dumps({"chats": {"list": [
        {"name": "Ann", "messages": [
            {"type": "message", "date_unixtime": "1700000000", "from": "Ann", "text": "call me on 07911 123456"},
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
    assert turns(result.rows) == [[("human", "call me on <phone>"), ("gpt", "will do")],
                                  [("human", "lunch at 12:30?"), ("gpt", "ok, <url>")],
                                  [("human", "hi"), ("gpt", "hi Ann")]]
    assert [r["export"] for r in result.rows] == ["result.json", "result.json", "chat.txt"]
    assert all(check_row(r) == [] for r in result.rows)
    assert result.pii == Counter({"phone": 1, "url": 1})
    assert result.report()["messages_read"] == 6
    assert [e["format"] for e in result.exports] == ["telegram", "whatsapp"]


def test_phone_region_from_the_export_language_or_params(tmp_path):
    # A Lisbon landline is a number only in Portugal's plan; the export's placeholders say it is Portuguese.
    chat = ("01/02/21, 10:00 - Ana: <Mídia oculta>\n01/02/21, 10:01 - Ana: liga para 21 123 4567\n"
            "01/02/21, 10:02 - Eu: obrigado\n")
    (tmp_path / "pt.txt").write_text(chat)
    (tmp_path / "plain.txt").write_text(chat.replace("<Mídia oculta>", "olá"))
    guessed = import_messages(Messages(exports=[Export(path=str(tmp_path / "pt.txt"), me="Eu")]))
    assert turns(guessed.rows)[0][0] == ("human", "liga para <phone>")
    assert guessed.exports[0]["language"] == "pt" and guessed.exports[0]["phone_regions"] == ["BR", "PT"]
    unknown = import_messages(Messages(exports=[Export(path=str(tmp_path / "plain.txt"), me="Eu")]))
    assert turns(unknown.rows)[0][0] == ("human", "olá\nliga para 21 123 4567")  # the fallback regions miss it
    for cfg in (Messages(region="PT", exports=[Export(path=str(tmp_path / "plain.txt"), me="Eu")]),
                Messages(region="US", exports=[Export(path=str(tmp_path / "plain.txt"), me="Eu", region="pt")])):
        assert turns(import_messages(cfg).rows)[0][0] == ("human", "olá\nliga para <phone>")


@pytest.mark.parametrize("data, key", [({"messages": {"region": "XX"}}, "messages.region"),
                                       ({"messages": {"exports": [{"path": "a.txt", "me": "x", "region": "UK"}]}},
                                        r"messages.exports\[0\].region")])
def test_region_must_be_one_phonenumbers_knows(data, key):
    with pytest.raises(ParamsError, match=rf"params.yaml: {key}: .* not a region code phonenumbers knows"):
        parse_params(data)


# ------------------------------------------------------------------------------------- sample and stage

def test_sample_chat_is_a_day_first_whatsapp_export_with_sam(root):
    log = ExportLog()
    chats = read_export(root / SAMPLE, log=log)
    msgs = chats["whatsapp_chat.txt"]
    assert {m.author for m in msgs} == {"Sam", "Priya", "Leo", "Maya"}
    assert msgs[0].timestamp == datetime(2024, 6, 10, 8, 4)
    assert any("\n" in m.text for m in msgs)
    assert log.dropped["system lines"] >= 3 and log.dropped["media placeholders"] >= 2


def test_stage_writes_scrubbed_valid_dialogues_and_the_drops(root, tmp_path, monkeypatch):
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
    report = json.loads((tmp_path / "reports/validation/messages.json").read_text())
    assert report["success"] is True
    dropped = report["import"]["dropped"]
    assert dropped["system lines"] == 5 and dropped["media placeholders"] == 2 and dropped["deleted messages"] == 1
    assert report["import"]["conversations"] == len(rows)
    assert report["import"]["exports"][0]["dropped"] == dropped


def test_stage_leaves_no_output_when_an_export_is_bad(root, tmp_path, monkeypatch):
    main = runpy.run_path(str(root / "stages" / "import_messages.py"))["main"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.json").write_text('{"messages": [')
    params = Params(messages=Messages(exports=[Export(path=str(root / SAMPLE), me="Sam"),
                                               Export(path="broken.json", me="Sam")]))
    with pytest.raises(InputError, match="broken.json:1: invalid JSON"):
        main(params)
    assert not (tmp_path / "data").exists()


# --------------------------------------------------------------------------------- persona-lm messages

def test_messages_command_prints_the_stage_rows_and_drops(root, capsys):
    assert cli(["messages", str(root / SAMPLE), "--me", "Sam"]) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows == import_messages(Messages(exports=[Export(path=str(root / SAMPLE), me="Sam")])).rows
    assert "system lines 5" in err and "media placeholders 2" in err and "deleted messages 1" in err
    assert "PII replaced: email 1, phone 2, url 1" in err


def test_messages_command_options(tmp_path, capsys):
    chat = tmp_path / "chat.txt"
    chat.write_text("01/02/21, 10:00 - Ana: liga para 21 123 4567\n01/02/21, 10:01 - Eu: obrigado\n"
                    "01/02/21, 11:00 - Ana: e amanhã?\n01/02/21, 11:01 - Eu: combinado\n")
    assert cli(["messages", str(chat), "--me", "Eu", "--format", "whatsapp", "--region", "PT"]) == 0
    assert [turns([json.loads(line)]) for line in capsys.readouterr().out.splitlines()] == [[[
        ("human", "liga para <phone>"), ("gpt", "obrigado"), ("human", "e amanhã?"), ("gpt", "combinado")]]]
    assert cli(["messages", str(chat), "--me", "Eu", "--gap-minutes", "30", "--no-scrub"]) == 0
    out, err = capsys.readouterr()
    assert [r["conversations"][0]["value"] for r in map(json.loads, out.splitlines())] == \
        ["liga para 21 123 4567", "e amanhã?"]
    assert "scrubbing off" in err


@pytest.mark.parametrize("args, match", [(["--me", "Bob"], "me: 'Bob' is not an author"),
                                         (["--me", "Sam", "--region", "XX"], "region: 'XX' is not a region code"),
                                         (["--me", "Sam", "--gap-minutes", "0"], "gap_minutes: must be > 0")])
def test_messages_command_errors_are_one_line(root, capsys, args, match):
    assert cli(["messages", str(root / SAMPLE), *args]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and len(err.splitlines()) == 1
    assert re.search(match, err)
