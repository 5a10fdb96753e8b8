r"""Caption files (YouTube auto-captions, manual VTT, SRT) -> clean timed transcripts -> ShareGPT conversations.

Reading. Text is UTF-8 (with or without a BOM) or UTF-16/UTF-32 with a BOM; lines end in `\n`, `\r\n`, `\r`
or `\r\r\n`. webvtt-py parses the cues after we settle the block structure real files get wrong: cue
identifiers (numbered or not) with or without blank lines between cues, blank lines under the timing or
inside the text, NOTE/STYLE/REGION blocks, a `-->` inside the text, a comma before the milliseconds, and
SRT read the same way. A file without the leading `WEBVTT` line gets one. A live-stream capture made of HLS
segments glued together (mid-file `WEBVTT` and `X-TIMESTAMP-MAP` headers) is parsed segment by segment, each
placed on the stream clock (MPEG-TS ticks at 90 kHz), and wherever the clock still jumps back the rest is
laid end to end after what came before, so times always run forward. Hours past 24 are ordinary hours.
Overlapping cues (SRT) are told one after the other. A malformed cue timing (a typo, a truncated file) and
a cue that starts before the one above it are errors naming the line.

Rolling captions. YouTube's ASR captions scroll: each cue repeats the line(s) above its new one, and a 10 ms
"freeze" cue repeats the finished line. A cue's new text is what is left after its leading lines that equal
the previous cue's trailing lines; live captions may instead extend the last line in place, even inside a
word, which then gets completed where it was first written. This is decided cue by cue against the previous
cue only, never against everything seen so far, so a speaker who says the same words twice keeps both. A file
counts as rolling only when more cues push the previous cue's last line up (or extend it) than drop it;
manual captions, where a cue that repeats the last one is someone saying it again, are taken as written.

Cleaning. Markup goes: WebVTT spans (`<c>`, nested `<c.colorE5E5E5>`, `<i>`, `<b>`, `<u>`, `<lang>`, `<ruby>`
with its `<rt>`/`<rp>` readings), `<font>`, SSA/ASS override blocks (`{\an8}`); entities are decoded, and
annotations in brackets or parentheses (`[Music]`, `[ __ ]`, `(upbeat music)`) and music notes dropped
(counted). A change of speaker stays in the cue text as a `>>` token: `>>` itself, a dialogue dash, and a
change of named speaker, by `<v Name>` span or `NAME:` label; the name itself is dropped. Inline word
timings are kept per word when they fall inside their cue.

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

import codecs
import html
import re
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import webvtt
from webvtt.errors import MalformedCaptionError, MalformedFileError

from persona_lm.data.sharegpt import make_row
from persona_lm.errors import InputError
from persona_lm.io import read_json
from persona_lm.params import Segment

SUFFIXES = (".vtt", ".srt")
LINE_BREAK = re.compile(r"\r*\n|\r")  # `\r\r\n`: a `\r\n` file saved again by a tool that puts `\r` before `\n`
# UTF-32-LE's BOM begins like UTF-16-LE's, so it is tried first
BOMS = ((codecs.BOM_UTF32_LE, "UTF-32-LE"), (codecs.BOM_UTF32_BE, "UTF-32-BE"), (codecs.BOM_UTF8, "UTF-8"),
        (codecs.BOM_UTF16_LE, "UTF-16-LE"), (codecs.BOM_UTF16_BE, "UTF-16-BE"))
TIMING = re.compile(
    r"\s*((?:\d+:)?[0-5]?\d:[0-5]?\d[.,]\d{1,3})\s*-->\s*((?:\d+:)?[0-5]?\d:[0-5]?\d[.,]\d{1,3})(?=\s|$)"
)
TIMING_START = re.compile(r"\s*\d[\d:.,]*\s*-->")  # only a time (or a broken one) before `-->`: meant as a timing
TIMING_TYPO = re.compile(r"\s*(?:\d+:)?\d{1,2}:\d{2}[.,]\d+\s*[-–—=]+>?")  # `00:01.000 -> ...`
BLOCK_KEYWORD = re.compile(r"(?:NOTE|STYLE|REGION)(?:[ \t]|$)")  # WebVTT blocks that hold no cue text
TAG = re.compile(r"<[^>]*>")
STYLE_TAG = re.compile(r"<(?!\d)[^>]*>")  # every tag but an inline timestamp
TIMESTAMP_TAG = re.compile(r"<((?:\d+:)?\d{1,2}:\d{2}\.\d{1,3})>")
VOICE_TAG = re.compile(r"<v(?:\.[^\s>]*)?(?:[ \t]+([^>]*))?>")  # <v Ana>, <v.loud Ana Pereira>
RUBY_TEXT = re.compile(r"<(rt|rp)\b[^>]*>.*?(?:</\1\s*>|(?=</ruby\s*>)|$)")  # the reading, not the text
SSA_OVERRIDE = re.compile(r"\{\\[^{}]*\}")  # {\an8}, {\i1}, {\c&H00FFFF&} in SRT from SSA/ASS tools
WORD = re.compile(r"\S+")
LABEL_WORD = re.compile(r"[^\W\d_][\w.'’-]*|#?\d+")
MPEGTS_HZ = 90_000
SENTENCE_END = re.compile(r"[.!?…]['\"”’)\]]*$")
ABBREVIATIONS = {"mr.", "mrs.", "ms.", "dr.", "st.", "vs.", "etc.", "e.g.", "i.e.", "jr.", "sr.", "prof."}
NOTES = str.maketrans("", "", "♪♫♬")
DASHES = "-‐‑–"  # hyphen-minus, U+2010 hyphen, U+2011 non-breaking hyphen, en dash: a dialogue dash in subtitles
# Words that open a sentence with a colon ("Note: the shop closes at five") and are no one's name.
NOT_SPEAKERS = frozenset("""note notes nb ps p.s. warning caution tip tips hint update edit example step chapter part
    question answer reminder important summary source sources translation translator subtitles subtitle captions
    caption transcript disclaimer spoiler ingredients look listen well so now yes no okay ok today also first second
    third finally bonus fact rule lesson result time date location title remember pro quick fun previously next
    meanwhile later""".split())
SPEAKER = ">>"
VOICE = "\x02"  # prefixes a speaker's name while cues are read (not whitespace to str.split, unlike \x1c-\x1f)


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


def _utf16_without_bom(head: bytes) -> str | None:
    """"UTF-16-LE"/"UTF-16-BE" when the NUL bytes sit where UTF-16 puts the high byte of ASCII text."""
    even, odd = head[0::2], head[1::2]
    if odd.count(0) > 0.3 * len(odd) and even.count(0) < 0.02 * len(even):
        return "UTF-16-LE"
    if even.count(0) > 0.3 * len(even) and odd.count(0) < 0.02 * len(odd):
        return "UTF-16-BE"
    return None


def _decode(path: Path) -> str:
    """The text of a caption file: UTF-8 with or without a BOM, or UTF-16/UTF-32 with a BOM (Windows tools
    save "Unicode" SRT as UTF-16-LE with a BOM).

    Raises NoCaptions for binary data, InputError for anything else that is not such text: the message
    names the encoding problem and, for invalid UTF-8, the line.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except IsADirectoryError:
        raise InputError(path, "is a folder, expected a file") from None
    for bom, codec in BOMS:
        if data.startswith(bom):
            try:
                return data[len(bom):].decode(codec)
            except UnicodeDecodeError as e:
                raise InputError(path, f"starts with a {codec} byte-order mark but is not valid {codec} "
                                       f"(at byte {e.start + len(bom)})") from None
    if b"\x00" in data[:8192]:
        codec = _utf16_without_bom(data[:8192])
        if codec:
            raise InputError(path, f"looks like {codec} without a byte-order mark: re-save it as UTF-8 "
                                   f"(or as {codec} with a BOM)")
        raise NoCaptions(path, "binary data (NUL bytes), not a caption file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(path, f"not valid UTF-8 (byte 0x{data[e.start]:02x}): the file is in another encoding, "
                               "such as Windows-1252 or Latin-1; re-save it as UTF-8", line=line) from None


def _scan_timings(path, lines: list[str], header_at: set[int]) -> tuple[list[str], list[int]]:
    """Find the cue timing lines, check each is well formed and cues never go back within a segment.

    A line that starts like a timestamp and holds `-->` (or a near miss) must be a timing: webvtt-py would
    silently drop a block it cannot read, which would hide a truncated or hand-edited file. Any other `-->`
    is cue text. Returns the lines with each timing rewritten as `start --> end` with a decimal point
    (cue settings dropped: we never use them, and parsing them is a good part of webvtt-py's time on a
    large file), and the indices of the timing lines.
    """
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    out, timings = list(lines), []
    prev = None
    for i, line in enumerate(lines):
        if i in header_at:
            prev = None
        if not (TIMING_START.match(line) if "-->" in line else TIMING_TYPO.match(line)):
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
        out[i] = f"{m.group(1)} --> {m.group(2)}".replace(",", ".")
        timings.append(i)
    return out, timings


def _blank(line: str) -> bool:
    return not line.strip()


def _cue_starts(lines: list[str], timings: list[int], lo: int) -> list[int]:
    """Where each cue begins: its timing line, or the identifier line above it.

    The line above a timing is an identifier when a blank line (or the segment's header) comes before it,
    the usual layout. Without that blank line it may be the last text line of the cue above instead; it is
    an identifier when it is a number (SRT numbering) or when the file's other cues carry identifiers,
    and text otherwise. A number alone between blank lines right above a timing is that cue's number.
    """
    is_timing = set(timings)

    def candidate(t: int) -> bool:
        return t - 1 >= lo and not _blank(lines[t - 1]) and t - 1 not in is_timing

    def after_blank(i: int) -> bool:
        return i - 1 < lo or _blank(lines[i - 1])

    def lone_number(t: int) -> int:  # `1`, blank line, timing (webvtt-py's SRT reader reads it so too)
        j = t - 1
        while j >= lo and _blank(lines[j]):
            j -= 1
        return j if lo <= j < t - 1 and lines[j].strip().isdigit() and after_blank(j) else t

    uses_ids = sum(candidate(t) and after_blank(t - 1) for t in timings) > sum(not candidate(t) for t in timings)
    starts = []
    for t in timings:
        if not candidate(t):
            starts.append(lone_number(t))
        elif after_blank(t - 1) or lines[t - 1].strip().isdigit() or (uses_ids and t - 2 not in is_timing):
            starts.append(t - 1)
        else:
            starts.append(t)
    return starts


def _payload(lines: list[str], vtt: bool, after_blank: bool = False) -> list[str]:
    """A cue's text lines, from below its timing up to the next cue.

    Blank lines do not end the text (a blank line under the timing, or inside the text, is common in files
    made by hand); a NOTE/STYLE/REGION block after a blank line does (WebVTT only). Empty lines are left
    out and `-->` is escaped, so webvtt-py reads the cue as one block; lines of spaces stay, as they hold
    a rolling caption's screen position.
    """
    out, skip = [], False
    for line in lines:
        if _blank(line):
            after_blank, skip = True, False
            if line:
                out.append(line)
            continue
        skip = skip or (after_blank and vtt and bool(BLOCK_KEYWORD.match(line)))
        after_blank = False
        if not skip:
            out.append(line.replace("-->", "--&gt;"))
    return out


def _canonical(lines: list[str], timings: list[int], vtt: bool, dropped: Counter) -> list[str]:
    """One segment as canonical WebVTT: its header, then each cue as `timing`, text lines, blank line.

    webvtt-py follows the WebVTT parsing rules, which files met in practice break. Measured with 0.6.0: a cue
    number with no blank line before it stays in the text of the cue above; a blank line between timing and
    text, CR CR LF line ends, or a `-->` in the text lose the cue's text; a comma before the milliseconds
    loses the cue. Deciding the cue structure here and handing over only canonical blocks keeps webvtt-py
    as the parser of the rest (timestamps, payload, header metadata).
    """
    first_timing = timings[0] if timings else len(lines)
    lo = 0  # the header runs from `WEBVTT` to the first blank line; a timing directly under it starts a cue
    if lines and lines[0].startswith("WEBVTT"):
        lo = next((i for i in range(1, first_timing) if _blank(lines[i])), first_timing)
    starts = _cue_starts(lines, timings, lo)
    first = starts[0] if starts else len(lines)
    out = (lines[:lo] if lo else ["WEBVTT"]) + [""]
    if outside := sum(not _blank(line) for line in _payload(lines[lo:first], vtt, after_blank=True)):
        dropped["text outside any cue (lines)"] += outside
    for k, t in enumerate(timings):
        end = starts[k + 1] if k + 1 < len(starts) else len(lines)
        out += [lines[t], *_payload(lines[t + 1:end], vtt), ""]
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


def _read_cues(path, lines: list[str], timings: list[int], header_at: list[int], vtt: bool,
               dropped: Counter) -> list[_Raw]:
    starts = ([0] if 0 not in header_at else []) + header_at
    raws: list[_Raw] = []
    shift, zero = 0.0, None  # zero: the stream clock of the first segment that has one
    for a, b in zip(starts, starts[1:] + [len(lines)]):
        own = [t - a for t in timings if a <= t < b]
        try:
            vtt_file = webvtt.from_buffer(_canonical(lines[a:b], own, vtt, dropped))
        except (MalformedFileError, MalformedCaptionError) as e:
            raise InputError(path, f"unreadable captions: {e}", line=a + 1) from None
        if len(vtt_file.captions) != len(own):  # webvtt-py skips a cue it cannot read; we never do silently
            raise InputError(path, f"webvtt-py read {len(vtt_file.captions)} of the {len(own)} cues",
                             line=a + 1)
        if not vtt_file.captions:
            continue
        clock = _segment_clock(vtt_file.metadata)
        if clock is not None and zero is None:
            zero = clock
        offset = 0.0 if clock is None else clock - zero
        first = vtt_file.captions[0].start_time.in_milliseconds() / 1000 + offset + shift
        if raws and first < raws[-1].start:
            shift += raws[-1].end - first
        for c in vtt_file.captions:
            s = c.start_time.in_milliseconds() / 1000 + offset + shift
            e = c.end_time.in_milliseconds() / 1000 + offset + shift
            raws.append(_Raw(s, max(s, e), c.lines, offset + shift))
    return raws


def _is_srt(path: Path, lines: list[str]) -> bool:
    head = next((line for line in lines if line.strip()), "")
    if head.startswith("WEBVTT"):
        return False
    if path.suffix.lower() == ".srt":
        return True
    m = next((TIMING.match(line) for line in lines[:50] if "-->" in line), None)
    return bool(m and "," in m.group(1))


def read_transcript(path: str | Path, dropped: Counter | None = None) -> list[Cue]:
    """The clean transcript of a VTT or SRT file: one Cue per source cue that says something new.

    Text left out on purpose is counted by reason into `dropped` when given (annotations such as `[Music]`,
    lines outside any cue). Raises NoCaptions for a file with nothing to read, and InputError (with the line
    where there is one) for a broken one or one in an encoding other than UTF-8/UTF-16/UTF-32.
    """
    path = Path(path)
    dropped = Counter() if dropped is None else dropped
    text = _decode(path).removeprefix("\ufeff")
    if not text.strip():
        raise NoCaptions(path, "empty file")
    lines = LINE_BREAK.split(text)
    vtt = not _is_srt(path, lines)
    header_at = [i for i, line in enumerate(lines)
                 if vtt and line.startswith("WEBVTT") and (i == 0 or not lines[i - 1].strip())]
    lines, timings = _scan_timings(path, lines, set(header_at))
    raws = _read_cues(path, lines, timings, header_at, vtt, dropped)
    if not raws:
        raise NoCaptions(path, "no cues")
    cues = _merge(raws, dropped)
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


def _voice_mark(m: re.Match) -> str:
    name = "_".join((m.group(1) or "").casefold().split())
    return f" {VOICE}{name} " if name else " "


def _markup(raw: str) -> str:
    """Drop SSA override blocks and ruby readings; a `<v Name>` span becomes a voice mark (its own word)."""
    if VOICE in raw:
        raw = raw.replace(VOICE, "")
    if "{" in raw:
        raw = SSA_OVERRIDE.sub("", raw)
    if "<" in raw:
        raw = VOICE_TAG.sub(_voice_mark, RUBY_TEXT.sub("", raw))
    return raw


def _clean(text: str) -> str:
    """Strip any tag left, decode entities, set `>>` apart as a word of its own."""
    if "<" in text:
        text = TAG.sub("", text)
    if "&" in text:
        text = html.unescape(text)
    if ">" in text:
        text = text.replace(SPEAKER, f" {SPEAKER} ")
    return text


def _label(words: list[str], s: int) -> int:
    """How many words from `s` form a speaker label (`ANA:`, `DR. SMITH:`, `MAN 2:`, `Ana Pereira:`), or 0.

    Up to four capitalised words (numbers after the first) ending in a colon. Only a line's first words are
    asked (the caller's rule), and not a sentence opener such as "Note:" (NOT_SPEAKERS).
    """
    for k in range(s, min(s + 4, len(words))):
        core = words[k].removesuffix(":")
        if not LABEL_WORD.fullmatch(core) or not (core[0].isupper() or (k > s and core[-1].isdigit())):
            return 0
        if words[k].endswith(":"):
            return 0 if words[s].removesuffix(":").casefold() in NOT_SPEAKERS else k - s + 1
    return 0


def _speaker_marks(words: list[str], times: list) -> tuple[list[str], list]:
    """A line's dialogue dashes become `>>` and a speaker label at its start a voice mark.

    A dash is a dialogue dash at the start of the line (or after an annotation there) or after a sentence end
    (`-Hi! -Hello!`), with or without a space after it, unless a digit or another dash follows (`-5 degrees`,
    `--and then`); a hyphen inside a word or a number range is never one. A label counts only at the start of
    the line (after a `>>` or dash): "Note: ..." or "... said JOHN: ..." in the middle of a line is text.
    """
    out_w, out_t = [], []
    for i, (w, t) in enumerate(zip(words, times)):
        if w[0] in DASHES and (len(w) == 1 or not (w[1] in DASHES or w[1].isdigit())) and (
                i == 0 or SENTENCE_END.search(words[i - 1]) or (words[0][0] in "[(" and words[i - 1][-1] in "])")):
            out_w.append(SPEAKER)
            out_t.append(t)
            w = w[1:]
            if not w:
                continue
        out_w.append(w)
        out_t.append(t)
    s = int(out_w[:1] == [SPEAKER])
    if n := _label(out_w, s):
        out_w[s:s + n] = [VOICE + "_".join(w.removesuffix(":") for w in out_w[s:s + n]).casefold()]
        out_t[s:s + n] = out_t[s:s + 1]
    return out_w, out_t


@lru_cache(maxsize=8192)
def _untimed(raw: str) -> _Line:
    words = _clean(raw).split()
    words, times = _speaker_marks(words, [None] * len(words))
    return _Line(tuple(words), tuple(times))


def _line(raw: str, cue: _Raw) -> _Line:
    """A payload line. Style tags go first (they never separate words); text before the first inline
    timestamp starts with the cue."""
    raw = _markup(raw)
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
    words, times = _speaker_marks(words, times)
    return _Line(tuple(words), tuple(times))


def _lines(cue: _Raw) -> list[_Line]:
    """Cleaned payload lines; trailing blank lines dropped, leading ones kept (they hold a rolling position)."""
    lines = [_line(raw, cue) for raw in cue.lines]
    while lines and not lines[-1].words:
        lines.pop()
    return lines


def _drop_annotations(words: list[str], times: list, dropped: Counter) -> tuple[list[str], list]:
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
                dropped["annotations ([Music], (laughs))"] += 1
                i = end + 1
                continue
        w = w.translate(NOTES)
        if w:
            out_w.append(w)
            out_t.append(times[i])
        i += 1
    return out_w, out_t


def _voices(words: list[str], times: list, voice: str | None) -> tuple[list[str], list, str | None]:
    """Voice marks become `>>` where the speaker changes: not for the file's first voice, nor for the same
    voice again. `voice` is the current speaker: None before any is known, "" after an unnamed change."""
    if not any(w[0] == VOICE or w == SPEAKER for w in words):
        return words, times, voice
    out_w, out_t = [], []
    for w, t in zip(words, times):
        if w[0] == VOICE:
            if voice is not None and w[1:] != voice and out_w[-1:] != [SPEAKER]:
                out_w.append(SPEAKER)
                out_t.append(t)
            voice = w[1:]
            continue
        if w == SPEAKER:
            voice = ""
        out_w.append(w)
        out_t.append(t)
    return out_w, out_t, voice


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


def _merge(raws: list[_Raw], dropped: Counter) -> list[Cue]:
    lines = [_lines(r) for r in raws]
    rolling = _is_rolling(lines)
    cues: list[Cue] = []
    speaker = False  # a `>>` whose words are still to come
    voice = None
    for i, (raw, cur) in enumerate(zip(raws, lines)):
        new, completed = _new_part(lines[i - 1], cur) if rolling and i else (cur, None)
        if completed and cues:
            head, _, last = cues[-1].text.rpartition(" ")
            if completed.startswith(last):
                cues[-1] = Cue(cues[-1].start, cues[-1].end, f"{head} {completed}".lstrip(), cues[-1].word_times)
        words, times = _drop_annotations([w for x in new for w in x.words], [t for x in new for t in x.times],
                                         dropped)
        words, times, voice = _voices(words, times, voice)
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
