"""Chat exports (WhatsApp, Telegram, Signal, Instagram) -> ShareGPT conversations in the user's own voice.

Every parser reduces its format to the same `Message(timestamp, author, text)` records, grouped by chat.
Only what a person typed survives: system lines ("created group", "Messages and calls are end-to-end
encrypted"), media placeholders (`<Media omitted>`) and deleted messages are dropped and counted, because
a model that learns them would answer "<Media omitted>".

`conversations` then turns a chat into dialogues: a pause longer than `gap_minutes` starts a new
conversation, the user's own messages (`me`) become the gpt voice and everyone else's the human one, and
consecutive messages from one side are joined into one turn, since people send a thought in several bubbles.

Timestamps are naive: WhatsApp and Signal write local wall-clock time, Telegram and Instagram give Unix
time, read as UTC. Only differences within one chat matter, so the two never need to agree.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from persona_lm.data.pii import scrub
from persona_lm.data.sharegpt import check_row, make_row
from persona_lm.errors import InputError, Skips
from persona_lm.io import read_text
from persona_lm.params import Messages

FORMATS = ("whatsapp", "telegram", "signal", "instagram")


@dataclass(frozen=True)
class Message:
    timestamp: datetime
    author: str
    text: str


# ------------------------------------------------------------------------------------ line-based exports

# WhatsApp's many locales: `31/12/21, 22:15 - `, `12/31/2021, 10:15 p. m. - `, `2021-12-31 22:15 - `,
# `[31.12.21, 22:15:07] ` (iOS), with `/ . -` between date fields and an optional AM/PM in any spelling.
WHATSAPP_LINE = re.compile(
    r"\[?(?P<date>\d{1,4}[./-]\d{1,2}[./-]\d{1,4})\.?,?\s+"
    r"(?P<time>\d{1,2}[:.]\d{2}(?:[:.]\d{2})?)(?:\s*(?P<ampm>[aApP]\.?\s?[mM]\.?))?"
    r"(?:\]\s*|\s+[-–]\s+)(?P<rest>.*)"
)
# signal-export's plain-text style: `[2021-12-31 22:15] ` or `[2021-12-31, 22:15] `.
SIGNAL_LINE = re.compile(r"\[(?P<date>\d{4}-\d{2}-\d{2}),? (?P<time>\d{1,2}:\d{2}(?::\d{2})?)\] (?P<rest>.*)")

# `Name: text`. A line with a timestamp but no `Name: ` is a system line ("You were added").
AUTHOR = re.compile(r"(?P<author>[^:\n]+?): (?P<text>.*)", re.S)
# System lines that do contain ": ", e.g. `Sam changed the subject from "Trip" to "Trip: day 2"`.
SYSTEM_HEAD = re.compile(r"[\"“”]| created group| changed (?:the|this) (?:subject|group)")
# Text that WhatsApp or signal-export writes in place of a message.
PLACEHOLDER = re.compile(
    r"<Media omitted>|<Medien ausgelassen>|<Multimedia omitido>|<Médias omis>|<attached: [^>]*>"
    r"|(?:image|video|audio|sticker|GIF|document|Contact card) omitted|.* \(file attached\)"
    r"|This message was deleted\.?|You deleted this message\.?|Missed (?:voice|video) call|null"
    r"|!\[[^\]]*\]\([^)]*\)",
    re.I,
)
EDITED = re.compile(r"\s*\u200e?<This message was edited>$")
# Direction marks and BOMs that exports scatter at line starts and around phone-number authors.
INVISIBLE = dict.fromkeys(map(ord, "\u200e\u200f\u202a\u202b\u202c\u202d\u202e\ufeff"))

LINE_EXAMPLE = {"whatsapp": "31/12/21, 22:15 - Name: text", "signal": "[2021-12-31 22:15] Name: text"}


def _entries(text: str, path: str, header: re.Pattern, fmt: str, stats: Counter) -> list[tuple[int, re.Match, str]]:
    """(line number, header match, full text) per entry; lines without a header continue the previous one."""
    entries: list[list] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        m = header.fullmatch(line.lstrip().translate(INVISIBLE))
        if m:
            entries.append([lineno, m, [m["rest"]]])
        elif entries:
            entries[-1][2].append(line)
        elif line.strip():
            stats["lines before the first message"] += 1
    if not entries:
        raise InputError(path, f"no {fmt} message lines found (expected lines like '{LINE_EXAMPLE[fmt]}')")
    return [(n, m, "\n".join(lines)) for n, m, lines in entries]


def _message(timestamp: datetime, rest: str, stats: Counter) -> Message | None:
    """A `Name: text` entry as a Message, or None (counted) for system lines, media and empty messages."""
    m = AUTHOR.match(rest)
    if m is None or SYSTEM_HEAD.search(m["author"]):
        stats["system lines"] += 1
        return None
    text = EDITED.sub("", m["text"].translate(INVISIBLE).strip())
    if PLACEHOLDER.fullmatch(text):
        stats["media or deleted"] += 1
        return None
    author = m["author"].translate(INVISIBLE).strip()
    if not text:
        stats["empty messages"] += 1
        return None
    return Message(timestamp, author, text)


def _clock(time: str, ampm: str | None) -> tuple[int, int, int]:
    h, mi, *s = (int(x) for x in re.split(r"[:.]", time))
    if ampm:
        h = h % 12 + (12 if ampm[0] in "pP" else 0)
    return h, mi, s[0] if s else 0


def date_order(dates: list[tuple[int, int, int]], twelve_hour: bool) -> str:
    """'ymd', 'dmy' or 'mdy' for a file's dates, each given as its three fields in written order.

    A four-digit first field is a year. Otherwise a field above 12 anywhere in the file settles which one
    is the day; when no date decides it, the order under which the file reads chronologically wins (exports
    are in time order), and a last tie goes to the US order for 12-hour clocks and day-first otherwise.
    """
    if dates and all(a >= 1000 for a, _, _ in dates):
        return "ymd"
    day_first = any(a > 12 for a, _, _ in dates)
    month_first = any(b > 12 for _, b, _ in dates)
    if day_first and month_first:
        raise ValueError("dates are written both day-first and month-first")
    if day_first or month_first:
        return "dmy" if day_first else "mdy"

    def inversions(order: str) -> int:
        keys = [(c, b, a) if order == "dmy" else (c, a, b) for a, b, c in dates]
        return sum(k2 < k1 for k1, k2 in zip(keys, keys[1:]))

    dmy, mdy = inversions("dmy"), inversions("mdy")
    if dmy != mdy:
        return "dmy" if dmy < mdy else "mdy"
    return "mdy" if twelve_hour else "dmy"


def parse_whatsapp(text: str, path: str = "<whatsapp>", stats: Counter | None = None) -> list[Message]:
    """A WhatsApp "Export chat" .txt; the day/month order is decided once per file from all its dates."""
    stats = stats if stats is not None else Counter()
    entries = _entries(text, path, WHATSAPP_LINE, "whatsapp", stats)
    fields = [tuple(int(x) for x in re.split(r"[./-]", m["date"])) for _, m, _ in entries]
    try:
        order = date_order(fields, twelve_hour=any(m["ampm"] for _, m, _ in entries))
    except ValueError as e:
        raise InputError(path, f"{e}; is this two exports in one file?") from None
    out = []
    for (lineno, m, rest), (a, b, c) in zip(entries, fields):
        y, mo, d = {"ymd": (a, b, c), "dmy": (c, b, a), "mdy": (c, a, b)}[order]
        try:
            ts = datetime(y + 2000 if y < 100 else y, mo, d, *_clock(m["time"], m["ampm"]))
        except ValueError as e:
            raise InputError(path, f"bad date or time {m['date']!r} {m['time']!r}: {e}", line=lineno) from None
        msg = _message(ts, rest, stats)
        if msg:
            out.append(msg)
    return out


def parse_signal(text: str, path: str = "<signal>", stats: Counter | None = None) -> list[Message]:
    """A signal-export plain-text chat: ISO dates in brackets, `Name: text`, multi-line messages."""
    stats = stats if stats is not None else Counter()
    out = []
    for lineno, m, rest in _entries(text, path, SIGNAL_LINE, "signal", stats):
        try:
            ts = datetime(*map(int, m["date"].split("-")), *_clock(m["time"], None))
        except ValueError as e:
            raise InputError(path, f"bad date or time: {e}", line=lineno) from None
        msg = _message(ts, rest, stats)
        if msg:
            out.append(msg)
    return out


# ------------------------------------------------------------------------------------------ JSON exports

def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).replace(tzinfo=None)


def telegram_text(text: Any) -> str:
    """Telegram's `text`: a string, or a list of strings and `{"type", "text"}` entities.

    Telegram writes the spaces between formatted pieces as plain strings; two formatted entities that
    touch (a bold label, then a link) are separate words, so they are joined with a space.
    """
    if isinstance(text, str):
        return text
    out, prev_entity = "", False
    for part in text if isinstance(text, list) else []:
        entity = isinstance(part, dict) and part.get("type", "plain") != "plain"
        piece = part.get("text", "") if isinstance(part, dict) else str(part)
        if entity and prev_entity and out and not out[-1].isspace() and piece[:1] and not piece[0].isspace():
            out += " "
        out += piece
        prev_entity = entity
    return out


def _telegram_chat(chat: dict, path: str, skips: Skips, stats: Counter) -> list[Message]:
    out = []
    for i, m in enumerate(chat["messages"]):
        if not isinstance(m, dict) or m.get("type", "message") != "message":
            stats["system lines"] += 1
            continue
        try:
            ts = _utc(int(m["date_unixtime"])) if "date_unixtime" in m else datetime.fromisoformat(m["date"])
        except (KeyError, TypeError, ValueError):
            skips.add("Telegram message without a readable date", f"{path} message {i}")
            continue
        author, text = m.get("from"), telegram_text(m.get("text", "")).strip()
        if not isinstance(author, str) or not author.strip():
            stats["messages without an author"] += 1
        elif not text:
            stats["media or deleted"] += 1
        else:
            out.append(Message(ts, author.strip(), text))
    return out


def parse_telegram(data: Any, path: str = "<telegram>", skips: Skips | None = None,
                   stats: Counter | None = None) -> dict[str, list[Message]]:
    """Telegram Desktop JSON: one chat (`messages`) or a full-account export (`chats.list`), chat -> messages."""
    skips = skips if skips is not None else Skips("message")
    stats = stats if stats is not None else Counter()
    if isinstance(data, dict) and isinstance(data.get("chats"), dict):
        chats = data["chats"].get("list")
    elif isinstance(data, dict) and isinstance(data.get("messages"), list):
        chats = [data]
    else:
        raise InputError(path, "not a Telegram Desktop export (no 'messages' list and no 'chats.list')")
    if not isinstance(chats, list):
        raise InputError(path, "Telegram export: 'chats.list' is not a list")
    out: dict[str, list[Message]] = {}
    for i, chat in enumerate(chats):
        if not isinstance(chat, dict) or not isinstance(chat.get("messages"), list):
            skips.add("Telegram chat without a 'messages' list", f"{path} chat {i}")
            continue
        name = str(chat.get("name") or chat.get("id") or f"chat {i}")
        out.setdefault(name, []).extend(_telegram_chat(chat, path, skips, stats))
    return out


def fix_mojibake(s: str) -> str:
    """Undo Instagram/Facebook's encoding: UTF-8 bytes written as one \\u00XX escape each ("Ã©" -> "é")."""
    try:
        return s.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return s


# Instagram's own notices in the content field.
INSTAGRAM_NOTICE = re.compile(
    r"Liked a message|Reacted .{1,8} to your message|.* sent an attachment\.|Unsent a message"
)


def parse_instagram(data: Any, path: str = "<instagram>", skips: Skips | None = None,
                    stats: Counter | None = None) -> list[Message]:
    """An Instagram DM export (`message_1.json`): sender_name, timestamp_ms, content, mojibake repaired."""
    skips = skips if skips is not None else Skips("message")
    stats = stats if stats is not None else Counter()
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise InputError(path, "not an Instagram export (no 'messages' list)")
    out = []
    for i, m in enumerate(data["messages"]):
        try:
            ts, author = _utc(m["timestamp_ms"] / 1000), fix_mojibake(m["sender_name"]).strip()
        except (KeyError, TypeError, AttributeError):
            skips.add("Instagram message without sender_name or timestamp_ms", f"{path} message {i}")
            continue
        content = m.get("content")
        text = fix_mojibake(content).strip() if isinstance(content, str) else ""
        if not text:
            stats["media or deleted"] += 1
        elif INSTAGRAM_NOTICE.fullmatch(text):
            stats["system lines"] += 1
        else:
            out.append(Message(ts, author, text))
    return out


# ------------------------------------------------------------------------------------- reading an export

def _json(path: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(path, f"invalid JSON: {e.msg}", line=e.lineno) from None


def _is_json(path: str, text: str) -> bool:
    """By extension or a leading `{`; a leading `[` is also WhatsApp's `[date, time]` style, so it is not enough."""
    return Path(path).suffix.lower() == ".json" or text.lstrip()[:1] == "{"


def detect_format(path: str, text: str, data: Any = None) -> str:
    """The format of an export from its content; InputError naming the file when it is none of ours."""
    if data is None and _is_json(path, text):
        data = _json(path, text)
    if data is not None:
        if isinstance(data, dict) and isinstance(data.get("chats"), dict):
            return "telegram"
        if isinstance(data, dict) and isinstance(data.get("messages"), list):
            first = next((m for m in data["messages"] if isinstance(m, dict)), {})
            if "sender_name" in first or "timestamp_ms" in first or "participants" in data:
                return "instagram"
            if "date" in first or "date_unixtime" in first or "type" in data:
                return "telegram"
    else:
        for line in text.splitlines()[:200]:
            line = line.lstrip().translate(INVISIBLE)
            if SIGNAL_LINE.fullmatch(line):
                return "signal"
            if WHATSAPP_LINE.fullmatch(line):
                return "whatsapp"
    raise InputError(path, "unknown chat export format: expected a WhatsApp or Signal .txt, a Telegram Desktop "
                           "result.json or an Instagram message_1.json (set `format:` if it is one of these)")


def read_export(path: str | Path, fmt: str = "auto", skips: Skips | None = None,
                stats: Counter | None = None) -> dict[str, list[Message]]:
    """Parse one export file into chat name -> messages (one chat unless it is a Telegram account export)."""
    skips = skips if skips is not None else Skips("message")
    stats = stats if stats is not None else Counter()
    path = str(path)
    text = read_text(path)
    if not text.strip():
        raise InputError(path, "file is empty")
    json_format = fmt in ("telegram", "instagram") or (fmt == "auto" and _is_json(path, text))
    data = _json(path, text) if json_format else None
    fmt = detect_format(path, text, data) if fmt == "auto" else fmt
    name = Path(path).name
    if fmt == "whatsapp":
        return {name: parse_whatsapp(text, path, stats)}
    if fmt == "signal":
        return {name: parse_signal(text, path, stats)}
    if fmt == "telegram":
        return parse_telegram(data, path, skips, stats)
    if fmt == "instagram":
        return {name: parse_instagram(data, path, skips, stats)}
    raise InputError(path, f"unknown format {fmt!r} (expected auto or one of {', '.join(FORMATS)})")


# ---------------------------------------------------------------------------------------- conversations

def _name_key(name: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


def conversations(messages: list[Message], me: str, gap_minutes: float, min_turns: int) -> list[list[tuple[str, str]]]:
    """Split a chat on pauses and turn each part into alternating (role, text) turns, `me` as gpt.

    A conversation starts with a human turn (what `me` said first has nothing to answer) and ends with a
    gpt turn (a last human message has no reply to learn from); shorter ones than `min_turns` are dropped.
    In a group chat everyone but `me` is the human side.
    """
    me_key, out, turns, last = _name_key(me), [], [], None

    def close() -> None:
        while turns and turns[0][0] == "gpt":
            turns.pop(0)
        while turns and turns[-1][0] == "human":
            turns.pop()
        if len(turns) >= min_turns:
            out.append([(role, "\n".join(texts)) for role, texts in turns])
        turns.clear()

    for m in sorted(messages, key=lambda m: m.timestamp):
        if last is not None and (m.timestamp - last).total_seconds() > gap_minutes * 60:
            close()
        last = m.timestamp
        role = "gpt" if _name_key(m.author) == me_key else "human"
        if turns and turns[-1][0] == role:
            turns[-1][1].append(m.text)
        else:
            turns.append((role, [m.text]))
    close()
    return out


@dataclass
class Imported:
    """The rows of all exports and what happened on the way, for the stage to log."""

    rows: list[dict] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    pii: Counter = field(default_factory=Counter)
    skips: Skips = field(default_factory=lambda: Skips("message"))


def import_export(path: str, fmt: str, me: str, gap_minutes: float, min_turns: int, scrub_pii: bool,
                  result: Imported) -> None:
    """One export's conversations as ShareGPT rows, added to `result`.

    `me` must be one of the export's authors: a misspelt name would silently make every message a human
    turn, so the error lists the names that are there.
    """
    chats = read_export(path, fmt, result.skips, result.counts)
    authors = Counter(m.author for msgs in chats.values() for m in msgs)
    result.counts["messages read"] += sum(authors.values())
    if not any(_name_key(a) == _name_key(me) for a in authors):
        found = ", ".join(f"{a!r} ({n})" for a, n in authors.most_common(10)) or "none"
        raise InputError(path, f"me: {me!r} is not an author in this export; authors found: {found}")
    seen = {row["id"] for row in result.rows}
    for msgs in chats.values():
        for turns in conversations(msgs, me, gap_minutes, min_turns):
            if scrub_pii:
                turns = [(role, scrub(text, result.pii)) for role, text in turns]
            row = make_row("messages", turns, export=Path(path).name)
            if row["id"] in seen:
                result.counts["duplicate conversations"] += 1
                continue
            problems = check_row(row)
            if problems:
                raise ValueError(f"{path}: built an invalid row: {problems}")
            seen.add(row["id"])
            result.rows.append(row)


def import_messages(cfg: Messages) -> Imported:
    """Every export in `messages.exports`, in order; identical conversations are kept once."""
    result = Imported()
    for export in cfg.exports:
        import_export(export.path, export.format, export.me, cfg.gap_minutes, cfg.min_turns, cfg.scrub_pii, result)
    return result
