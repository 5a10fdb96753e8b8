"""Chat exports (WhatsApp, Telegram, Signal, Instagram) -> ShareGPT conversations in the user's own voice.

Every parser reduces its format to the same `Message(timestamp, author, text)` records, grouped by chat.
Only what a person typed survives: system lines ("created group", "Messages and calls are end-to-end
encrypted"), media and attachment placeholders (`<Media omitted>`), stickers, polls, deleted messages and
forwarded messages are dropped and counted by reason (`ExportLog.dropped`), because a model that learns them
would answer "<Media omitted>" or speak in a newspaper's voice. Nothing is dropped without a count: the
import_messages stage writes the counts to its report and `persona-lm messages` prints them.

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
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

from persona_lm.data.pii import phone_regions, scrub
from persona_lm.data.sharegpt import check_row, make_row
from persona_lm.errors import InputError, Skips
from persona_lm.io import read_text
from persona_lm.params import Export, Messages

FORMATS = ("whatsapp", "telegram", "signal", "instagram")


@dataclass(frozen=True)
class Message:
    timestamp: datetime
    author: str
    text: str


# Why something was left out: the keys of the `dropped` counts in the report. Units are messages unless named.
SYSTEM = "system lines"
MEDIA = "media placeholders"
STICKER = "stickers"
DELETED = "deleted messages"
CALL = "calls"
POLL = "polls"
FORWARDED = "forwarded messages"
EMPTY = "empty messages"
NO_AUTHOR = "messages without an author"
SUPERSEDED = "earlier versions of edited messages"
PREAMBLE = "lines before the first message"
UNANSWERED = "own messages with nothing to answer"
NO_REPLY = "messages without a reply"
TOO_SHORT = "messages in conversations under min_turns"
DUPLICATE = "duplicate conversations"


@dataclass
class ExportLog:
    """What reading one export dropped (by reason), changed but kept, and said about its language."""

    dropped: Counter = field(default_factory=Counter)
    changed: Counter = field(default_factory=Counter)
    languages: Counter = field(default_factory=Counter)
    format: str = ""

    @property
    def language(self) -> str | None:
        """The language of WhatsApp's own texts in the export (ISO 639-1), None when it wrote none we know."""
        return self.languages.most_common(1)[0][0] if self.languages else None


# ------------------------------------------------------------------------------- WhatsApp's own texts

# What WhatsApp writes instead of a message, per app language (ISO 639-1), in the exact words of its exports.
# `{file}` stands for a file name (with an extension), `{any}` for any text on one line; a final "." (also inside `<...>`) is optional and case is ignored. A text
# is dropped only when it is one of these *as a whole* (a caption may follow an attachment on the next
# lines and is kept), so "the file got deleted" stays a message. Kinds: media, sticker, attachment, deleted,
# call (all dropped, counted under their reason), edited (a marker removed from the end of a kept message)
# and notice (part of the encryption notice, only used to tell the export's language).
# Compiled from real exports and from the tables of other open-source export readers; it cannot be complete:
# iOS writes every such text after a U+200E mark, so an unknown one is still dropped (as a system line),
# while on Android it would reach a turn, which the report's counts make visible; add it here then.
WHATSAPP_TEXTS: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {
        "media": ("<Media omitted>", "image omitted", "video omitted", "audio omitted", "GIF omitted",
                  "document omitted", "Contact card omitted", "<Video message omitted>", "video note omitted"),
        "sticker": ("sticker omitted",),
        "attachment": ("<attached: {file}>", "{file} (file attached)"),
        "deleted": ("This message was deleted", "You deleted this message"),
        "edited": ("<This message was edited>",),
        "call": ("Missed voice call", "Missed video call"),
        "notice": ("are end-to-end encrypted",),
    },
    "de": {
        "media": ("<Medien ausgeschlossen>", "<Medien weggelassen>", "<Medien ausgelassen>", "Bild weggelassen",
                  "Video weggelassen", "Audio weggelassen", "GIF weggelassen", "Dokument weggelassen",
                  "Kontaktkarte weggelassen"),
        "sticker": ("Sticker weggelassen",),
        "attachment": ("<Anhang: {file}>", "{file} (Datei angehängt)"),
        "deleted": ("Diese Nachricht wurde gelöscht", "Du hast diese Nachricht gelöscht"),
        "edited": ("<Diese Nachricht wurde bearbeitet>",),
        "call": ("Verpasster Sprachanruf", "Verpasster Videoanruf"),
        "notice": ("Ende-zu-Ende-verschlüsselt",),
    },
    "es": {
        "media": ("<Multimedia omitido>", "<Archivo omitido>", "imagen omitida", "video omitido", "audio omitido",
                  "GIF omitido", "documento omitido", "tarjeta de contacto omitida"),
        "sticker": ("sticker omitido",),
        "attachment": ("<adjunto: {file}>", "{file} (archivo adjunto)"),
        "deleted": ("Se eliminó este mensaje", "Eliminaste este mensaje", "Este mensaje fue eliminado"),
        "edited": ("<Se editó este mensaje>",),
        "call": ("Llamada perdida", "Videollamada perdida"),
        "notice": ("cifrados de extremo a extremo",),
    },
    "fr": {
        "media": ("<Médias omis>", "<Fichier omis>", "image omise", "image absente", "vidéo omise", "vidéo absente",
                  "audio omis", "GIF omis", "document omis"),
        "sticker": ("sticker omis", "autocollant omis"),
        "attachment": ("<pièce jointe : {file}>", "<pièce jointe: {file}>", "{file} (fichier joint)"),
        "deleted": ("Ce message a été supprimé", "Vous avez supprimé ce message"),
        "edited": ("<Ce message a été modifié>",),
        "call": ("Appel vocal manqué", "Appel vidéo manqué"),
        "notice": ("chiffrés de bout en bout",),
    },
    "pt": {
        "media": ("<Mídia oculta>", "<Arquivo de mídia oculto>", "<Mídia omitida>", "<Ficheiro não revelado>",
                  "<Multimédia omitido>", "imagem ocultada", "vídeo omitido", "áudio ocultado", "documento omitido"),
        "sticker": ("figurinha omitida",),
        "attachment": ("<anexado: {file}>", "{file} (arquivo anexado)", "{file} (ficheiro anexado)"),
        "deleted": ("Esta mensagem foi apagada", "Você apagou esta mensagem", "Mensagem apagada",
                    "Apagou esta mensagem"),
        "edited": ("<Mensagem editada>", "<Esta mensagem foi editada>"),
        "call": ("Chamada de voz perdida", "Chamada de vídeo perdida"),
        "notice": ("criptografia de ponta a ponta",),
    },
    "it": {
        "media": ("<Media omessi>", "<Media omesso>", "immagine omessa", "video omesso", "audio omesso",
                  "GIF esclusa", "GIF omessa", "documento omesso"),
        "sticker": ("sticker omesso",),
        "attachment": ("<allegato: {file}>", "{file} (file allegato)"),
        "deleted": ("Questo messaggio è stato eliminato", "Hai eliminato questo messaggio"),
        "edited": ("<Questo messaggio è stato modificato>",),
        "call": ("Chiamata vocale persa", "Videochiamata persa"),
        "notice": ("crittografati end-to-end",),
    },
    "nl": {
        "media": ("<Media weggelaten>", "afbeelding weggelaten", "video weggelaten", "audio weggelaten",
                  "GIF weggelaten", "document weggelaten"),
        "sticker": ("sticker weggelaten",),
        "attachment": ("<bijlage: {file}>", "{file} (bestand bijgevoegd)"),
        "deleted": ("Dit bericht is verwijderd", "Je hebt dit bericht verwijderd", "U hebt dit bericht verwijderd"),
        "edited": ("<Dit bericht is bewerkt>",),
        "call": ("Gemiste spraakoproep", "Gemiste video-oproep"),
        "notice": ("end-to-end versleuteld",),
    },
    "tr": {
        "media": ("<Medya dahil edilmedi>", "<Medya atlanmış>", "<Medya çıkarıldı>", "görüntü dahil edilmedi",
                  "video dahil edilmedi", "ses dahil edilmedi", "GIF dahil edilmedi", "belge dahil edilmedi"),
        "sticker": ("çıkartma dahil edilmedi",),
        "attachment": ("{file} (dosya ekli)", "{file} (dosya eklendi)"),
        "deleted": ("Bu mesaj silindi", "Bu mesajı sildiniz", "Bu mesajı sildin"),
        "edited": ("<Bu mesaj düzenlendi>",),
        "call": ("Cevapsız sesli arama", "Cevapsız görüntülü arama"),
        "notice": ("uçtan uca şifreli",),
    },
    "ru": {
        "media": ("<Без медиафайлов>", "<Медиафайл отсутствует>", "<Файл пропущен>", "изображение отсутствует",
                  "видео отсутствует", "аудио отсутствует", "GIF отсутствует", "документ отсутствует"),
        "sticker": ("стикер отсутствует",),
        "attachment": ("<вложение: {file}>", "{file} (файл добавлен)", "{file} (файл прикреплен)"),
        "deleted": ("Данное сообщение удалено", "Вы удалили данное сообщение", "Сообщение удалено",
                    "Вы удалили это сообщение"),
        "edited": ("<Сообщение изменено>",),
        "call": ("Пропущенный аудиозвонок", "Пропущенный видеозвонок"),
        "notice": ("сквозным шифрованием",),
    },
    "id": {
        "media": ("<Media tidak disertakan>", "gambar tidak disertakan", "video tidak disertakan",
                  "audio tidak disertakan", "GIF tidak disertakan", "dokumen tidak disertakan"),
        "sticker": ("stiker tidak disertakan",),
        "attachment": ("<terlampir: {file}>", "{file} (file terlampir)"),
        "deleted": ("Pesan ini telah dihapus", "Anda menghapus pesan ini"),
        "edited": ("<Pesan ini telah diedit>", "<Pesan ini diedit>"),
        "call": ("Panggilan suara tak terjawab", "Panggilan video tak terjawab"),
        "notice": ("terenkripsi secara end-to-end",),
    },
    "hi": {
        "media": ("<मीडिया के बिना>", "<मीडिया हटाया गया>"),
        "attachment": ("{file} (फ़ाइल संलग्न है)",),
        "deleted": ("यह मैसेज हटा दिया गया था", "आपने यह मैसेज हटा दिया"),
        "edited": ("<यह मैसेज एडिट किया गया था>",),
        "notice": ("एंड-टू-एंड एन्क्रिप्टेड",),
    },
    # Written the same in every language: Android's view-once media, signal-export's attachments.
    "any": {"media": ("null", "![{any}]({any})")},
}

WHATSAPP_REASONS = {"media": MEDIA, "attachment": MEDIA, "sticker": STICKER, "deleted": DELETED, "call": CALL}


def _alternatives(texts: tuple[str, ...]) -> str:
    out = []
    for text in texts:
        close = ">" if text.endswith(">") else ""
        body = re.escape(text[:-1] if close else text)
        body = body.replace(re.escape("{file}"), r"[^<>\n]+?\.\w{1,5}").replace(re.escape("{any}"), r"[^\n]*?")
        out.append(body + r"\.?" + close)
    return "|".join(out)


def _compile(kind: str) -> re.Pattern:
    """One pattern per kind, a named group per language, so a match also says which language it is."""
    groups = [f"(?P<{lang}>{_alternatives(kinds[kind])})" for lang, kinds in WHATSAPP_TEXTS.items() if kind in kinds]
    return re.compile("|".join(groups), re.IGNORECASE)


PLACEHOLDERS = {kind: _compile(kind) for kind in WHATSAPP_REASONS}
EDITED = re.compile(r"\s*(?:" + _compile("edited").pattern + r")$", re.IGNORECASE)
NOTICE = _compile("notice")


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

# `Name: text`. A line with a timestamp but no `Name: ` is a system line (Android: "You were added").
AUTHOR = re.compile(r"(?P<author>[^:\n]+?): (?P<text>.*)", re.S)
# Android system lines that do contain ": ", e.g. `Sam changed the subject from "Trip" to "Trip: day 2"`:
# what stands before the colon then holds a quotation mark (any language's) or an English notice.
SYSTEM_HEAD = re.compile(r"[\"“”„«»‹›「」]| created group| changed (?:the|this) (?:subject|group)")
# iOS writes every text of its own (notices, placeholders) after this mark, whoever it names as the author.
OWN_TEXT_MARK = "\u200e"
# Direction marks and BOMs that exports scatter at line starts and around phone-number authors.
INVISIBLE = dict.fromkeys(map(ord, "\u200e\u200f\u202a\u202b\u202c\u202d\u202e\ufeff"))
_LEADING = " \t\u200e\u200f\u202a\u202b\u202c\u202d\u202e\ufeff"

LINE_EXAMPLE = {"whatsapp": "31/12/21, 22:15 - Name: text", "signal": "[2021-12-31 22:15] Name: text"}


def _entries(text: str, path: str, header: re.Pattern, fmt: str, log: ExportLog) -> list[tuple[int, re.Match, str]]:
    """(line number, header match, full text) per entry; lines without a header continue the previous one."""
    entries: list[list] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        head = line.lstrip(_LEADING)
        m = header.fullmatch(head) or header.fullmatch(head.translate(INVISIBLE))
        if m:
            entries.append([lineno, m, [m["rest"]]])
        elif entries:
            entries[-1][2].append(line)
        elif line.strip():
            log.dropped[PREAMBLE] += 1
    if not entries:
        raise InputError(path, f"no {fmt} message lines found (expected lines like '{LINE_EXAMPLE[fmt]}')")
    return [(n, m, "\n".join(lines)) for n, m, lines in entries]


def _vote(m: re.Match | None, log: ExportLog) -> None:
    if m is not None and m.lastgroup != "any":
        log.languages[m.lastgroup] += 1


def whatsapp_text(raw: str, log: ExportLog) -> str | None:
    """What a person typed in one message's text, or None (counted in `log`) when WhatsApp wrote it.

    A placeholder must be the whole text; an attachment's or media line's caption on the following lines
    is kept as the message. The edit marker is removed from the end. On iOS a text starting with U+200E is
    WhatsApp's own whatever the words, so a notice in any language is a system line.
    """
    own = raw.lstrip(" ").startswith(OWN_TEXT_MARK)
    text = raw.translate(INVISIBLE).strip()
    edited = EDITED.search(text)
    if edited:
        _vote(edited, log)
        text = text[: edited.start()].rstrip()
        log.changed["edit markers removed"] += 1
    first, _, caption = text.partition("\n")
    for kind, pattern in PLACEHOLDERS.items():
        whole = pattern.fullmatch(text)
        head = pattern.fullmatch(first) if kind in ("media", "attachment") and caption.strip() else None
        if whole or head:
            _vote(whole or head, log)
            if head:
                log.changed["captions kept from attachment lines"] += 1
                return caption.strip()
            log.dropped[WHATSAPP_REASONS[kind]] += 1
            return None
    if own:
        _vote(NOTICE.search(text), log)
        log.dropped[SYSTEM] += 1
        return None
    if not text:
        log.dropped[EMPTY] += 1
        return None
    return text


def _message(timestamp: datetime, rest: str, log: ExportLog) -> Message | None:
    """A `Name: text` entry as a Message, or None (counted) for system lines and WhatsApp's own texts."""
    m = AUTHOR.match(rest)
    if m is None or SYSTEM_HEAD.search(m["author"]):
        _vote(NOTICE.search(rest), log)
        log.dropped[SYSTEM] += 1
        return None
    text = whatsapp_text(m["text"], log)
    return Message(timestamp, m["author"].translate(INVISIBLE).strip(), text) if text else None


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


def parse_whatsapp(text: str, path: str = "<whatsapp>", log: ExportLog | None = None) -> list[Message]:
    """A WhatsApp "Export chat" .txt; the day/month order is decided once per file from all its dates."""
    log = log if log is not None else ExportLog()
    entries = _entries(text, path, WHATSAPP_LINE, "whatsapp", log)
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
        msg = _message(ts, rest, log)
        if msg:
            out.append(msg)
    return out


def parse_signal(text: str, path: str = "<signal>", log: ExportLog | None = None) -> list[Message]:
    """A signal-export plain-text chat: ISO dates in brackets, `Name: text`, multi-line messages."""
    log = log if log is not None else ExportLog()
    out = []
    for lineno, m, rest in _entries(text, path, SIGNAL_LINE, "signal", log):
        try:
            ts = datetime(*map(int, m["date"].split("-")), *_clock(m["time"], None))
        except ValueError as e:
            raise InputError(path, f"bad date or time: {e}", line=lineno) from None
        msg = _message(ts, rest, log)
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


# Keys of a Telegram Desktop message that carry something other than text (a caption may come with them).
TELEGRAM_MEDIA = ("photo", "file", "media_type", "location_information", "contact_information", "game_title")


def telegram_drop_reason(m: dict, text: str) -> str | None:
    """Why a Telegram message (type "message") is not the author's own words, or None when it is.

    A forwarded message (`forwarded_from`) is someone else's text, even when `me` forwarded it.
    """
    if "forwarded_from" in m:
        return FORWARDED
    if "poll" in m:
        return POLL
    if m.get("media_type") == "sticker":
        return STICKER
    if not isinstance(m.get("from"), str) or not m["from"].strip():
        return NO_AUTHOR
    if not text:
        return MEDIA if any(k in m for k in TELEGRAM_MEDIA) else EMPTY
    return None


def _telegram_chat(chat: dict, where: str, skips: Skips, log: ExportLog) -> list[Message]:
    out = []
    for i, m in enumerate(chat["messages"]):
        if not isinstance(m, dict) or m.get("type", "message") != "message":
            log.dropped[SYSTEM] += 1  # "service" messages: joined, pinned, called, changed the title
            continue
        try:
            ts = _utc(int(m["date_unixtime"])) if "date_unixtime" in m else datetime.fromisoformat(m["date"])
        except (KeyError, TypeError, ValueError):
            skips.add("Telegram message without a readable date", f"{where} message {i}")
            continue
        text = telegram_text(m.get("text", "")).strip()
        reason = telegram_drop_reason(m, text)
        if reason:
            log.dropped[reason] += 1
        else:
            out.append(Message(ts, m["from"].strip(), text))
    return out


def parse_telegram(data: Any, path: str = "<telegram>", skips: Skips | None = None,
                   log: ExportLog | None = None) -> dict[str, list[Message]]:
    """Telegram Desktop JSON, chat name -> messages: one chat (`messages`) or a full-account export.

    A full-account export lists the chats under `chats.list` and the groups and channels the user has
    left under `left_chats.list`; both are read (what was said there is still the user's voice).
    """
    skips = skips if skips is not None else Skips("message")
    log = log if log is not None else ExportLog()
    if isinstance(data, dict) and isinstance(data.get("chats"), dict):
        chats = data["chats"].get("list")
        left = data["left_chats"].get("list", []) if isinstance(data.get("left_chats"), dict) else []
    elif isinstance(data, dict) and isinstance(data.get("messages"), list):
        chats, left = [data], []
    else:
        raise InputError(path, "not a Telegram Desktop export (no 'messages' list and no 'chats.list')")
    if not isinstance(chats, list) or not isinstance(left, list):
        raise InputError(path, "Telegram export: 'chats.list' or 'left_chats.list' is not a list")
    out: dict[str, list[Message]] = {}
    for kind, listed in (("chat", chats), ("left chat", left)):
        for i, chat in enumerate(listed):
            where = f"{path} {kind} {i}"
            if not isinstance(chat, dict) or not isinstance(chat.get("messages"), list):
                skips.add("Telegram chat without a 'messages' list", where)
                continue
            if kind == "left chat":
                log.changed["left chats read"] += 1
            name = str(chat.get("name") or chat.get("id") or where)
            out.setdefault(name, []).extend(_telegram_chat(chat, where, skips, log))
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
# An edited message is exported twice: as first sent, and at the time of the edit with this marker.
INSTAGRAM_EDITED = re.compile(r"\s*\(edited\)$")
EDIT_WINDOW = timedelta(minutes=15)  # how long Instagram lets a message be edited after it was sent
EDIT_SIMILARITY = 0.5  # an edit keeps most of the text; a less similar earlier message is another message


def merge_instagram_edits(messages: list[Message], log: ExportLog) -> list[Message]:
    """Each edited message once, at the time it was sent, with its final text and without "(edited)".

    The original is the sender's most similar message (difflib ratio >= EDIT_SIMILARITY) sent in the
    EDIT_WINDOW before the edit; without one, the edited copy stays where it is, its marker removed.
    """
    out: list[Message] = []
    for m in sorted(messages, key=lambda m: m.timestamp):
        text, edited = INSTAGRAM_EDITED.subn("", m.text)
        if not edited:
            out.append(m)
            continue
        log.changed["edit markers removed"] += 1
        best, best_ratio = None, EDIT_SIMILARITY
        for i in range(len(out) - 1, -1, -1):
            if m.timestamp - out[i].timestamp > EDIT_WINDOW:
                break
            if out[i].author == m.author:
                ratio = SequenceMatcher(None, out[i].text, text).ratio()
                if ratio >= best_ratio:
                    best, best_ratio = i, ratio
        if best is None:
            out.append(replace(m, text=text))
        else:
            out[best] = replace(out[best], text=text)
            log.dropped[SUPERSEDED] += 1
    return out


def parse_instagram(data: Any, path: str = "<instagram>", skips: Skips | None = None,
                    log: ExportLog | None = None) -> list[Message]:
    """An Instagram DM export (`message_1.json`): sender_name, timestamp_ms, content, mojibake repaired."""
    skips = skips if skips is not None else Skips("message")
    log = log if log is not None else ExportLog()
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
            log.dropped[MEDIA if any(k in m for k in ("photos", "videos", "audio_files", "files", "share",
                                                        "sticker", "gifs")) else EMPTY] += 1
        elif INSTAGRAM_NOTICE.fullmatch(text):
            log.dropped[SYSTEM] += 1
        else:
            out.append(Message(ts, author, text))
    return merge_instagram_edits(out, log)


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
            line = line.lstrip(_LEADING).translate(INVISIBLE)
            if SIGNAL_LINE.fullmatch(line):
                return "signal"
            if WHATSAPP_LINE.fullmatch(line):
                return "whatsapp"
    raise InputError(path, "unknown chat export format: expected a WhatsApp or Signal .txt, a Telegram Desktop "
                           "result.json or an Instagram message_1.json (set `format:` if it is one of these)")


def read_export(path: str | Path, fmt: str = "auto", skips: Skips | None = None,
                log: ExportLog | None = None) -> dict[str, list[Message]]:
    """Parse one export file into chat name -> messages (one chat unless it is a Telegram account export).

    What was dropped, and the language WhatsApp wrote its own texts in, go to `log`.
    """
    skips = skips if skips is not None else Skips("message")
    log = log if log is not None else ExportLog()
    path = str(path)
    text = read_text(path)
    if not text.strip():
        raise InputError(path, "file is empty")
    json_format = fmt in ("telegram", "instagram") or (fmt == "auto" and _is_json(path, text))
    data = _json(path, text) if json_format else None
    fmt = detect_format(path, text, data) if fmt == "auto" else fmt
    log.format = fmt
    name = Path(path).name
    if fmt == "whatsapp":
        return {name: parse_whatsapp(text, path, log)}
    if fmt == "signal":
        return {name: parse_signal(text, path, log)}
    if fmt == "telegram":
        return parse_telegram(data, path, skips, log)
    if fmt == "instagram":
        return {name: parse_instagram(data, path, skips, log)}
    raise InputError(path, f"unknown format {fmt!r} (expected auto or one of {', '.join(FORMATS)})")


# ---------------------------------------------------------------------------------------- conversations

def _name_key(name: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


def conversations(messages: list[Message], me: str, gap_minutes: float, min_turns: int,
                  dropped: Counter | None = None) -> list[list[tuple[str, str]]]:
    """Split a chat on pauses and turn each part into alternating (role, text) turns, `me` as gpt.

    A conversation starts with a human turn (what `me` said first has nothing to answer) and ends with a
    gpt turn (a last human message has no reply to learn from); shorter ones than `min_turns` are dropped.
    In a group chat everyone but `me` is the human side. The messages left out are added to `dropped`.
    """
    dropped = dropped if dropped is not None else Counter()
    me_key, out, turns, last = _name_key(me), [], [], None

    def close() -> None:
        while turns and turns[0][0] == "gpt":
            dropped[UNANSWERED] += len(turns.pop(0)[1])
        while turns and turns[-1][0] == "human":
            dropped[NO_REPLY] += len(turns.pop()[1])
        if len(turns) >= min_turns:
            out.append([(role, "\n".join(texts)) for role, texts in turns])
        elif turns:
            dropped[TOO_SHORT] += sum(len(texts) for _, texts in turns)
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
    """The rows of all exports and what happened on the way: the import report of stage and command alike."""

    rows: list[dict] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    changed: Counter = field(default_factory=Counter)
    pii: Counter = field(default_factory=Counter)
    skips: Skips = field(default_factory=lambda: Skips("message"))
    exports: list[dict] = field(default_factory=list)

    def report(self) -> dict:
        """Counts for reports/validation/messages.json: per export and in total, drops by reason."""
        return {"conversations": len(self.rows), "messages_read": sum(e["messages_read"] for e in self.exports),
                "dropped": dict(sorted(self.dropped.items())), "changed": dict(sorted(self.changed.items())),
                "pii_replaced": dict(sorted(self.pii.items())), "skipped": self.skips.as_dict(),
                "exports": self.exports}

    def summary(self) -> list[str]:
        """The report as lines for a person: what was read, dropped (by reason), changed and replaced."""
        lines = [f"{e['path']}: {e['format']}, {e['chats']} chat(s), {e['messages_read']} messages read, "
                 f"{e['conversations']} conversations; language {e['language'] or 'unknown'}; "
                 f"phone regions {','.join(e['phone_regions']) or 'none (scrubbing off)'}" for e in self.exports]
        for title, counts in (("dropped", self.dropped), ("changed", self.changed), ("PII replaced", self.pii),
                              ("skipped as malformed", self.skips.counts)):
            if counts:
                lines.append(f"{title}: " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())))
        return lines


def import_export(export: Export, cfg: Messages, result: Imported) -> None:
    """One export's conversations as ShareGPT rows, added to `result` with its counts.

    `me` must be one of the export's authors: a misspelt name would silently make every message a human
    turn, so the error lists the names that are there. Phone numbers are looked for in the national formats
    of `export.region`, else `cfg.region`, else the regions of the language WhatsApp wrote the export in.
    """
    log = ExportLog()
    chats = read_export(export.path, export.format, result.skips, log)
    authors = Counter(m.author for msgs in chats.values() for m in msgs)
    if not any(_name_key(a) == _name_key(export.me) for a in authors):
        found = ", ".join(f"{a!r} ({n})" for a, n in authors.most_common(10)) or "none"
        raise InputError(export.path, f"me: {export.me!r} is not an author in this export; authors found: {found}")
    regions = phone_regions(export.region or cfg.region, log.language) if cfg.scrub_pii else ()
    seen, added = {row["id"] for row in result.rows}, 0
    for msgs in chats.values():
        for turns in conversations(msgs, export.me, cfg.gap_minutes, cfg.min_turns, log.dropped):
            if cfg.scrub_pii:
                turns = [(role, scrub(text, result.pii, regions)) for role, text in turns]
            row = make_row("messages", turns, export=Path(export.path).name)
            if row["id"] in seen:
                log.dropped[DUPLICATE] += 1
                continue
            problems = check_row(row)
            if problems:
                raise ValueError(f"{export.path}: built an invalid row: {problems}")
            seen.add(row["id"])
            result.rows.append(row)
            added += 1
    result.dropped.update(log.dropped)
    result.changed.update(log.changed)
    result.exports.append({"path": export.path, "format": log.format, "chats": len(chats),
                           "messages_read": sum(authors.values()), "conversations": added,
                           "language": log.language, "phone_regions": list(regions),
                           "dropped": dict(sorted(log.dropped.items()))})


def import_messages(cfg: Messages) -> Imported:
    """Every export in `messages.exports`, in order; identical conversations are kept once.

    The import_messages stage and `persona-lm messages` both call this, so the command shows exactly the
    rows and counts the stage would produce.
    """
    result = Imported()
    for export in cfg.exports:
        import_export(export, cfg, result)
    return result
