"""Caption files as people have them: the real-world cases in ../shared/cases/captions, and small inline
variants of each kind (encodings, line breaks, block layouts, markup, speaker marks)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from persona_lm import cli
from persona_lm.data.transcripts import NoCaptions, read_transcript
from persona_lm.errors import InputError

CASES = Path(__file__).resolve().parents[2] / "shared" / "cases" / "captions"
CASE_NAMES = sorted(p.name for p in CASES.glob("*") if not p.name.endswith(".expected.jsonl")) if CASES.is_dir() else []


def write(tmp_path: Path, name: str, data: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def texts(tmp_path: Path, name: str, data: str | bytes) -> list[str]:
    return [c.text for c in read_transcript(write(tmp_path, name, data))]


def vtt(*cues: str) -> str:
    """A WebVTT file whose cues are `cues` (each "text", timed one second apart)."""
    blocks = [f"00:00:{2 * i:02d}.000 --> 00:00:{2 * i + 1:02d}.000\n{text}" for i, text in enumerate(cues)]
    return "WEBVTT\n\n" + "\n\n".join(blocks) + "\n"


def srt(*cues: str) -> str:
    blocks = [f"{i + 1}\n00:00:{2 * i:02d},000 --> 00:00:{2 * i + 1:02d},000\n{text}" for i, text in enumerate(cues)]
    return "\n\n".join(blocks) + "\n"


# ------------------------------------------------------------------------------------- the shared cases

@pytest.mark.parametrize("name", CASE_NAMES)
def test_shared_caption_case(shared_cases, name, capsys):
    path = shared_cases / "captions" / name
    assert cli.main(["transcript", str(path)]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = [json.loads(line) for line in (path.parent / f"{name}.expected.jsonl").read_text().splitlines()]
    assert [c["text"] for c in got] == [c["text"] for c in want]
    assert [(round(c["start"] * 1000), round(c["end"] * 1000)) for c in got] == \
        [(round(c["start"] * 1000), round(c["end"] * 1000)) for c in want]


# ------------------------------------------------------------------------------- encodings, line breaks

SPANISH = "1\n00:00:01,000 --> 00:00:02,500\nHola, ¿qué tal?\n\n2\n00:00:03,000 --> 00:00:05,000\nMuy bien.\n"


@pytest.mark.parametrize("codec, bom", [("utf-8", b""), ("utf-8", b"\xef\xbb\xbf"), ("utf-16-le", b"\xff\xfe"),
                                        ("utf-16-be", b"\xfe\xff"), ("utf-32-le", b"\xff\xfe\x00\x00"),
                                        ("utf-32-be", b"\x00\x00\xfe\xff")])
def test_unicode_encodings_with_a_bom(tmp_path, codec, bom):
    cues = read_transcript(write(tmp_path, "es.srt", bom + SPANISH.encode(codec)))
    assert [(c.start, c.end, c.text) for c in cues] == [(1.0, 2.5, "Hola, ¿qué tal?"), (3.0, 5.0, "Muy bien.")]


def test_utf16_without_bom_is_a_clear_error(tmp_path):
    with pytest.raises(InputError) as e:
        read_transcript(write(tmp_path, "es.srt", SPANISH.encode("utf-16-le")))
    assert not isinstance(e.value, NoCaptions)
    assert "UTF-16-LE without a byte-order mark" in e.value.reason and "binary" not in e.value.reason


def test_legacy_encoding_is_a_clear_error_with_the_line(tmp_path, capsys):
    path = write(tmp_path, "es.srt", SPANISH.replace("qué", "qu\u00e9").encode("cp1252"))
    with pytest.raises(InputError) as e:
        read_transcript(path)
    assert not isinstance(e.value, NoCaptions)
    assert e.value.line == 3 and "not valid UTF-8" in e.value.reason and "Windows-1252" in e.value.reason
    assert cli.main(["transcript", str(path)]) == 1
    assert f"{path}:3: not valid UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r", "\r\r\n"])
def test_line_breaks(tmp_path, eol):
    text = ("WEBVTT\n\n00:00:01.000 --> 00:00:02.000\nFirst we sift\nthe flour.\n\n"
            "00:00:03.000 --> 00:00:04.000\nThen water.\n")
    cues = read_transcript(write(tmp_path, "eol.vtt", text.replace("\n", eol)))
    assert [(c.start, c.text) for c in cues] == [(1.0, "First we sift the flour."), (3.0, "Then water.")]


# ------------------------------------------------------------------------------------------ block layout

@pytest.mark.parametrize("ids", [["1", "2", "3"], ["intro", "cue-b", "5f2c/19-0"]])
@pytest.mark.parametrize("gap", ["\n", "", "   \n"], ids=["blank", "none", "spaces"])
def test_cue_identifiers_never_become_text(tmp_path, ids, gap):
    words = ["Hello and welcome.", "Today we talk about bees.", "They are busy."]
    body = gap.join(f"{i}\n00:00:0{2 * k}.000 --> 00:00:0{2 * k + 1}.000\n{w}\n"
                    for k, (i, w) in enumerate(zip(ids, words)))
    assert texts(tmp_path, "ids.vtt", "WEBVTT\n\n" + body) == words


def test_last_text_line_above_a_timing_stays_text_without_identifiers(tmp_path):
    data = "WEBVTT\n\n00:00:01.000 --> 00:00:02.000\nHello\nthere\n00:00:03.000 --> 00:00:04.000\nfriend\n"
    assert texts(tmp_path, "noids.vtt", data) == ["Hello there", "friend"]


def test_srt_cue_numbers_set_apart_by_blank_lines(tmp_path):
    data = "1\n\n00:00:01,000 --> 00:00:02,000\nthe year\n1984\n\n2\n\n00:00:03,000 --> 00:00:04,000\nwas cold\n"
    assert texts(tmp_path, "apart.srt", data) == ["the year 1984", "was cold"]


@pytest.mark.parametrize("name, head", [("b.vtt", "WEBVTT\n\n"), ("b.srt", "")])
def test_blank_lines_under_the_timing_and_inside_the_text(tmp_path, name, head):
    stamp = "00:00:03,000 --> 00:00:06,000" if name.endswith(".srt") else "00:00:03.000 --> 00:00:06.000"
    data = f"{head}{stamp}\n\nThe captain saw it\n\nand asked me.\n"
    assert texts(tmp_path, name, data) == ["The captain saw it and asked me."]


def test_note_style_and_region_blocks_are_not_text(tmp_path):
    data = ("WEBVTT\n\nREGION\nid:fred width:40%\n\nSTYLE\n::cue { color: yellow }\n\n"
            "NOTE written by hand\nover two lines\n\n00:00:01.000 --> 00:00:02.000\nHello\n\n"
            "NOTE a comment between cues\n\n00:00:03.000 --> 00:00:04.000\nNOTE is a word here\n")
    dropped = Counter()
    cues = read_transcript(write(tmp_path, "note.vtt", data), dropped)
    assert [c.text for c in cues] == ["Hello", "NOTE is a word here"] and not dropped


@pytest.mark.parametrize("name, data", [("a.vtt", vtt("A --> B means A then B", "--> this way")),
                                        ("a.srt", srt("A --> B means A then B", "--> this way"))])
def test_arrow_inside_cue_text(tmp_path, name, data):
    assert texts(tmp_path, name, data) == ["A --> B means A then B", "--> this way"]


@pytest.mark.parametrize("timing", ["00:00:03 --> 00:00:04", "3.000 --> 4.000", "00:00:03.000 --> soon"])
def test_a_broken_timing_is_an_error_not_text(tmp_path, timing):
    with pytest.raises(InputError) as e:
        read_transcript(write(tmp_path, "b.vtt", f"WEBVTT\n\n00:00:01.000 --> 00:00:02.000\nHi\n\n{timing}\nthere\n"))
    assert e.value.line == 6 and "malformed cue timing" in e.value.reason


def test_comma_before_the_milliseconds_in_vtt(tmp_path):
    data = "WEBVTT\n\n00:00:01,200 --> 00:00:03,4\nThe bus.\n"
    assert [(c.start, c.end) for c in read_transcript(write(tmp_path, "c.vtt", data))] == [(1.2, 3.4)]


def test_text_outside_any_cue_is_counted(tmp_path):
    dropped = Counter()
    cues = read_transcript(write(tmp_path, "t.srt", "Subtitles by Someone\n\n" + srt("Hi.")), dropped)
    assert [c.text for c in cues] == ["Hi."] and sum(dropped.values()) == 1 and "outside" in next(iter(dropped))


# ------------------------------------------------------------------------------------------------ markup

def test_webvtt_spans_and_ruby_readings(tmp_path):
    data = vtt("<ruby>漢<rt>kan</rt>字<rt>ji</rt></ruby>を<ruby>東京<rp>(</rp><rt>とうきょう</rt><rp>)</rp>",
               "<lang en-GB>colour</lang> <b>bold</b> <u>under</u> <i>it</i> <c.yellow.bg_blue>class</c>")
    assert texts(tmp_path, "m.vtt", data) == ["漢字を東京", "colour bold under it class"]


def test_srt_font_and_ssa_override_blocks_then_annotations(tmp_path):
    data = srt('{\\an8}<font color="#ffff00">[DOOR SLAMS]</font>', "{\\i1}(sighs){\\i0} Fine, {\\b1}fine{\\b0}.",
               '<font face="Arial">♪ la la ♪</font>')
    dropped = Counter()
    cues = read_transcript(write(tmp_path, "s.srt", data), dropped)
    assert [c.text for c in cues] == ["Fine, fine.", "la la"]
    assert sum(dropped.values()) == 2


# ---------------------------------------------------------------------------------------------- speakers

def test_voice_changes_become_speaker_marks(tmp_path):
    data = vtt("<v Ana>Knock knock.</v>", "<v.loud Ana>Still me.", "no voice here",
               "<v Ben>Who's there?</v> <v Ana>Lettuce.</v>", "<v Ana>Let us in.")
    assert texts(tmp_path, "v.vtt", data) == ["Knock knock.", "Still me.", "no voice here",
                                              ">> Who's there? >> Lettuce.", "Let us in."]


@pytest.mark.parametrize("dash", ["-", "\u2010", "\u2011", "\u2013"])
@pytest.mark.parametrize("space", ["", " "])
def test_dialogue_dashes(tmp_path, dash, space):
    data = srt(f"{dash}{space}Hi!\n{dash}{space}Hello!", f"{dash}{space}Are you sure? {dash}{space}Completely.")
    assert texts(tmp_path, "d.srt", data) == [">> Hi! >> Hello!", ">> Are you sure? >> Completely."]


def test_dialogue_dash_after_an_annotation(tmp_path):
    data = srt("[SIGHS] -Fine.", "(laughs) - Okay.", "-[door opens] Come in.")
    assert texts(tmp_path, "a.srt", data) == [">> Fine.", ">> Okay.", ">> Come in."]


def test_hyphens_that_are_not_dialogue_dashes(tmp_path):
    data = srt("A well-known 10-20 range - or so.", "-5 degrees tonight", "--and then nothing", "Wait \u2013 what")
    assert texts(tmp_path, "h.srt", data) == ["A well-known 10-20 range - or so.", "-5 degrees tonight",
                                             "--and then nothing", "Wait \u2013 what"]


def test_double_chevrons_are_kept_as_speaker_marks(tmp_path):
    assert texts(tmp_path, "g.vtt", vtt("&gt;&gt; How long?", ">>About six months.")) == \
        [">> How long?", ">> About six months."]


def test_speaker_labels_at_the_start_of_a_line(tmp_path):
    data = srt("ANA: Hi.", "ANA: Still me.", "DR. BEN OKAFOR: Hello.\nMAN 2: Hey.", "Ben: Me again.",
               "- ANA: Bye.")
    assert texts(tmp_path, "l.srt", data) == ["Hi.", "Still me.", ">> Hello. >> Hey.", ">> Me again.", ">> Bye."]


def test_colons_that_are_not_speaker_labels(tmp_path):
    data = srt("Note: the shop closes at five.", "We said, Note: bring cash.", "He shouted JOHN: over here.",
               "At 10:30 we leave.")
    assert texts(tmp_path, "n.srt", data) == ["Note: the shop closes at five.", "We said, Note: bring cash.",
                                             "He shouted JOHN: over here.", "At 10:30 we leave."]


def test_speaker_names_never_stay_in_the_text(tmp_path):
    data = vtt("<v Ana Pereira>One.</v>", "BEN OKAFOR: Two.", "<v Ana Pereira>Three.")
    words = " ".join(texts(tmp_path, "names.vtt", data)).split()
    assert not {"Ana", "Pereira", "BEN", "OKAFOR", "OKAFOR:"} & set(words)
    assert words == ["One.", ">>", "Two.", ">>", "Three."]
