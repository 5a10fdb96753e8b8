"""Time the transcript path (read + clean + merge + segment + ShareGPT rows) over a folder of caption files.

Usage: python bench/transcripts.py [FOLDER]   (default: ../shared/data/youtube beside the repo). Target: the
21 real files (6 MB, three of them over 1 MB) in at most 10 s, every file well under a second.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from persona_lm.data.transcripts import caption_files, read_transcript, segment, to_sharegpt, video_meta
from persona_lm.params import Segment

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "youtube"


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    files = caption_files([folder])
    if not files:
        sys.exit(f"no .vtt/.srt files under {folder}")
    seg = Segment()
    total = utts_n = rows_n = 0
    slowest = (0.0, "")
    cpu0 = time.process_time()
    for path in files:
        t0 = time.perf_counter()
        utts = segment(read_transcript(path), seg.pause_s, seg.max_utterance_words)
        rows = to_sharegpt(utts, seg, **video_meta(path))
        dt = time.perf_counter() - t0
        total += dt
        utts_n += len(utts)
        rows_n += len(rows)
        slowest = max(slowest, (dt, path.name))
        mb = path.stat().st_size / 1e6
        print(f"{dt:7.3f} s  {mb:5.2f} MB  {len(utts):5d} utterances  {len(rows):4d} rows  {path.name}")
    mb = sum(p.stat().st_size for p in files) / 1e6
    cpu = time.process_time() - cpu0  # what the work cost, even on a machine shared with other jobs
    print(f"total {total:.2f} s wall, {cpu:.2f} s CPU for {len(files)} files ({mb:.1f} MB): {utts_n} utterances, "
          f"{rows_n} rows; slowest {slowest[0]:.3f} s ({slowest[1]})")


if __name__ == "__main__":
    main()
