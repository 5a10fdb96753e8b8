"""Stage process_transcripts: caption files -> clean utterance table + ShareGPT conversations in the speaker's voice.

Reads data/raw/youtube (fetch_transcripts writes `<id>.<lang>.vtt` beside `<id>.info.json`) and every folder
in `youtube.local_dirs` (*.vtt and *.srt, recursively). Writes data/interim/transcripts.parquet, one row per
utterance (video_id, source_file, start, end, text), and data/interim/dialogues/transcripts.jsonl.

A file with nothing to read (empty, binary, no cues, only annotations) is skipped; a broken one (not UTF-8 or
UTF-16/32 with a BOM, a malformed or truncated cue timing, cues out of order) stops the stage with
`file:line`, because the fix is to re-save or re-fetch that file and a silent skip would lose a whole video.
The `files` section of reports/validation/transcripts.json counts the files read and skipped, names each
skipped file with its reason, and counts the text left out on purpose (annotations, lines outside any cue).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import polars as pl

from persona_lm import stage
from persona_lm.data.transcripts import NoCaptions, caption_files, read_transcript, segment, to_sharegpt, video_meta
from persona_lm.data.validation import validate_dialogues, validate_transcripts
from persona_lm.errors import InputError, ParamsError, Skips
from persona_lm.io import write_json, write_jsonl, write_parquet
from persona_lm.params import Params

log = logging.getLogger("persona_lm.process_transcripts")

RAW = "data/raw/youtube"
TABLE = "data/interim/transcripts.parquet"
DIALOGUES = "data/interim/dialogues/transcripts.jsonl"
VALIDATION = "reports/validation/transcripts.json"
VALIDATION_DIALOGUES = "reports/validation/transcripts_dialogues.json"
SCHEMA = {"video_id": pl.String, "source_file": pl.String, "start": pl.Float64, "end": pl.Float64, "text": pl.String}


def main(p: Params) -> None:
    seg = p.youtube.segment
    for folder in p.youtube.local_dirs:
        if not Path(folder).exists():
            raise ParamsError(f"params.yaml: youtube.local_dirs: {folder}: folder not found")
    skips, skipped, dropped = Skips("caption file"), {}, Counter()
    table, rows, seen, duplicates, read = [], [], set(), 0, 0
    for path in caption_files([RAW, *p.youtube.local_dirs]):
        try:
            cues = read_transcript(path, dropped)
        except NoCaptions as e:
            skips.add(e.reason, str(path))
            skipped[str(path)] = e.reason
            continue
        read += 1
        try:
            meta = video_meta(path)
        except InputError as e:
            log.warning("%s (title and channel left out)", e)
            meta = {"video_id": path.name.split(".")[0]}
        utts = segment(cues, seg.pause_s, seg.max_utterance_words)
        table += [{"video_id": meta["video_id"], "source_file": str(path), "start": u.start, "end": u.end,
                   "text": u.text} for u in utts]
        for row in to_sharegpt(utts, seg, **meta):
            duplicates += row["id"] in seen  # the same video twice (a .vtt and its .srt), or a repeated chorus
            if row["id"] not in seen:
                seen.add(row["id"])
                rows.append(row)

    df = pl.DataFrame(table, schema=SCHEMA)
    files = {"read": read, "skipped": skips.total, "skip_reasons": skips.as_dict(), "skipped_files": skipped,
             "dropped_text": dict(sorted(dropped.items()))}
    write_json(VALIDATION, {**validate_transcripts(df, VALIDATION), "files": files})
    validate_dialogues(rows, labels=set(p.persona.emotions), name="transcripts", report_path=VALIDATION_DIALOGUES)
    write_parquet(TABLE, df)
    write_jsonl(DIALOGUES, rows)
    log.info("transcripts: %d files read, %d utterances, %d conversations (%d duplicates dropped); skipped: %s; "
             "text left out: %s", read, df.height, len(rows), duplicates, skips.as_dict() or "none",
             dict(dropped) or "none")


if __name__ == "__main__":
    stage.run(main)
