"""Caption files (YouTube auto-captions, manual VTT, SRT) -> clean timed transcripts -> ShareGPT conversations.

Reading. webvtt-py parses the cue blocks; real files need a little help around it. A file without the
leading `WEBVTT` line gets one. A live-stream capture made of HLS segments glued together (mid-file `WEBVTT`
and `X-TIMESTAMP-MAP` headers) is parsed segment by segment, each placed on the stream clock (MPEG-TS ticks at
90 kHz), and wherever the clock still jumps back the rest is laid end to end after what came before, so
times always run forward. Hours past 24 are ordinary hours. Overlapping cues (SRT) are told one after the
other. A cue timing webvtt-py would silently skip (a typo, a truncated file) and a cue that starts before
the one above it are errors naming the line.

Rolling captions. YouTube's ASR captions scroll: each cue repeats the line(s) above its new one, and a 10 ms
"freeze" cue repeats the finished line. A cue's new text is what is left after its leading lines that equal
the previous cue's trailing lines; live captions may instead extend the last line in place, even inside a
word, which then gets completed where it was first written. This is decided cue by cue against the previous
cue only, never against everything seen so far, so a speaker who says the same words twice keeps both. A file
counts as rolling only when more cues push the previous cue's last line up (or extend it) than drop it;
manual captions, where a cue that repeats the last one is someone saying it again, are taken as written.

Cleaning. Tags (`<00:00:01.234>`, `<c>`, nested `<c.colorE5E5E5>`) are stripped, entities decoded, and
annotations in brackets or parentheses (`[Music]`, `[ __ ]`, `(upbeat music)`) and music notes dropped.
A change of speaker (`>>`, or a leading `- ` in manual captions) stays in the cue text as a `>>` token.
Inline word timings are kept per word when they fall inside their cue.

Utterances. A new utterance starts after sentence-final punctuation, at a change of speaker and after a
pause of at least `pause_s`: the gap between two cues or, since auto-caption cues touch, between the start
times of consecutive words. An utterance that reaches `max_utterance_words` (unpunctuated lowercase ASR
that never pauses) is cut at the longest pause in its second half.

Conversations. The speaker's words are the gpt side. Each utterance is a turn, joined with the next while
it has fewer than `min_reply_words` words; a `>>` always starts a new turn. Consecutive turns alternate
human and gpt, so where the captions mark speakers a reply answers what the other person said, and in a
monologue the previous utterance is the prompt and what the speaker says next the reply. A conversation
holds up to `turns_per_conversation` turns (an even number, ending on gpt); a gpt turn shorter than
`min_reply_words` (only possible before a `>>`) ends the conversation before its prompt and becomes the
prompt of the next one. Every utterance is used at most once.
"""

from __future__ import annotations

import html
import re
from bisect import bisect_right
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import webvtt
from webvtt.errors import MalformedCaptionError, MalformedFileError

from persona_lm.data.sharegpt import make_row
from persona_lm.errors import InputError
from persona_lm.io import read_json, read_text
from persona_lm.params import Segment

SUFFIXES = (".vtt", ".srt")
LINE_BREAK = re.compile(r"\r\n|\r|\n")
TIMING = re.compile(
    r"\s*((?:\d+:)?[0-5]?\d:[0-5]?\d[.,]\d{1,3})\s*-->\s*((?:\d+:)?[0-5]?\d:[0-5]?\d[.,]\d{1,3})(?=\s|$)"
)
TIMING_TYPO = re.compile(r"\s*(?:\d+:)?\d{1,2}:\d{2}[.,]\d+\s*[-–—=]+>?")  # `00:01.000 -> ...`
TAG = re.compile(r"<[^>]*>")
STYLE_TAG = re.compile(r"<(?!\d)[^>]*>")  # every tag but an inline timestamp
TIMESTAMP_TAG = re.compile(r"<((?:\d+:)?\d{1,2}:\d{2}\.\d{1,3})>")
WORD = re.compile(r"\S+")
MPEGTS_HZ = 90_000
SENTENCE_END = re.compile(r"[.!?…]['\"”’)\]]*$")
ABBREVIATIONS = {"mr.", "mrs.", "ms.", "dr.", "st.", "vs.", "etc.", "e.g.", "i.e.", "jr.", "sr.", "prof."}
NOTES = str.maketrans("", "", "♪♫♬")
SPEAKER = ">>"


class NoCaptions(InputError):
    """A file with nothing to read (empty, binary, no cues, only annotations): skipped, not an error."""


@dataclass(frozen=True, slots=True)
class Cue:
    """Clean new text of one source cue; `word_times[i]` is when word i of `text` starts (None = unknown)."""

    start: float
    end: float
    text: str
    word_times: tuple[float | None, ...] = ()


@dataclass(frozen=True, slots=True)
class Utterance:
    """A stretch of speech; `new_speaker` after a `>>`, `after_pause` after a silence of `pause_s` or more."""

    start: float
    end: float
    text: str
    new_speaker: bool = False
    after_pause: bool = False


# ------------------------------------------------------------------------------------------------ reading

@dataclass(slots=True)
class _Raw:
    start: float
    end: float
    lines: list[str]   # payload lines with their tags
    offset: float      # added to inline timestamps, which live on the segment's own clock


def _seconds(stamp: str) -> float:
    parts = stamp.replace(",", ".").split(":")
    return sum(float(p) * 60 ** i for i, p in enumerate(reversed(parts)))


def _scan_timings(path, lines: list[str], header_at: set[int]) -> list[str]:
    """Check every line with `-->` (or a near miss) is a cue timing and cues never go back within a segment.

    webvtt-py silently drops a block it cannot read, which would hide a truncated or hand-edited file.
    Returns the lines with cue settings (`align:start position:0%`) removed: we never use them, and
    parsing them is a good part of webvtt-py's time on a large file.
    """
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    out = list(lines)
    prev = None
    for i, line in enumerate(lines):
        if i in header_at:
            prev = None
        if "-->" not in line and not TIMING_TYPO.match(line):
            continue
        m = TIMING.match(line)
        if not m:
            hint = " (the file looks truncated)" if i == last else ""
            raise InputError(path, f"malformed cue timing {line.strip()!r}{hint}", line=i + 1)
        start = _seconds(m.group(1))
        if prev is not None and start < prev:
            raise InputError(path, f"cues out of order: this cue starts at {m.group(1)}, before the one above",
                             line=i + 1)
        prev = start
        out[i] = f"{m.group(1)} --> {m.group(2)}"
    return out


def _segment_clock(metadata: list[str]) -> float | None:
    """`X-TIMESTAMP-MAP=LOCAL:00:00.000,MPEGTS:900000` -> the stream time of the segment's local zero."""
    for line in metadata:
        if line.startswith("X-TIMESTAMP-MAP="):
            fields = dict(f.split(":", 1) for f in line.split("=", 1)[1].split(",") if ":" in f)
            try:
                return int(fields["MPEGTS"]) / MPEGTS_HZ - _seconds(fields.get("LOCAL", "0:0.0"))
            except (KeyError, ValueError):
                return None
    return None


def _read_vtt(path, lines: list[str], header_at: list[int]) -> list[_Raw]:
    starts = ([0] if 0 not in header_at else []) + header_at
    raws: list[_Raw] = []
    shift, zero = 0.0, None  # zero: the stream clock of the first segment that has one
    for a, b in zip(starts, starts[1:] + [len(lines)]):
        piece = lines[a:b]
        if not piece[0].startswith("WEBVTT"):
            piece = ["WEBVTT", ""] + piece
        try:
            vtt = webvtt.from_buffer(piece)
        except (MalformedFileError, MalformedCaptionError) as e:
            raise InputError(path, f"unreadable WebVTT: {e}", line=a + 1) from None
        if not vtt.captions:
            continue
        clock = _segment_clock(vtt.metadata)
        if clock is not None and zero is None:
            zero = clock
        offset = 0.0 if clock is None else clock - zero
        first = vtt.captions[0].start_time.in_milliseconds() / 1000 + offset + shift
        if raws and first < raws[-1].start:
            shift += raws[-1].end - first
        for c in vtt.captions:
            s = c.start_time.in_milliseconds() / 1000 + offset + shift
            e = c.end_time.in_milliseconds() / 1000 + offset + shift
            raws.append(_Raw(s, max(s, e), c.lines, offset + shift))
    return raws


def _read_srt(path, lines: list[str]) -> list[_Raw]:
    numbered: list[str] = []
    for line in lines:
        if "-->" in line and not (numbered and numbered[-1].strip().isdigit()):
            numbered.append("0")  # cue numbers are optional in practice; webvtt-py needs them
        if line.strip() or numbered:
            numbered.append(line)
    try:
        captions = webvtt.from_buffer(numbered, format="srt").captions
    except (MalformedFileError, MalformedCaptionError) as e:
        raise InputError(path, f"unreadable SRT: {e}") from None
    raws = []
    for c in captions:
        s, e = c.start_time.in_milliseconds() / 1000, c.end_time.in_milliseconds() / 1000
        raws.append(_Raw(s, max(s, e), c.lines, 0.0))
    return raws


def _is_srt(path: Path, lines: list[str]) -> bool:
    head = next((line for line in lines if line.strip()), "")
    if head.startswith("WEBVTT"):
        return False
    if path.suffix.lower() == ".srt":
        return True
    m = next((TIMING.match(line) for line in lines[:50] if "-->" in line), None)
    return bool(m and "," in m.group(1))


def read_transcript(path: str | Path) -> list[Cue]:
    """The clean transcript of a VTT or SRT file: one Cue per source cue that says something new.

    Raises NoCaptions for a file with nothing to read, and InputError (with the line) for a broken one.
    """
    path = Path(path)
    try:
        text = read_text(path)
    except InputError as e:
        if e.reason.startswith("binary"):
            raise NoCaptions(path, e.reason) from None
        raise
    if not text.strip():
        raise NoCaptions(path, "empty file")
    lines = LINE_BREAK.split(text)
    srt = _is_srt(path, lines)
    header_at = [] if srt else [i for i, line in enumerate(lines)
                                if line.startswith("WEBVTT") and (i == 0 or not lines[i - 1].strip())]
    lines = _scan_timings(path, lines, set(header_at))
    raws = _read_srt(path, lines) if srt else _read_vtt(path, lines, header_at)
    if not raws:
        raise NoCaptions(path, "no cues")
    cues = _merge(raws)
    if not cues:
        raise NoCaptions(path, "no speech (only empty cues or annotations)")
    return cues


# ----------------------------------------------------------------------------------------------- cleaning

@dataclass(frozen=True, slots=True)
class _Line:
    """One cleaned payload line: its words and each word's inline start time (None = untimed)."""

    words: tuple[str, ...]
    times: tuple[float | None, ...]


def _tag_seconds(stamp: str) -> float:
    *h, m, s = stamp.split(":")
    return int(h[0] if h else 0) * 3600 + int(m) * 60 + float(s)


def _clean(text: str) -> str:
    """Strip any tag left, decode entities, set `>>` apart as a word of its own."""
    if "<" in text:
        text = TAG.sub("", text)
    if "&" in text:
        text = html.unescape(text)
    if ">" in text:
        text = text.replace(SPEAKER, f" {SPEAKER} ")
    return text


def _speaker_dash(words: tuple[str, ...]) -> tuple[str, ...]:
    return (SPEAKER,) + words[1:] if words and words[0] in ("-", "–") else words


@lru_cache(maxsize=8192)
def _untimed(raw: str) -> _Line:
    words = _speaker_dash(tuple(_clean(raw).split()))
    return _Line(words, (None,) * len(words))


def _line(raw: str, cue: _Raw) -> _Line:
    """A payload line. Style tags go first (they never separate words); text before the first inline
    timestamp starts with the cue."""
    parts = TIMESTAMP_TAG.split(STYLE_TAG.sub("", raw)) if "<" in raw else [raw]
    if len(parts) == 1:
        return _untimed(parts[0])
    stamps = [cue.start] + [_tag_seconds(t) + cue.offset for t in parts[1::2]]
    if stamps != sorted(stamps) or stamps[-1] > cue.end + 0.05:
        return _untimed("".join(parts[0::2]))  # timestamps on some other clock: not usable
    texts = [_clean(t) for t in parts[0::2]]
    offsets, pos = [], 0
    for t in texts:
        offsets.append(pos)
        pos += len(t)
    full = "".join(texts)  # a word split by a tag (`wi<00:00:01.000><c>th`) joins up again here
    words, times = [], []
    for m in WORD.finditer(full):
        words.append(m.group())
        times.append(stamps[bisect_right(offsets, m.start()) - 1])
    return _Line(_speaker_dash(tuple(words)), tuple(times))


def _lines(cue: _Raw) -> list[_Line]:
    """Cleaned payload lines; trailing blank lines dropped, leading ones kept (they hold a rolling position)."""
    lines = [_line(raw, cue) for raw in cue.lines]
    while lines and not lines[-1].words:
        lines.pop()
    return lines


def _drop_annotations(words: list[str], times: list) -> tuple[list[str], list]:
    """Drop `[...]` / `(...)` spans of at most 8 words and music notes; an unclosed bracket stays text."""
    if not any(w[0] in "[(♪♫♬" or w[-1] in "♪♫♬" for w in words):
        return words, times
    out_w, out_t, i = [], [], 0
    while i < len(words):
        w = words[i]
        if w[0] in "[(":
            close = "]" if w[0] == "[" else ")"
            end = next((j for j in range(i, min(i + 8, len(words)))
                        if words[j].rstrip(".,!?;:").endswith(close)), None)
            if end is not None:
                i = end + 1
                continue
        w = w.translate(NOTES)
        if w:
            out_w.append(w)
            out_t.append(times[i])
        i += 1
    return out_w, out_t


# -------------------------------------------------------------------------------------------- rolling merge

def _is_rolling(lines: list[list[_Line]]) -> bool:
    """The display scrolls: more cues push the previous cue's last line up (or extend it) than drop it.

    A cue that merely shows that line again (a freeze cue, a chorus) is no evidence either way.
    """
    score = 0
    for prev, cur in zip(lines, lines[1:]):
        if not prev or not cur:
            continue
        p = prev[-1].words
        if any(x.words == p for x in cur[:-1]) or any(len(x.words) > len(p) and x.words[:len(p)] == p for x in cur):
            score += 1
        elif cur[-1].words != p:
            score -= 1
    return score > 0


def _grown(old: tuple[str, ...], new: tuple[str, ...], partial: bool) -> bool:
    """`new` extends `old` (a live caption line filling in); with `partial`, old's last word may be cut off."""
    n = len(old)
    if len(new) < n or new[:n - 1] != old[:n - 1]:
        return False
    return new[n - 1] == old[-1] or (partial and new[n - 1].startswith(old[-1]))


def _new_part(prev: list[_Line], cur: list[_Line]) -> tuple[list[_Line], str | None]:
    """The lines of `cur` not already on screen in `prev`, largest overlap first.

    Also returns the completed word when the overlap ended inside a word (`appointment` -> `appointment,`),
    so the caller can finish it where it was first written.
    """
    P, C = [x.words for x in prev], [x.words for x in cur]
    for j in range(min(len(P), len(C)), 0, -1):
        if C[:j - 1] != P[len(P) - j:len(P) - 1]:
            continue
        if C[j - 1] == P[-1]:
            return cur[j:], None
        if _grown(P[-1], C[j - 1], partial=j > 1):  # the last line grew in place
            n = len(P[-1])
            rest = [_Line(C[j - 1][n:], cur[j - 1].times[n:])] + cur[j:]
            return rest, C[j - 1][n - 1] if C[j - 1][n - 1] != P[-1][-1] else None
    return cur, None


def _merge(raws: list[_Raw]) -> list[Cue]:
    lines = [_lines(r) for r in raws]
    rolling = _is_rolling(lines)
    cues: list[Cue] = []
    speaker = False  # a `>>` whose words are still to come
    for i, (raw, cur) in enumerate(zip(raws, lines)):
        new, completed = _new_part(lines[i - 1], cur) if rolling and i else (cur, None)
        if completed and cues:
            head, _, last = cues[-1].text.rpartition(" ")
            if completed.startswith(last):
                cues[-1] = Cue(cues[-1].start, cues[-1].end, f"{head} {completed}".lstrip(), cues[-1].word_times)
        words, times = _drop_annotations([w for x in new for w in x.words], [t for x in new for t in x.times])
        if speaker and words[:1] != [SPEAKER]:
            words, times = [SPEAKER] + words, [None] + times
        speaker = bool(words) and all(w == SPEAKER for w in words)
        if not words or speaker:
            continue
        start = raw.start
        if cues and start < cues[-1].end:  # overlapping cues are told one after the other
            prev = cues[-1]
            cues[-1] = Cue(prev.start, start, prev.text,
                           tuple(None if t is None else min(t, start) for t in prev.word_times))
        times = [None if t is None else max(start, t) for t in times]
        if times[0] is None:
            times[0] = start
        cues.append(Cue(start, raw.end, " ".join(words), tuple(times)))
    return cues


# ------------------------------------------------------------------------------------------- segmentation

def _word_times(cue: Cue) -> tuple[list[float], list[bool]]:
    """Each word's start (known ones as given, the rest spread evenly between known neighbours) and
    whether it was known. The first word of a cue starts with the cue."""
    n = len(cue.text.split())
    given = list(cue.word_times) if len(cue.word_times) == n else [None] * n
    if n and given[0] is None:
        given[0] = cue.start
    if n > 1 and given[0] is not None and given[1] is None and cue.text.startswith(SPEAKER):
        given[1] = given[0]  # `>>` takes no time
    anchors = [(i, t) for i, t in enumerate(given) if t is not None] + [(n, cue.end)]
    out, k = [], 0
    for i, t in enumerate(given):
        if t is None:
            while anchors[k][0] < i:
                k += 1
            (i0, t0), (i1, t1) = anchors[k - 1], anchors[k]
            t = t0 + (t1 - t0) * (i - i0) / (i1 - i0)
        out.append(t)
    return out, [t is not None for t in given]


def _ends_sentence(word: str) -> bool:
    return bool(SENTENCE_END.search(word)) and word.lower() not in ABBREVIATIONS


class _Word(NamedTuple):
    text: str
    start: float
    end: float
    gap: float  # the pause before it


def _timeline(cues: list[Cue]) -> list[_Word]:
    out = []
    last = prev_end = None  # the previous word's start when known; the previous cue's end
    carry = 0.0             # a pause seen just before a `>>` belongs to the word after it
    for cue in cues:
        texts = cue.text.split()
        times, known = _word_times(cue)
        for k, w in enumerate(texts):
            gap = carry
            if k == 0 and prev_end is not None:
                gap = max(gap, cue.start - prev_end)
            if known[k] and last is not None:
                gap = max(gap, times[k] - last)
            last = times[k] if known[k] else None
            carry = gap if w == SPEAKER else 0.0
            out.append(_Word(w, times[k], times[k + 1] if k + 1 < len(texts) else cue.end, gap))
        prev_end = cue.end
    return out


def segment(cues: list[Cue], pause_s: float, max_words: int) -> list[Utterance]:
    """Cut a transcript into utterances at sentence ends, speaker changes and pauses; an utterance that
    reaches `max_words` is cut at the longest pause in its second half."""
    utts: list[Utterance] = []
    cur: list[_Word] = []
    speaker = next_speaker = False

    def emit(words: list[_Word], new_speaker: bool) -> None:
        utts.append(Utterance(words[0].start, max(words[0].start, words[-1].end), " ".join(w.text for w in words),
                              new_speaker, bool(utts) and words[0].gap >= pause_s))

    for word in _timeline(cues):
        if word.text == SPEAKER:
            if cur:
                emit(cur, speaker)
                cur = []
            next_speaker = bool(utts)
            continue
        if cur and word.gap >= pause_s:
            emit(cur, speaker)
            cur = []
        if not cur:
            speaker, next_speaker = next_speaker, False
        cur.append(word)
        if _ends_sentence(word.text):
            emit(cur, speaker)
            cur = []
        elif len(cur) >= max_words:
            k = max(range(max(1, len(cur) // 2), len(cur)), key=lambda i: cur[i].gap, default=len(cur))
            emit(cur[:k], speaker)
            cur, speaker = cur[k:], False
    if cur:
        emit(cur, speaker)
    return utts


# ---------------------------------------------------------------------------------------- conversations

def _turns(utts: list[Utterance], seg: Segment) -> list[list[Utterance]]:
    """One utterance per turn, joined with the next while shorter than `min_reply_words`; `>>` ends a turn."""
    turns: list[list[Utterance]] = []
    n = 0
    for u in utts:
        size = len(u.text.split())
        if not turns or u.new_speaker or n >= seg.min_reply_words or n + size > seg.max_utterance_words:
            turns.append([])
            n = 0
        turns[-1].append(u)
        n += size
    return turns


def conversations(utts: list[Utterance], seg: Segment) -> list[list[list[Utterance]]]:
    """Group utterances into conversations of alternating human/gpt turns (see the module docstring)."""
    limit = max(2, seg.turns_per_conversation // 2 * 2)
    out, conv = [], []

    def flush(turns):
        turns = turns[:len(turns) // 2 * 2]
        if turns:
            out.append(turns)

    for turn in _turns(utts, seg):
        if len(conv) % 2 and sum(len(u.text.split()) for u in turn) < seg.min_reply_words:
            flush(conv[:-1])
            conv = [turn]
            continue
        conv.append(turn)
        if len(conv) == limit:
            flush(conv)
            conv = []
    flush(conv)
    return out


def to_sharegpt(utts: list[Utterance], seg: Segment, video_id: str, **meta) -> list[dict]:
    """ShareGPT rows in the speaker's voice; `meta` (title, channel, ...) is copied onto every row."""
    rows = []
    for conv in conversations(utts, seg):
        turns = [("human" if i % 2 == 0 else "gpt", " ".join(u.text for u in turn)) for i, turn in enumerate(conv)]
        rows.append(make_row("transcripts", turns, video_id=video_id, start=round(conv[0][0].start, 3),
                             end=round(conv[-1][-1].end, 3), **meta))
    return rows


# ---------------------------------------------------------------------------------------------- discovery

def caption_files(folders: list[str | Path]) -> list[Path]:
    """Every *.vtt / *.srt under the folders, recursively, in a stable order; missing folders are empty."""
    files = set()
    for folder in map(Path, folders):
        if folder.is_file():
            files.add(folder)
        elif folder.is_dir():
            files.update(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
    return sorted(files)


def video_meta(path: str | Path) -> dict:
    """video_id and, from yt-dlp's `<id>.info.json` beside the file, title/channel/upload_date/duration.

    Raises InputError when the info file exists but is not valid JSON.
    """
    path = Path(path)
    stem = path.name.split(".")[0]
    meta = {"video_id": stem}
    info_path = path.with_name(f"{stem}.info.json")
    if info_path.is_file():
        info = read_json(info_path)
        if isinstance(info, dict):
            meta["video_id"] = str(info.get("id") or stem)
            for key in ("title", "channel", "upload_date", "duration"):
                if info.get(key) is not None:
                    meta[key] = info[key]
    return meta
