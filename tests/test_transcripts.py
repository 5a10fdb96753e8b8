"""Captions -> clean transcript -> utterances -> ShareGPT rows, on small hand-made files and on the real ones."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from persona_lm.data.sharegpt import check_row
from persona_lm.data.transcripts import (Cue, NoCaptions, conversations, read_transcript, segment, to_sharegpt,
                                         video_meta)
from persona_lm.errors import InputError, PersonaError
from persona_lm.params import Segment, parse_params

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "youtube"


def ts(t: float) -> str:
    h, rest = divmod(round(t * 1000), 3_600_000)
    m, rest = divmod(rest, 60_000)
    return f"{h:02d}:{m:02d}:{rest // 1000:02d}.{rest % 1000:03d}"


def auto_captions(lines: list[str], word_s: float = 0.3, gap_s: float = 0.0, freeze: bool = True) -> str:
    """YouTube's rolling layout: each cue shows the previous line above a new inline-timed one, then a 10 ms
    freeze cue repeats the finished line (older files have no freeze cues)."""
    out, t, prev = ["WEBVTT", "Kind: captions", "Language: en", ""], 1.0, " "
    for line in lines:
        words = line.split()
        times = [t + i * word_s for i in range(len(words))]
        end = t + len(words) * word_s
        tagged = words[0] + "".join(f"<{ts(x)}><c> {w}</c>" for w, x in zip(words[1:], times[1:]))
        out += [f"{ts(t)} --> {ts(end)} align:start position:0%", prev, tagged, ""]
        if freeze:
            out += [f"{ts(end)} --> {ts(end + 0.01)} align:start position:0%", line, " ", ""]
        prev, t = line, end + 0.01 + gap_s
    return "\n".join(out) + "\n"


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def words_of(cues) -> list[str]:
    return " ".join(c.text for c in cues).split()


# ----------------------------------------------------------------------------------------- rolling merge

def test_rolling_captions_come_out_once(tmp_path):
    lines = ["i know people are going to", "be asking why is the smartest", "man in the world on a farm"]
    cues = read_transcript(write(tmp_path, "a.en.vtt", auto_captions(lines)))
    assert words_of(cues) == " ".join(lines).split()
    assert [c.text for c in cues] == lines
    assert cues[1].start == pytest.approx(2.81) and cues[1].word_times[1] == pytest.approx(3.11)


@pytest.mark.parametrize("freeze", [True, False])
def test_genuine_repeats_survive_the_merge(tmp_path, freeze):
    lines = ["no no no no", "no no no no", "we said the very same sentence twice in a row",
             "we said the very same sentence twice in a row", "no"]
    cues = read_transcript(write(tmp_path, "a.en.vtt", auto_captions(lines, freeze=freeze)))
    assert words_of(cues) == " ".join(lines).split()


def test_manual_captions_keep_a_line_said_twice(tmp_path):
    vtt = "WEBVTT\n\n00:00:01.000 --> 00:00:02.000\nI love you.\n\n00:00:02.000 --> 00:00:03.000\nI love you.\n"
    assert [c.text for c in read_transcript(write(tmp_path, "m.vtt", vtt))] == ["I love you.", "I love you."]


def test_live_caption_lines_that_grow_in_place(tmp_path):
    # a three-line live display: the bottom line fills in, even inside a word, before it scrolls up
    vtt = """WEBVTT

00:00:01.000 --> 00:00:02.000
 
 
An<00:00:01.500><c>d</c>

00:00:02.000 --> 00:00:03.000
 
 
And there will be no roll call

00:00:03.000 --> 00:00:03.100
 
And there will be no roll call
at this time. Or we can do a roll

00:00:03.100 --> 00:00:04.000
And there will be no roll call
at this time. Or we can do a roll
call, okay.
"""
    cues = read_transcript(write(tmp_path, "live.vtt", vtt))
    text = " ".join(c.text for c in cues)
    assert text == "And there will be no roll call at this time. Or we can do a roll call, okay."


# ---------------------------------------------------------------------------------------------- cleaning

def test_tags_entities_and_annotations_are_cleaned(tmp_path):
    vtt = """WEBVTT

00:00:00.000 --> 00:00:02.000
[Music]

00:00:02.000 --> 00:00:04.000
<c.colorCCCCCC>fish<c.colorE5E5E5> &amp; chips</c></c> cost&nbsp;five [&nbsp;__&nbsp;] pounds ♪

00:00:04.000 --> 00:00:06.000
(upbeat music)

00:00:06.000 --> 00:00:08.000
<v Sam>it's &lt;fine&gt;</v> [Applause] really
"""
    cues = read_transcript(write(tmp_path, "c.vtt", vtt))
    assert [c.text for c in cues] == ["fish & chips cost five pounds", "it's <fine> really"]
    assert (cues[0].start, cues[0].end, cues[1].start) == (2.0, 4.0, 6.0)


def test_speaker_changes_become_separate_turn_marks(tmp_path):
    lines = ["so how long does it take", "&gt;&gt; about six months. &gt;&gt;Wow."]
    cues = read_transcript(write(tmp_path, "s.vtt", auto_captions(lines)))
    assert words_of(cues) == "so how long does it take >> about six months. >> Wow.".split()
    utts = segment(cues, pause_s=1.2, max_words=60)
    assert [(u.text, u.new_speaker) for u in utts] == [
        ("so how long does it take", False), ("about six months.", True), ("Wow.", True)]


def test_style_block_and_nested_colour_spans(tmp_path):
    vtt = """WEBVTT
Kind: captions
Language: en
Style:
::cue(c.colorCCCCCC) { color: rgb(204,204,204);
 }
##

00:00:01.000 --> 00:00:03.000 align:start position:0%
 
good<00:00:01.500><c> to</c><c.colorE5E5E5><00:00:02.000><c> be</c><00:00:02.500><c> here</c></c>

00:00:03.000 --> 00:00:03.010 align:start position:0%
good to<c.colorE5E5E5> be here
 </c>

00:00:03.010 --> 00:00:05.000 align:start position:0%
good to<c.colorE5E5E5> be here</c>
<c.colorCCCCCC>so<00:00:03.500><c> yeah</c></c>
"""
    cues = read_transcript(write(tmp_path, "style.vtt", vtt))
    assert [c.text for c in cues] == ["good to be here", "so yeah"]


# ---------------------------------------------------------------------------------- unusual file layouts

def test_file_without_header_is_read(tmp_path):
    vtt = "00:00:01.000 --> 00:00:02.000\nhello there\n\n00:00:02.500 --> 00:00:03.000\nfriend\n"
    assert [c.text for c in read_transcript(write(tmp_path, "noheader.vtt", vtt))] == ["hello there", "friend"]


def test_mid_file_headers_join_segments_on_the_stream_clock(tmp_path):
    vtt = """00:10:00.000 --> 00:10:02.000
 
the council will now

WEBVTT
X-TIMESTAMP-MAP=LOCAL:00:00.000,MPEGTS:900000
Kind: captions

00:00:00.000 --> 00:00:01.000
the council will now
come to order

WEBVTT
X-TIMESTAMP-MAP=LOCAL:00:00.000,MPEGTS:1350000

00:00:00.000 --> 00:00:01.000
come to order
please take your seats
"""
    cues = read_transcript(write(tmp_path, "live.en.vtt", vtt))
    assert [c.text for c in cues] == ["the council will now", "come to order", "please take your seats"]
    # the second segment jumps back in time: it is laid after the first; the third sits 5 s (MPEGTS) later
    assert [c.start for c in cues] == [600.0, 602.0, 607.0]


def test_hours_past_24(tmp_path):
    vtt = "WEBVTT\n\n26:52:14.140 --> 26:52:14.823\nstill live\n\n27:16:56.103 --> 27:16:56.170\nhours later\n"
    cues = read_transcript(write(tmp_path, "long.vtt", vtt))
    assert [c.start for c in cues] == [96734.14, 98216.103]


def test_srt_with_overlapping_cues(tmp_path):
    srt = ("1\n00:00:01,000 --> 00:00:04,000\nHello there, how are you?\n\n"
           "2\n00:00:03,000 --> 00:00:05,000\nI am fine.\n\n"
           "00:00:05,000 --> 00:00:06,500\n<i>Good.</i>\n")  # cue numbers are often left out
    cues = read_transcript(write(tmp_path, "o.srt", srt))
    assert [c.text for c in cues] == ["Hello there, how are you?", "I am fine.", "Good."]
    assert [(c.start, c.end) for c in cues] == [(1.0, 3.0), (3.0, 5.0), (5.0, 6.5)]


# ------------------------------------------------------------------------------------------ broken files

@pytest.mark.parametrize("name, data, reason", [
    ("empty.vtt", b"", "empty file"),
    ("blank.srt", b"\n  \n", "empty file"),
    ("garbage.vtt", bytes(range(256)) * 8, "binary"),
    ("header_only.vtt", b"WEBVTT\nKind: captions\n\n", "no cues"),
    ("music_only.vtt", b"WEBVTT\n\n00:00:00.000 --> 00:00:09.000\n[Music]\n", "no speech"),
])
def test_files_without_captions_are_skippable(tmp_path, name, data, reason):
    with pytest.raises(NoCaptions) as e:
        read_transcript(write(tmp_path, name, data))
    assert reason in str(e.value) and name in str(e.value)


@pytest.mark.parametrize("name, data, line, reason", [
    ("latin1.vtt", "WEBVTT\n\n00:00:01.000 --> 00:00:02.000\ncaf\u00e9\n".encode("latin-1"), 4, "not valid UTF-8"),
    ("truncated.vtt", b"WEBVTT\n\n00:00:01.000 --> 00:00:02.000\nhello\n\n00:00:03.000 --> 00:0", 6, "truncated"),
    ("order.vtt", b"WEBVTT\n\n00:00:05.000 --> 00:00:06.000\nlater\n\n00:00:01.000 --> 00:00:02.000\nsooner\n",
     6, "out of order"),
    ("order.srt", b"1\n00:00:05,000 --> 00:00:06,000\nlater\n\n2\n00:00:01,000 --> 00:00:02,000\nsooner\n",
     6, "out of order"),
])
def test_broken_files_fail_with_file_and_line(tmp_path, name, data, line, reason):
    with pytest.raises(InputError) as e:
        read_transcript(write(tmp_path, name, data))
    assert not isinstance(e.value, NoCaptions)
    assert e.value.line == line and reason in e.value.reason and str(e.value).startswith(f"{tmp_path / name}:{line}:")


# -------------------------------------------------------------------------------- utterances and dialogues

def cue(start, end, text):
    return Cue(start, end, text)


def test_segment_cuts_at_sentences_pauses_and_length():
    cues = [cue(0, 2, "Hello there. How are"), cue(2, 4, "you today?"), cue(6, 8, "fine thanks")]
    utts = segment(cues, pause_s=1.2, max_words=60)
    assert [(u.text, u.after_pause) for u in utts] == [
        ("Hello there.", False), ("How are you today?", False), ("fine thanks", True)]
    assert utts[0].start == 0 and utts[1].end == 4 and utts[2].start == 6
    assert all(a.start <= b.start and a.start <= a.end for a, b in zip(utts, utts[1:]))


def test_unpunctuated_speech_is_cut_at_the_longest_pause():
    # word-timed lowercase ASR: a 1 s gap (below pause_s) inside 12 words; max 10 words per utterance
    times = [0, .3, .6, .9, 1.2, 1.5, 2.5, 2.8, 3.1, 3.4, 3.7, 4.0]
    c = Cue(0, 4.3, " ".join(f"w{i}" for i in range(12)), tuple(times))
    utts = segment([c], pause_s=1.2, max_words=10)
    assert [u.text.split() for u in utts] == [[f"w{i}" for i in range(6)], [f"w{i}" for i in range(6, 12)]]
    assert utts[1].start == 2.5


def test_conversations_alternate_and_give_replies_to_the_speaker():
    seg = Segment(pause_s=1.2, max_utterance_words=60, turns_per_conversation=4, min_reply_words=3)
    texts = ["Hi friends, welcome back.", ">> Hello!", ">> Today we make soup together.", "Chop the onion first.",
             ">> Can I help?", ">> Of course you can help me.", "Then we wait a while.", "Bye for now."]
    cues = [cue(i * 3, i * 3 + 2.5, t) for i, t in enumerate(texts)]
    utts = segment(cues, seg.pause_s, seg.max_utterance_words)
    rows = to_sharegpt(utts, seg, video_id="soup", title="Soup")
    assert all(check_row(r) == [] for r in rows)
    # "Hello!" is too short a reply, so it prompts the next conversation instead; an unanswered prompt is dropped
    assert [[(m["from"], m["value"]) for m in r["conversations"]] for r in rows] == [
        [("human", "Hello!"), ("gpt", "Today we make soup together."), ("human", "Chop the onion first."),
         ("gpt", "Can I help?")],
        [("human", "Of course you can help me."), ("gpt", "Then we wait a while.")],
    ]
    assert rows[0]["video_id"] == "soup" and rows[0]["title"] == "Soup" and rows[0]["source"] == "transcripts"
    assert (rows[1]["start"], rows[1]["end"]) == (15.0, 20.5)
    used = [u for conv in conversations(utts, seg) for turn in conv for u in turn]
    assert len(used) == len(set(used))


def test_video_meta_from_info_json(tmp_path):
    (tmp_path / "abcDEF12345.info.json").write_text(json.dumps({"id": "abcDEF12345", "title": "A walk",
                                                                "channel": "Me", "upload_date": "20240101"}))
    assert video_meta(tmp_path / "abcDEF12345.en.vtt") == {"video_id": "abcDEF12345", "title": "A walk",
                                                          "channel": "Me", "upload_date": "20240101"}
    assert video_meta(tmp_path / "walk.en.vtt") == {"video_id": "walk"}


# ----------------------------------------------------------------------------------------- the real files

def normalised(text: str) -> list[str]:
    """Words compared case- and punctuation-blind, without annotations or speaker marks."""
    text = html.unescape(re.sub(r"<[^>]*>", "", text))
    text = re.sub(r"\[[^\]]*\]|\([^)]*\)", " ", text).replace(">>", " ")
    words = (re.sub(r"[^\w']", "", w.casefold()) for w in text.split())
    return [w for w in words if w]


def reference_words(path: Path) -> list[str]:
    """What the speaker said, read from the file independently of the merge under test.

    Rolling captions (inline word timings or 10 ms freeze cues) put each new line at the bottom of a cue
    that lasts longer than a freeze, so the reference is those bottom lines; a bottom line that extends the
    previous one (a live line filling in) replaces it. Manual captions are every line as written.
    """
    text = path.read_text(encoding="utf-8-sig")
    cues, block = [], None
    timing = re.compile(r"((?:\d+:)?\d+:\d+[.,]\d+)\s*-->\s*((?:\d+:)?\d+:\d+[.,]\d+)")
    for line in re.split(r"\r\n|\r|\n", text):
        m = timing.search(line) if "-->" in line else None
        if m:
            a, b = (sum(float(p) * 60 ** i for i, p in enumerate(reversed(g.replace(",", ".").split(":"))))
                    for g in m.groups())
            block = [a, b, []]
            cues.append(block)
        elif line == "":
            block = block if block is not None and not block[2] else None  # SRT: a blank line after the timing
        elif block is not None:
            block[2].append(line)
    rolling = bool(re.search(r"<\d+:\d+:\d+\.\d+>", text)) or 4 * sum(b - a <= 0.02 for a, b, _ in cues) >= len(cues)
    if not rolling:
        return [w for _, _, lines in cues for line in lines for w in normalised(line)]
    ref: list[list[str]] = []
    for a, b, lines in cues:
        lines = [x for x in lines if x.strip()]
        bottom = normalised(lines[-1]) if lines and b - a > 0.02 else []
        if bottom and ref and bottom[:len(ref[-1])] == ref[-1]:
            ref[-1] = bottom
        elif bottom:
            ref.append(bottom)
    return [w for line in ref for w in line]


def back_to_back(words: list[str], min_len: int = 8, max_len: int = 400) -> set[tuple[str, ...]]:
    """Every span S of min_len..max_len words that is immediately followed by S again."""
    ids = {}
    a = np.array([ids.setdefault(w, len(ids)) for w in words], dtype=np.int64)
    found = set()
    for n in range(min_len, min(max_len, len(a) // 2) + 1):
        same = np.concatenate([[0], np.cumsum(a[:-n] == a[n:])])
        for i in np.flatnonzero(same[n:] - same[:-n] == n):
            found.add(tuple(words[i:i + n]))
    return found


def test_real_files_come_out_clean(shared_data):
    files = sorted((shared_data / "youtube").iterdir())
    assert len(files) >= 20
    problems = []
    for path in files:
        cues = read_transcript(path)
        out = [w for c in cues for w in normalised(c.text)]
        ref = reference_words(path)
        invented = back_to_back(out) - back_to_back(ref)
        problems += [f"{path.name}: repeats {' '.join(s)!r}" for s in sorted(invented)[:3]]
        common = sum((Counter(out) & Counter(ref)).values())
        if common < 0.95 * len(ref) or common < 0.95 * len(out):
            problems.append(f"{path.name}: {common} words shared by {len(out)} out and {len(ref)} reference")
        for a, b in zip(cues, cues[1:]):
            if not (a.start <= a.end <= b.start <= b.end):
                problems.append(f"{path.name}: times go back at {a} / {b}")
                break
        if any(re.search(r"<[^>]*>|&\w+;|\[|\]", c.text) for c in cues):
            problems.append(f"{path.name}: a tag, entity or annotation left in the text")
    assert not problems, "\n".join(problems)


def test_real_speaker_repeats_are_kept(shared_data):
    # "Hello." then "Hello everyone." across cues; "correct" said twice across a line break
    stream = shared_data / "youtube" / "mting314_vtuber-larping__Just_Chatting_IM_FREE_CELEBRATE_VMfR5nr8gic.en.vtt"
    assert " ".join(c.text for c in read_transcript(stream)[:2]) == "Hello. Hello everyone."
    armin = read_transcript(shared_data / "youtube" / "ArminRezz_YoutubeHarvester__subtitles.en.vtt")
    assert "universal correct correct absolute and universal" in " ".join(c.text for c in armin)


# ----------------------------------------------------------------------------------------- CLI and stage

def test_cli_prints_json_lines(tmp_path):
    persona_lm = Path(sys.executable).with_name("persona-lm")
    path = write(tmp_path, "a.en.vtt", auto_captions(["hello my friend", "how was your day"]))
    out = subprocess.run([persona_lm, "transcript", path], capture_output=True, text=True, check=True).stdout
    assert [json.loads(line) for line in out.splitlines()] == [
        {"start": 1.0, "end": 1.9, "text": "hello my friend"}, {"start": 1.91, "end": 3.11, "text": "how was your day"}]
    bad = write(tmp_path, "bad.vtt", "WEBVTT\n\n00:00:01.000 -> 00:00:02.000\nhi\n")
    run = subprocess.run([persona_lm, "transcript", bad], capture_output=True, text=True)
    assert run.returncode == 1 and f"{bad}:3: malformed cue timing" in run.stderr and "Traceback" not in run.stderr


def test_stage_writes_valid_table_and_rows(tmp_path, monkeypatch, caplog):
    monkeypatch.syspath_prepend(str(ROOT / "stages"))
    import process_transcripts

    local = tmp_path / "mine"
    shutil.copytree(SAMPLE, local / "sample")
    write(local, "empty.srt", "")
    write(local, "noise.vtt", bytes(range(256)) * 4)
    chat = "".join(f"{i}\r\n00:00:0{2 * i},000 --> 00:00:0{2 * i + 1},000\r\n[laughs] -Line {i} here.\r\n\r\n"
                   for i in (1, 2, 3))
    write(local, "chat.srt", "\ufeff".encode("utf-16-le") + chat.encode("utf-16-le"))
    raw = tmp_path / "data" / "raw" / "youtube"
    raw.mkdir(parents=True)
    write(raw, "vid00000001.en.vtt", auto_captions(["hi there friends", "welcome back to my channel",
                                                    "today we are talking about tea"], gap_s=1.5))
    write(raw, "vid00000001.info.json", json.dumps({"id": "vid00000001", "title": "Tea talk", "duration": 9}))
    monkeypatch.chdir(tmp_path)
    p = parse_params({"youtube": {"local_dirs": ["mine"]}})
    process_transcripts.main(p)
    assert "skipped caption file mine/empty.srt: empty file" in caplog.text
    files = json.loads(Path("reports/validation/transcripts.json").read_text())["files"]
    skipped = files["skipped_files"]
    assert skipped["mine/empty.srt"] == "empty file" and "binary" in skipped["mine/noise.vtt"]
    assert len(skipped) == files["skipped"] == sum(files["skip_reasons"].values()) == 2 and files["read"] == 5
    assert sum(n for reason, n in files["dropped_text"].items() if "annotation" in reason) >= 3

    df = pl.read_parquet("data/interim/transcripts.parquet")
    assert df.columns == ["video_id", "source_file", "start", "end", "text"]
    assert set(df["video_id"]) == {"vid00000001", "sunday_soup", "morning_walk", "tidy_desktop", "chat"}
    assert df.filter(pl.col("video_id") == "chat")["text"].to_list() == [f"Line {i} here." for i in (1, 2, 3)]
    assert all(df.group_by("video_id").len()["len"] >= 3)
    for _, g in df.group_by("source_file"):
        assert (g["start"].diff().drop_nulls() >= 0).all() and (g["end"] >= g["start"]).all()
    rows = [json.loads(line) for line in Path("data/interim/dialogues/transcripts.jsonl").read_text().splitlines()]
    assert len(rows) >= 20 and len({r["id"] for r in rows}) == len(rows)
    assert all(check_row(r, labels=set(p.persona.emotions)) == [] for r in rows)
    assert any(r["video_id"] == "vid00000001" and r["title"] == "Tea talk" for r in rows)
    assert json.loads(Path("reports/validation/transcripts.json").read_text())["success"]

    write(local, "broken.vtt", "WEBVTT\n\n00:00:01.000 --> 00:00:0")
    with pytest.raises(PersonaError, match=r"broken\.vtt:3: .*truncated"):
        process_transcripts.main(p)
